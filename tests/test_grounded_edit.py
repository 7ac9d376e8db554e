"""The grounded edit: a checkpoint with a region head (configs/shapes_grounded.py's region model, random
weights) finds where to edit from the image and the instruction, and edits there only; the CLI's
--save-mask and --whole-image; a head lent to another checkpoint (--mask-from)."""

import json

import numpy as np
import pytest
from PIL import Image

from fireedit_jax import cli
from fireedit_jax.data import shapes
from fireedit_jax.pipeline import Editor

INSTRUCTION = "make the red circle blue"


def _save(config_spec: str, directory, seed: int = 0):
    """`config_spec`'s model with random weights (`EditModel.draw_params`) as an inference checkpoint."""
    from fireedit_jax import checkpoint
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train.inputs import make_tokenizer
    from fireedit_jax.train.run import load_config

    config = load_config(config_spec)
    model = EditModel.from_config(config.model)
    params = model.draw_params(seed)
    make_tokenizer(config.data.tokenizer).save_pretrained(str(directory / "tokenizer"))
    checkpoint.save(str(directory / "ckpt"), params, config, tokenizer_dir=str(directory / "tokenizer"))
    return directory / "ckpt"


@pytest.fixture(scope="module")
def grounded_checkpoint(tmp_path_factory):
    return _save("configs/shapes_grounded.py", tmp_path_factory.mktemp("grounded"))


@pytest.fixture(scope="module")
def grounded(grounded_checkpoint):
    return Editor.from_pretrained(str(grounded_checkpoint))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A ShapeEdit test scene drawn at 300 × 200 (no working size), its object boxes as proposals."""
    sample = shapes.generate(shapes.ShapesConfig(size=32), "test", 3)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(sample["source"]).resize((300, 200), Image.NEAREST).save(path)
    return path, sample["boxes"]


def test_the_region_is_predicted_and_only_it_is_edited(grounded, scene):
    path, boxes = scene
    assert grounded.region_head == "region" and grounded.default_method == "region"
    (region,) = grounded.find_regions([str(path)], [INSTRUCTION], boxes=[boxes])
    assert region.shape == (200, 300) and 0 < region.mean() < 1  # at the image's own size, a part of it
    source = np.asarray(Image.open(path).convert("RGB"))
    out = np.asarray(grounded.edit(str(path), INSTRUCTION, boxes=boxes, steps=2, progress=False))
    assert out.shape == source.shape
    np.testing.assert_array_equal(out[~region], source[~region])  # the input, exactly, outside the region
    assert np.abs(out[region].astype(int) - source[region]).mean() > 5  # the random model paints inside
    whole = np.asarray(grounded.edit(str(path), INSTRUCTION, boxes=boxes, whole_image=True, steps=2, progress=False))
    assert np.abs(whole[~region].astype(int) - source[~region]).max() > 0  # the flag edits everywhere
    with pytest.raises(ValueError, match="give no mask"):
        grounded.edit(str(path), INSTRUCTION, mask_box=[0.1, 0.1, 0.5, 0.5], whole_image=True, progress=False)


def test_edit_cli_saves_the_region_it_edited(grounded, grounded_checkpoint, scene, tmp_path, capsys):
    path, boxes = scene
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(np.asarray(boxes).tolist()))  # a bare list: one clear error
    common = ["edit", "--checkpoint", str(grounded_checkpoint), "--image", str(path), "--instruction", INSTRUCTION,
              "--steps", "2", "--boxes", str(boxes_file), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert cli.main(common) == 2 and 'each line must be {"boxes"' in capsys.readouterr().err
    boxes_file.write_text(json.dumps({"boxes": np.asarray(boxes).tolist()}))
    common = ["edit", "--checkpoint", str(grounded_checkpoint), "--image", str(path), "--instruction", INSTRUCTION,
              "--steps", "2", "--boxes", str(boxes_file), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert cli.main([*common, "--save-mask", str(tmp_path / "region.png")]) == 0
    saved = np.asarray(Image.open(tmp_path / "region.png")) > 127
    (expected,) = grounded.find_regions([str(path)], [INSTRUCTION], boxes=[boxes])
    np.testing.assert_array_equal(saved, expected)
    assert "wrote the edit's region" in capsys.readouterr().out
    assert cli.main([*common, "--whole-image", "--save-mask", str(tmp_path / "none.png")]) == 2
    assert "this edit has none" in capsys.readouterr().err
    # bad input: one clear line, exit code 2, no traceback
    empty = [c if c != INSTRUCTION else "  " for c in common]
    folder = [*common[:-1], str(tmp_path)]
    for argv, says in ((empty, "the instruction is empty"), (folder, "is a folder")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="the instruction is empty"):
        grounded.edit(str(path), "", progress=False)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A mask-guided checkpoint without a region head (configs/shapes_mask.py, random weights)."""
    return _save("configs/shapes_mask.py", tmp_path_factory.mktemp("plain"), seed=1)


def test_a_region_head_lent_to_a_checkpoint_without_one(grounded, plain_checkpoint, scene):
    """--mask-from: a mask-guided checkpoint (no head) edits where another checkpoint's head says."""
    path, boxes = scene
    plain = Editor.from_pretrained(str(plain_checkpoint))
    assert plain.region_head is None
    with pytest.raises(ValueError, match="no region head"):
        plain.edit(str(path), INSTRUCTION, method="region", progress=False)
    (region,) = plain.find_regions([str(path)], [INSTRUCTION], boxes=[boxes], mask_from=grounded)
    np.testing.assert_array_equal(region, grounded.find_regions([str(path)], [INSTRUCTION], boxes=[boxes])[0])
    out = np.asarray(plain.edit(str(path), INSTRUCTION, boxes=boxes, mask_from=grounded, steps=2, progress=False))
    source = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(out[~region], source[~region])


def test_batch_edits_take_their_region_from_another_checkpoint(grounded, grounded_checkpoint, plain_checkpoint,
                                                               scene, tmp_path, capsys):  # fmt: skip
    """edit --jsonl --mask-from: a line without a region of its own is edited where the lent head finds it,
    one with a "mask_box" there; a single --mask-box for a batch (and the other one-image options) is
    refused in one line."""
    from fireedit_jax import images

    path, boxes = scene
    box = [0.1, 0.1, 0.4, 0.5]
    lines = [{"image": str(path), "instruction": INSTRUCTION, "boxes": np.asarray(boxes).tolist(), "output": "found"},
             {"image": str(path), "instruction": INSTRUCTION, "mask_box": box, "output": "boxed"}]  # fmt: skip
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    argv = ["edit", "--checkpoint", str(plain_checkpoint), "--jsonl", str(tmp_path / "edits.jsonl"), "--steps", "2",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main([*argv, "--mask-from", str(grounded_checkpoint)]) == 0
    source = np.asarray(Image.open(path).convert("RGB"))
    (found,) = grounded.find_regions([str(path)], [INSTRUCTION], boxes=[boxes])
    for name, region in (("found", found), ("boxed", images.box_mask(box, (300, 200)))):
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        np.testing.assert_array_equal(out[~region], source[~region])  # the input, exactly, outside the region
        assert (out[region] != source[region]).any(), name
    capsys.readouterr()
    for extra, says in ((["--mask-box", "0.1,0.1,0.5,0.5"], "a --jsonl line takes its own"),
                        (["--mask", "auto"], "(DiffEdit) is for one --image"),
                        (["--mask-from", str(grounded_checkpoint), "--whole-image"], "give one"),
                        (["--mask-crop", "8"], "for one single-turn edit of --image")):  # fmt: skip
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
