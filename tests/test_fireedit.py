"""FireEdit assembled: `convert fireedit` from random pretrained parts, editing, ablation switches, null branches."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fireedit_jax import checkpoint, cli
from fireedit_jax.convert import reference
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.pipeline import Editor, load_tokenizer

SIZES = dict(small=True, vlm_image_size=32, hvca_sizes=(16, 32))
BUCKETS = {"length_buckets": (64,), "box_buckets": (0, 4)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    reference.save_ip2p(str(root / "ip2p"))
    reference.save_llama(str(root / "llm"))
    reference.save_dinov2(str(root / "dinov2"))
    reference.save_clip_vision(str(root / "clip_vision"))
    return root


@pytest.fixture(scope="module")
def fireedit_ckpt(sources, tmp_path_factory):
    """A tiny FireEdit checkpoint through the CLI, with small buckets for speed."""
    out = tmp_path_factory.mktemp("fireedit") / "ckpt"
    from fireedit_jax.convert.fireedit import convert_fireedit

    errors = convert_fireedit(str(sources / "ip2p"), str(sources / "llm"), str(sources / "dinov2"),
                              str(sources / "clip_vision"), str(out), verify=True, **SIZES)  # fmt: skip
    assert set(errors) == {"unet", "vae", "llm", "dinov2", "clip_vision"} and max(errors.values()) < 1e-4, errors
    config = json.loads((out / "config.json").read_text())
    config["data"] = BUCKETS
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_convert_cli_names_a_missing_source(sources, tmp_path, capsys):
    code = cli.main(["convert", "fireedit", "--ip2p", str(sources / "ip2p"), "--llm", str(tmp_path / "nope"),
                     "--dinov2", str(sources / "dinov2"), "--clip-vision", str(sources / "clip_vision"),
                     "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "nope" in capsys.readouterr().err


def test_info_prints_trainable_counts_per_stage(fireedit_ckpt, capsys):
    assert cli.main(["info", "--checkpoint", str(fireedit_ckpt)]) == 0
    out = capsys.readouterr().out
    for name in ("vlm", "qformer", "tati", "hvca", "unet", "vae", "clip_vision"):
        assert name in out


def test_edit_with_and_without_boxes_runs_the_vlm_once_per_edit(fireedit_ckpt, tmp_path, capsys):
    editor = Editor.from_pretrained(str(fireedit_ckpt))
    calls = []
    prepare = editor._edit_inputs  # the conditioning: VLM, Q-Former, HVCA, image latents
    editor._edit_inputs = lambda *a, **k: calls.append(1) or prepare(*a, **k)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8))
    with_boxes = editor.edit(image, "make the left cup blue", steps=3, boxes=[[0.1, 0.2, 0.5, 0.7]], progress=False)
    assert calls == [1]  # 3 denoising steps, one VLM pass
    without = editor.edit(image, "make the left cup blue", steps=3, progress=False)
    assert calls == [1, 1] and with_boxes.size == without.size == (56, 40)
    assert not np.array_equal(np.asarray(with_boxes), np.asarray(without))  # the region token reaches the edit

    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(json.dumps({"boxes": [[0.1, 0.2, 0.5, 0.7]]}) + "\n")
    image.save(tmp_path / "in.png")
    args = ["edit", "--checkpoint", str(fireedit_ckpt), "--image", str(tmp_path / "in.png"), "--instruction",
            "remove the red circle", "--out", str(tmp_path / "out.png"), "--steps", "2"]  # fmt: skip
    assert cli.main(args + ["--boxes", str(boxes)]) == 0
    assert Image.open(tmp_path / "out.png").size == (56, 40)
    boxes.write_text(json.dumps({"boxes": []}) + "\n" + json.dumps({"boxes": []}) + "\n")
    assert cli.main(args + ["--boxes", str(boxes)]) == 2  # two box lines for one image
    assert "box lines for 2 images, but 1 image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("switch", ["use_regions", "use_tati", "use_hvca"])
def test_each_module_can_be_switched_off(fireedit_ckpt, switch):
    config = checkpoint.load_config(str(fireedit_ckpt))
    config.model[switch] = False
    if switch == "use_hvca":
        config.model.unet.decoupled = False
    model = EditModel.from_config(config.model)
    params = model.draw_params()  # no init to compile: the switch is what is tested
    names = {"use_regions": "regions", "use_tati": "tati", "use_hvca": "hvca"}
    tree = params["vlm"] if switch == "use_regions" else params
    assert names[switch] not in tree
    editor = Editor(model, params, config, load_tokenizer(checkpoint.tokenizer_dir(str(fireedit_ckpt)), model))
    pixels = jnp.zeros((1, 32, 32, 3))
    out = editor.edit_arrays(pixels, ["make it blue"], boxes=[[[0.1, 0.1, 0.4, 0.4]]], steps=2)
    assert out.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(out)).all()


def test_image_null_branch_equals_the_unet_without_visual_branch(fireedit_ckpt):
    editor = Editor.from_pretrained(str(fireedit_ckpt))
    model, params = editor.model, editor.params
    rng = np.random.default_rng(1)
    latents = jnp.asarray(rng.normal(size=(1, 16, 16, 8)), jnp.float32)
    t = jnp.array([500.0])
    visual = jnp.asarray(rng.normal(size=(1, 16, model.context_dim)), jnp.float32)
    cond = {"text": jnp.asarray(rng.normal(size=(1, 77, model.context_dim)), jnp.float32), "visual": visual}
    _, _, uncond = model.branches(params, cond)
    with jax.default_matmul_precision("highest"):
        null_visual = model.denoise(params, latents, t, uncond)
        text = model.tati.apply({"params": params["tati"]}, uncond["text"], t)
        plain = model.unet.apply({"params": params["unet"]}, latents, t, text)  # no visual branch at all
        with_visual = model.denoise(params, latents, t, {**uncond, "visual": visual})
    np.testing.assert_allclose(np.asarray(null_visual), np.asarray(plain), atol=1e-6)
    assert np.abs(np.asarray(with_visual) - np.asarray(plain)).max() > 1e-4


def test_checkpoint_missing_a_network_names_it(fireedit_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fireedit_ckpt, broken)
    editor = Editor.from_pretrained(str(fireedit_ckpt))
    params = dict(editor.params)
    del params["qformer"]
    checkpoint.save(str(broken), params, checkpoint.load_config(str(broken)))
    with pytest.raises(checkpoint.CheckpointError, match="missing: qformer/"):
        Editor.from_pretrained(str(broken))


def test_fireedit_7b_trainable_counts_per_stage():
    """Full size via eval_shape (nothing allocated). Paper: 1093.8M trainable (see BENCHMARKS.md for the gap)."""
    import importlib.util

    from fireedit_jax.train import masks, stages

    spec = importlib.util.spec_from_file_location("fireedit_7b", "configs/fireedit_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tree = jax.eval_shape(EditModel.from_config(module.get_config("3").model).init, jax.random.key(0))

    def count(*patterns):
        return masks.count_params(tree, masks.trainable_mask(tree, patterns))

    assert count(stages.LORA) == 4_194_304  # r 8 on q_proj, v_proj of 32 layers
    # K2/V2 (768 → C, bias-free) in the 16 cross-attentions, whose widths C sum to 12,480
    assert count(r"_ip/kernel$") == 2 * 768 * 12_480
    assert count(r"^unet/") == 859_532_484 + count(r"_ip/kernel$")  # the 8-channel SD1.5 UNet + K2/V2
    assert [count(*stages.trainable_patterns(s)) for s in (1, 2, 3)] == [65_309_952, 981_768_644, 1_007_462_340]


@pytest.mark.parametrize("network", ["llama", "dinov2", "clip-vision", "unet"])
def test_convert_one_network_with_verify(sources, tmp_path, capsys, network):
    src = {"llama": "llm", "dinov2": "dinov2", "clip-vision": "clip_vision", "unet": "ip2p/unet"}[network]
    code = cli.main(["convert", network, "--src", str(sources / src), "--out", str(tmp_path / "out"), "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    error = float(out.strip().split("=")[-1])
    assert error < 1e-4 and (tmp_path / "out" / "params").is_dir()
