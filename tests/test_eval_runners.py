"""Benchmark runners (MagicBrush, Emu Edit) and batch / multi-turn editing, end to end on a tiny random IP2P.

Every edit batch runs sharded over the 8 simulated CPU devices with one shape (8 × 64 × 64,
2 steps), so the whole file compiles the edit loop once.
"""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from PIL import Image

from fireedit_jax import images
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.data import proposals
from fireedit_jax.eval import preprocess
from fireedit_jax.eval.batch_edit import DatasetError, EditSettings, edit_jsonl, edit_turns
from fireedit_jax.eval.benchmark_data import load_magicbrush
from fireedit_jax.eval.benchmarks import run_emu, run_magicbrush
from fireedit_jax.eval.result_log import RunSettingsError
from fireedit_jax.eval.scorer import Scorer
from fireedit_jax.pipeline import Editor

SETTINGS = EditSettings(steps=2)
SIZE = 64  # the tiny IP2P's resolution: one working size, one compilation


def _image(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip2p")
    reference.save_ip2p(str(root / "diffusers"))
    convert_ip2p(str(root / "diffusers"), str(root / "ckpt"))
    editor = Editor.from_pretrained(str(root / "ckpt"))
    calls = []
    edit_arrays = editor.edit_arrays

    def spy(pixels, instructions, **kwargs):  # records every batch the runners send
        calls.append((np.asarray(pixels), list(instructions), kwargs.get("boxes")))
        editor.masks.append(None if kwargs.get("masks") is None else np.asarray(kwargs["masks"]))
        return edit_arrays(pixels, instructions, **kwargs)

    editor.edit_arrays = spy
    editor.calls, editor.masks = calls, []
    return editor


def _mask_file(k: int, transparent: bool) -> Image.Image:
    """Turn k's edit region, a box: transparent in an RGBA picture (DALL-E 2's convention) or white on black."""
    inside = np.zeros((SIZE, SIZE), bool)
    inside[8 * k : 8 * k + 24, 4:40] = True
    if transparent:
        picture = np.asarray(_image(k)).copy()
        return Image.fromarray(np.dstack([picture, np.where(inside, 0, 255).astype(np.uint8)]), "RGBA")
    return Image.fromarray(inside.astype(np.uint8) * 255, "L")


# MagicBrush's test release: session → turns; 104's input is corrupt; 103's second mask is missing.
SESSIONS = {"101": ["add a hat", "make it night", "add snow"], "102": ["remove the cup"],
            "103": ["paint it red", "add a dog"], "104": ["add a tree"]}


@pytest.fixture(scope="module")
def magicbrush_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("magicbrush") / "test"
    sessions, local = {}, {}
    for n, (session, instructions) in enumerate(SESSIONS.items()):
        folder = root / "images" / session
        folder.mkdir(parents=True)
        names = [f"{session}-input.png"] + [f"{session}-output{k}.png" for k in range(1, len(instructions) + 1)]
        for i, name in enumerate(names):
            _image(10 * n + i).save(folder / name)
        for k in range(1, len(instructions) + 1):
            if (session, k) != ("103", 2):
                _mask_file(k, transparent=session == "101").save(folder / f"{session}-mask{k}.png")
        sessions[session] = [{"input": names[k - 1], "mask": f"{session}-mask{k}.png", "output": names[k],
                              "instruction": text} for k, text in enumerate(instructions, 1)]
        local[session] = {names[k]: f"caption {session} {k}" for k in range(1, len(names))}
    (root / "images" / "104" / "104-input.png").write_bytes(CORRUPT)
    (root / "edit_sessions.json").write_text(json.dumps(sessions))
    (root / "local_descriptions.json").write_text(json.dumps(local))
    return root


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_magicbrush_single_then_both_resumes(editor, magicbrush_dir, tmp_path):
    out = tmp_path / "mb"
    first = run_magicbrush(editor, str(magicbrush_dir), str(out), turns="single", limit=2, settings=SETTINGS,
                           progress=False)
    assert first["this_run"]["edits"] == 4 and first["counts"] == {"samples": 4, "finished": 4, "errors": 0}
    assert sorted(os.listdir(out / "images" / "101")) == ["101_1.png", "101_inde_2.png", "101_inde_3.png"]
    turn1 = (out / "images" / "101" / "101_1.png").read_bytes()

    calls_before = len(editor.calls)
    summary = run_magicbrush(editor, str(magicbrush_dir), str(out), turns="both", settings=SETTINGS, progress=False)
    # resumed: 103's two turns (+104, which fails) independently, then the iterative turns 101/2, 103/2, 101/3
    assert summary["this_run"]["edits"] == 5 and summary["this_run"]["errors"] == 1
    assert len(editor.calls) - calls_before == 3  # three waves, one batch each
    assert (out / "images" / "101" / "101_1.png").read_bytes() == turn1  # finished samples are not redone
    assert len(_lines(out / "results.jsonl")) == 4 + 6
    assert summary["counts"] == {"samples": 10, "finished": 9, "errors": 1}
    assert "104-input.png" in summary["errors"][0]["error"] and summary["errors"][0]["key"] == "104/1"
    assert summary["results"]["all_turn"]["count"] == 6 and summary["results"]["final_turn"]["count"] == 3
    assert sorted(os.listdir(out / "images" / "101")) == [
        "101_1.png", "101_inde_2.png", "101_inde_3.png", "101_iter_2.png", "101_iter_3.png"]

    # an iterative turn edits our previous output, not the ground truth: the batch of wave 3 holds 101_iter_2
    pixels, instructions, _ = editor.calls[-1]
    assert instructions[0] == "add snow"
    previous = images.to_model_array(images.load_image(out / "images" / "101" / "101_iter_2.png"), (SIZE, SIZE))
    np.testing.assert_array_equal(pixels[0], previous)

    # the recorded L1 is MagicBrush's: output vs ground truth in [0, 1]
    record = {r["key"]: r for r in _lines(out / "results.jsonl")}["103/iter/2"]
    got = np.asarray(Image.open(out / record["output"]), np.float32) / 255
    want = np.asarray(Image.open(magicbrush_dir / "images" / "103" / "103-output2.png"), np.float32) / 255
    assert record["l1"] == pytest.approx(np.abs(got - want).mean(), abs=1e-6)
    assert record["l2"] == pytest.approx(np.square(got - want).mean(), abs=1e-6)
    assert 0.05 < record["l1"] < 0.6

    markdown = (out / "summary.md").read_text()
    assert "all_turn" in markdown and "final_turn" in markdown and "104/1" in markdown
    assert "clip_i not computed: no --clip given" in markdown
    grid = Image.open(out / "grid.png")
    assert grid.width == 4 * 256 and grid.height > 256

    again = run_magicbrush(editor, str(magicbrush_dir), str(out), turns="both", settings=SETTINGS, progress=False)
    assert again["this_run"]["edits"] == 0 and again["this_run"]["errors"] == 1  # only the corrupt one is retried
    with pytest.raises(RunSettingsError, match="steps"):
        run_magicbrush(editor, str(magicbrush_dir), str(out), settings=EditSettings(steps=3), progress=False)


def test_magicbrush_under_its_masks(editor, magicbrush_dir, tmp_path):
    out = tmp_path / "mb_masks"
    start = len(editor.masks)
    summary = run_magicbrush(editor, str(magicbrush_dir), str(out), turns="single", limit=3, settings=SETTINGS,
                             masks=True, mask_dilation=2, progress=False)  # fmt: skip
    assert summary["counts"] == {"samples": 6, "finished": 5, "errors": 1}
    assert summary["errors"][0]["key"] == "103/inde/2" and "mask" in summary["errors"][0]["error"]
    (sent,) = editor.masks[start:]  # one batch of the five turns: 101/1-3, 102/1, 103/1
    for row, k in enumerate((1, 2, 3, 1, 1)):  # each the annotated box, grown by 2 pixels
        want = np.zeros((SIZE, SIZE), np.float32)
        want[max(8 * k - 2, 0) : 8 * k + 26, 2:42] = 1
        np.testing.assert_array_equal(sent[row], want)
    with pytest.raises(RunSettingsError, match="masks"):
        run_magicbrush(editor, str(magicbrush_dir), str(out), turns="single", settings=SETTINGS, progress=False)


def test_magicbrush_wrong_schema_names_the_fields(magicbrush_dir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    sessions = json.loads((magicbrush_dir / "edit_sessions.json").read_text())
    del sessions["101"][1]["instruction"]
    del sessions["103"][0]["output"]
    (broken / "edit_sessions.json").write_text(json.dumps(sessions))
    with pytest.raises(DatasetError) as err:
        load_magicbrush(str(broken))
    assert "session 101 turn 2 lacks instruction" in str(err.value)
    assert "session 103 turn 1 lacks output" in str(err.value)
    with pytest.raises(DatasetError, match="neither MagicBrush's release layout"):
        load_magicbrush(str(tmp_path))


def test_magicbrush_parquet_layout(tmp_path):
    rows = [("7", 2, "second"), ("7", 1, "first"), ("9", 1, "only")]  # out of turn order on purpose
    table = pa.table({
        "img_id": [r[0] for r in rows], "turn_index": pa.array([r[1] for r in rows], pa.int32()),
        "source_img": pa.array([{"bytes": _png(_image(i)), "path": f"s{i}.png"} for i in range(3)], IMAGE_STRUCT),
        "mask_img": pa.array([{"bytes": _png(_mask_file(1, True)), "path": "m.png"}] * 3, IMAGE_STRUCT),
        "instruction": [r[2] for r in rows],
        "target_img": pa.array([{"bytes": _png(_image(20 + i)), "path": f"t{i}.png"} for i in range(3)], IMAGE_STRUCT),
    })  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "dev-00000-of-00001.parquet", row_group_size=2)
    sessions = load_magicbrush(str(tmp_path), split="dev")
    assert [[(t.session, t.turn, t.instruction) for t in s] for s in sessions] == [
        [("7", 1, "first"), ("7", 2, "second")], [("9", 1, "only")]]
    np.testing.assert_array_equal(np.asarray(sessions[0][0].source()), np.asarray(_image(1)))  # row 1, 2nd group
    np.testing.assert_array_equal(np.asarray(sessions[1][0].target()), np.asarray(_image(22)))
    assert sessions[1][0].mask().mode == "RGBA"  # read as stored: the region is its transparency
    with pytest.raises(DatasetError, match="no train-\\*.parquet"):
        load_magicbrush(str(tmp_path), split="train")
    pq.write_table(table.drop_columns(["instruction", "target_img"]), tmp_path / "data" / "dev-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match="lacks the field\\(s\\) instruction, target_img"):
        load_magicbrush(str(tmp_path), split="dev")


# ---------------------------------------------------------------- Emu Edit with tiny CLIP and DINO encoders

EMU_ROWS = [("add", "add a hat", "a dog", "a dog in a hat"), ("remove", "remove the tree", "a tree", "a field"),
            ("background", "make it a beach", "a cat", "a cat on a beach"), ("add", "add a moon", "sky", "sky")]


def _emu_table(corrupt_row: int | None = None):
    image_cells = [{"bytes": CORRUPT if i == corrupt_row else _png(_image(40 + i)), "path": None}
                   for i in range(len(EMU_ROWS))]
    return pa.table({
        "instruction": [r[1] for r in EMU_ROWS], "image": pa.array(image_cells, IMAGE_STRUCT),
        "task": [r[0] for r in EMU_ROWS], "split": ["test"] * len(EMU_ROWS),
        "idx": pa.array(range(len(EMU_ROWS)), pa.int64()), "hash": [f"h{i}" for i in range(len(EMU_ROWS))],
        "input_caption": [r[2] for r in EMU_ROWS], "output_caption": [r[3] for r in EMU_ROWS],
    })  # fmt: skip


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random transformers CLIPModel (with tokenizer) and ViTModel directories, and the torch models."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    tokenizer = reference.clip_tokenizer()
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()  # fmt: skip
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    dino = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=32, patch_size=8),
                                 add_pooling_layer=False).eval()
    dino.save_pretrained(root / "dino")
    return {"clip": clip, "dino": dino, "tokenizer": tokenizer, "root": root}


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_emu_with_clip_and_dino(editor, encoders, tmp_path):
    data = tmp_path / "emu" / "data"
    data.mkdir(parents=True)
    pq.write_table(_emu_table(corrupt_row=1), data / "test-00000-of-00001.parquet", row_group_size=3)
    pq.write_table(_emu_table().slice(0, 1), data / "validation-00000-of-00001.parquet")
    scorer = Scorer.from_paths(clip=str(encoders["root"] / "clip"), dino=str(encoders["root"] / "dino"))
    out = tmp_path / "run"
    summary = run_emu(editor, str(tmp_path / "emu"), str(out), scorer=scorer, settings=SETTINGS, progress=False)

    assert summary["counts"] == {"samples": 4, "finished": 3, "errors": 1}
    assert "row 1 'image'" in summary["errors"][0]["error"] and "not a readable image" in summary["errors"][0]["error"]
    assert sorted(summary["by"]["task"]) == ["add", "background"] and summary["by"]["task"]["add"]["count"] == 2
    assert summary["identical_captions"] == 1
    assert set(summary["scorer"]["metrics"]) == {"l1", "l2", "clip_i", "clip_t", "clip_t_oracle", "clip_dir", "dino"}
    assert "CLIP" in summary["scorer"]["models"]["clip"]
    assert summary["scorer"]["skipped"] == {"lpips": "no --lpips-trunk given"}
    assert sorted(os.listdir(out / "images")) == ["0.png", "2.png", "3.png"]

    # the metrics of one sample against transformers' own towers
    record = {r["key"]: r for r in _lines(out / "results.jsonl")}["test/0"]
    source, output = _image(40), Image.open(out / "images" / "0.png").convert("RGB")
    clip, tokenizer = encoders["clip"], encoders["tokenizer"]
    with torch.no_grad():
        def image_embeds(image):
            pixels = torch.from_numpy(preprocess.clip_pixels(image, 32)).permute(2, 0, 1)[None]
            return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)[0].numpy()

        def text_embeds(text):
            tokens = tokenizer([text], padding="max_length", max_length=77, return_tensors="pt")
            pooled = clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            return clip.text_projection(pooled)[0].numpy()

        def dino_features(image):
            pixels = torch.from_numpy(preprocess.dino_pixels(image)).permute(2, 0, 1)[None]
            return encoders["dino"](pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[0, 0].numpy()

        i0, i1, t0, t1 = image_embeds(source), image_embeds(output), text_embeds("a dog"), text_embeds("a dog in a hat")
        d0, d1 = dino_features(source), dino_features(output)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    assert record["clip_i"] == pytest.approx(_cos(i1, i0), abs=1e-4)
    assert record["clip_t"] == pytest.approx(_cos(i1, t1), abs=1e-4)
    assert record["clip_dir"] == pytest.approx(_cos(unit(i1) - unit(i0), unit(t1) - unit(t0)), abs=1e-4)
    assert record["dino"] == pytest.approx(_cos(d1, d0), abs=1e-4)
    assert record["dino"] < 0.9999  # the edit changed the image: the comparison is not vacuous
    assert "CLIP-out" in (out / "summary.md").read_text()

    # encoders changed (none now): the saved outputs are re-scored, nothing is edited again
    calls_before = len(editor.calls)
    rescored = run_emu(editor, str(tmp_path / "emu"), str(out), settings=SETTINGS, progress=False)
    assert len(editor.calls) == calls_before and rescored["this_run"]["edits"] == 0
    assert "clip_i" not in rescored["results"]["all"] and rescored["results"]["all"]["count"] == 3
    assert rescored["results"]["all"]["l1"] == pytest.approx(summary["results"]["all"]["l1"], abs=1e-7)


def test_emu_wrong_schema_names_the_fields(tmp_path):
    pq.write_table(_emu_table().drop_columns(["task", "output_caption"]), tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match="lacks the field\\(s\\) task, output_caption of the Emu Edit layout"):
        run_emu(None, str(tmp_path), str(tmp_path / "out"))


# ---------------------------------------------------------------- batch and multi-turn editing


def test_batch_edit_jsonl(editor, tmp_path, monkeypatch):
    _image(1, (63, 65)).save(tmp_path / "a.png")  # odd size: same 64×64 working size, restored on output
    _image(2).convert("L").save(tmp_path / "b.jpg")
    (tmp_path / "bad.png").write_bytes(CORRUPT)
    lines = [{"image": "a.png", "instruction": "add snow", "boxes": [[0.1, 0.2, 0.5, 0.6]]},
             {"image": str(tmp_path / "b.jpg"), "instruction": "x"},
             {"image": "a.png", "instruction": "make it night", "output": "a_night"},
             {"image": "bad.png", "instruction": "y"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    proposed = []

    def propose(detector_dir, batch):  # a stand-in detector: one box per image it is asked about
        proposed.append((detector_dir, [im.size for im in batch]))
        return [np.asarray([[0.0, 0.0, 0.5, 0.5]], np.float32) for _ in batch]

    monkeypatch.setattr(proposals, "propose", propose)
    result = edit_jsonl(editor, str(tmp_path / "edits.jsonl"), str(tmp_path / "out"), settings=SETTINGS,
                        proposer="detector-dir", progress=False)
    # a line's own boxes win; the others' are proposed, in one detector call per batch
    assert proposed == [("detector-dir", [(64, 64), (63, 65)])]
    boxes = editor.calls[-1][2]
    np.testing.assert_array_equal(boxes[0], np.float32([[0.1, 0.2, 0.5, 0.6]]))
    np.testing.assert_array_equal(boxes[1], [[0.0, 0.0, 0.5, 0.5]])
    assert len(boxes) == 8
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "a_night.png", "b.png"]
    assert Image.open(tmp_path / "out" / "a.png").size == (63, 65)
    assert Image.open(tmp_path / "out" / "b.png").mode == "RGB"
    assert len(result.written) == 3 and result.failed[0][0].endswith("bad.png")
    again = edit_jsonl(editor, str(tmp_path / "edits.jsonl"), str(tmp_path / "out"), progress=False, settings=SETTINGS)
    assert not again.written and len(again.existing) == 3

    # noise is per sample: a.png edited again in another batch, at another position, comes out the same
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps(line) for line in [lines[1], lines[0]]))
    redo = edit_jsonl(editor, str(tmp_path / "one.jsonl"), str(tmp_path / "redo"), settings=SETTINGS, progress=False)
    assert [os.path.basename(p) for p in redo.written] == ["b.png", "a.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "redo" / "a.png")),
                                  np.asarray(Image.open(tmp_path / "out" / "a.png")))

    lines[2].pop("output")
    lines[1].pop("instruction")
    lines[3]["boxes"] = [[0.5, 0.5, 0.4, 0.9]]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(DatasetError) as err:
        edit_jsonl(editor, str(tmp_path / "edits.jsonl"), str(tmp_path / "out2"))
    assert "line 2: missing field(s) instruction" in str(err.value)
    assert "output 'a' named by several lines" in str(err.value)
    assert "box 0 for line 4 [0.5, 0.5, 0.4, 0.9] has zero area" in str(err.value)


def test_batch_edit_jsonl_takes_a_mask_or_a_box_per_line(editor, tmp_path):
    """A line's region: the output is its image outside it, pixel for pixel; lines with and without one
    mix in a file (edited in separate batches)."""
    from fireedit_jax import images

    _image(5, (70, 60)).save(tmp_path / "c.png")
    region = np.zeros((60, 70), bool)
    region[10:30, 20:50] = True
    Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "c_mask.png")
    box = [0.5, 0.5, 0.9, 0.9]
    lines = [{"image": "c.png", "instruction": "add snow", "mask": "c_mask.png", "output": "masked"},
             {"image": "c.png", "instruction": "add snow", "mask_box": box, "output": "boxed"},
             {"image": "c.png", "instruction": "add snow", "output": "whole"}]  # fmt: skip
    (tmp_path / "masks.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = edit_jsonl(editor, str(tmp_path / "masks.jsonl"), str(tmp_path / "out"), settings=SETTINGS, progress=False)
    assert len(result.written) == 3 and not result.failed
    source = np.asarray(Image.open(tmp_path / "c.png"))
    out = {name: np.asarray(Image.open(tmp_path / "out" / f"{name}.png")) for name in ("masked", "boxed", "whole")}
    for name, inside in (("masked", region), ("boxed", images.box_mask(box, (70, 60)))):
        np.testing.assert_array_equal(out[name][~inside], source[~inside])
        assert (out[name][inside] != source[inside]).any(), name
    assert (out["whole"][~region] != source[~region]).any()  # no region: the model's output everywhere
    lines[0]["mask_box"] = box
    (tmp_path / "masks.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(DatasetError, match="not both"):
        edit_jsonl(editor, str(tmp_path / "masks.jsonl"), str(tmp_path / "out2"), progress=False)


def test_multi_turn_edits_the_previous_output(editor, tmp_path):
    _image(5).save(tmp_path / "photo.png")
    calls_before = len(editor.calls)
    paths = edit_turns(editor, str(tmp_path / "photo.png"), ["add a hat", "make it night"], str(tmp_path / "out"),
                       settings=SETTINGS, progress=False)
    assert [os.path.basename(p) for p in paths] == ["photo_turn1.png", "photo_turn2.png"]
    (first, _, _), (second, instructions, _) = editor.calls[calls_before:]
    np.testing.assert_array_equal(first[0], images.to_model_array(_image(5), (SIZE, SIZE)))
    np.testing.assert_array_equal(second[0], images.to_model_array(images.load_image(paths[0]), (SIZE, SIZE)))
    assert instructions[0] == "make it night"
    assert np.abs(np.asarray(Image.open(paths[1]), np.int16) - np.asarray(Image.open(paths[0]), np.int16)).max() > 10


def test_scorer_lpips_and_distances_match_the_references(tmp_path):
    """LPIPS (squeeze trunk, the lpips package's bundled heads) and L1 on an output of another size than its target."""
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False).eval()  # random trunk: no download
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("net.")}
    torch.save(trunk, tmp_path / "trunk.pth")
    scorer = Scorer.from_paths(lpips_trunk=str(tmp_path / "trunk.pth"), lpips_net="squeeze")
    assert scorer.describe()["metrics"] == ["l1", "l2", "lpips"]
    output, target = _image(1, (48, 40)), _image(2, (64, 56))
    [record] = scorer.score([output], [target])

    resized = np.asarray(output.resize(target.size, Image.BICUBIC), np.float32) / 255  # MagicBrush: PIL, to the gt size
    want = np.asarray(target, np.float32) / 255
    assert record["l1"] == pytest.approx(np.abs(resized - want).mean(), abs=1e-6)
    to_torch = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None]  # noqa: E731
    with torch.no_grad():
        expected = model(to_torch(resized), to_torch(want), normalize=True).item()
    assert record["lpips"] == pytest.approx(expected, abs=1e-4) and expected > 0.01
