"""ShapeEdit: deterministic, exact rendering; unambiguous instructions (checked by a resolver
written here from the instruction text alone); held-out pairs; metrics on known cases;
tokenizer; folder writer."""

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fireedit_jax.data import shapes, shapes_render, shapes_words
from fireedit_jax.data.sources import JsonlSource
from fireedit_jax.eval import shapes_metrics as metrics

CONFIG = shapes.ShapesConfig()
CONFIG_32 = shapes.ShapesConfig(size=32)
COUNTS = {"train": 2000, "test": 1000, "heldout": 600}


@pytest.fixture(scope="module")
def samples():
    return {split: [shapes.generate(CONFIG, split, i) for i in range(n)] for split, n in COUNTS.items()}


@pytest.fixture(scope="module")
def samples_32():
    return [shapes.generate(CONFIG_32, split, i) for split in shapes.SPLITS for i in range(200)]


def every(samples):
    return [s for split in samples.values() for s in split]


def digest(config, n=10) -> str:
    h = hashlib.sha256()
    for split in shapes.SPLITS:
        for i in range(n):
            s = shapes.generate(config, split, i)
            arrays = ("source", "target", "mask", "boxes", "box")
            h.update(b"".join(s[k].tobytes() for k in arrays))
            metadata = {k: v for k, v in s.items() if k not in arrays}
            h.update(json.dumps(metadata).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- generator


def test_deterministic_across_instances_and_processes():
    here = digest(CONFIG)
    assert digest(shapes.ShapesConfig()) == here
    # String hashing differs between processes; nothing may depend on set or dict-of-set order.
    code = "from fireedit_jax.data import shapes; import test_shapes as t; print(t.digest(shapes.ShapesConfig()))"
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.path.dirname(__file__)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here
    assert digest(shapes.ShapesConfig(seed=1)) != here


def test_splits_and_indices_differ(samples):
    sources = [s["source"].tobytes() for s in every(samples)]
    assert len(set(sources)) == len(sources)


@pytest.mark.parametrize("config", [CONFIG, CONFIG_32], ids=["64px", "32px"])
def test_target_differs_only_inside_the_edited_box(config, samples, samples_32):
    for s in every(samples) if config.size == 64 else samples_32:
        assert s["source"].shape == s["target"].shape == (config.size, config.size, 3)
        assert s["source"].dtype == s["target"].dtype == np.uint8
        changed = np.any(s["source"] != s["target"], axis=-1)
        x0, y0, x1, y1 = (np.asarray(s["box"], np.float64) * config.size).round().astype(int)
        inside = np.zeros_like(changed)
        inside[y0:y1, x0:x1] = True
        assert not np.any(changed & ~inside), s["instruction"]
        assert np.any(changed & inside), s["instruction"]
        # The listed objects are really drawn where their boxes say.
        for obj in s["objects"]:
            x0, y0, x1, y1 = (np.asarray(obj["box"]) * config.size).round().astype(int)
            mask = shapes_render.shape_mask(obj["shape"], x1 - x0, y1 - y0)
            assert np.all(s["source"][y0:y1, x0:x1][mask] == shapes_render.PALETTE[obj["colour"]])


def test_proposals_are_the_object_boxes_and_jitter_leaves_the_scene(samples):
    for s in samples["train"][:300]:
        assert s["boxes"].dtype == np.float32
        np.testing.assert_array_equal(s["boxes"], np.asarray([o["box"] for o in s["objects"]], np.float32))
        if s["kind"] != "add":
            np.testing.assert_array_equal(s["box"], s["boxes"][s["object"]])
    noisy = shapes.ShapesConfig(box_jitter=0.1, distractor_boxes=3)
    deviations = []
    for i, s in enumerate(samples["train"][:100]):
        j = shapes.generate(noisy, "train", i)
        assert j["instruction"] == s["instruction"]
        np.testing.assert_array_equal(j["source"], s["source"])
        np.testing.assert_array_equal(j["target"], s["target"])
        n = len(s["objects"])
        assert j["boxes"].shape == (n + 3, 4)
        assert np.all((j["boxes"] >= 0) & (j["boxes"] <= 1)) and np.all(j["boxes"][:, 2:] >= j["boxes"][:, :2])
        sides = np.repeat(s["boxes"][:, 2:] - s["boxes"][:, :2], 2, axis=1)
        deviations.append(((j["boxes"][:n] - s["boxes"]) / sides).ravel())
    spread = np.std(np.concatenate(deviations))
    assert 0.07 < spread < 0.12  # N(0, 0.1 × side), a little less where clipped at the border


def test_kinds_referring_types_and_repeated_objects_all_occur(samples):
    train = samples["train"]
    pairs = {(s["kind"], s["refer"]) for s in train}
    assert pairs == {(k, r) for k in shapes.KINDS for r in shapes.REFERS if r != "corner" or k == "add"}
    for kind in shapes.KINDS:
        share = np.mean([s["kind"] == kind for s in train])
        assert 0.2 < share < 0.3
    assert {len(s["objects"]) for s in train} == {1, 2, 3, 4, 5}
    repeated = [s for s in train if len({(o["colour"], o["shape"]) for o in s["objects"]}) < len(s["objects"])]
    assert len(repeated) > 0.1 * len(train)


# ---------------------------------------------------------------------------- an independent resolver

COLOUR = "|".join(shapes.COLOURS)
SHAPE = "|".join(shapes.SHAPES)
REF = re.compile(
    rf"the (?:(?P<word>leftmost|rightmost|top|bottom|bigger|smaller|biggest|smallest) )?"
    rf"(?:(?P<colour>{COLOUR}) )?(?P<noun>{SHAPE}|object)"
)
NEW = rf"(?P<size>small|big) (?P<colour>{COLOUR}) (?P<shape>{SHAPE})"
GRAMMAR = {
    "colour": [
        rf"(?:make|paint) (?P<ref>.+) (?P<colour>{COLOUR})",
        rf"change the colour of (?P<ref>.+) to (?P<colour>{COLOUR})",
    ],
    "shape": [rf"(?:turn|change) (?P<ref>.+) into a (?P<shape>{SHAPE})", rf"make (?P<ref>.+) a (?P<shape>{SHAPE})"],
    "remove": [r"(?:remove|delete|erase|take away) (?P<ref>.+)"],
    "add": [
        rf"(?:add|put|draw) a {NEW} (?:to the (?P<side>left|right) of|(?P<vertical>above|below)) (?P<ref>.+)",
        rf"(?:add|put|draw) a {NEW} in the (?P<corner>(?:top|bottom) (?:left|right)) corner",
    ],
}


def parse(instruction: str) -> tuple[str, dict]:
    found = [(kind, m.groupdict()) for kind, patterns in GRAMMAR.items() for p in patterns
             if (m := re.fullmatch(p, instruction))]  # fmt: skip
    assert len(found) == 1, (instruction, found)
    return found[0]


def resolve(phrase: str, objects: list[dict]) -> tuple[int, str]:
    """The one object `phrase` means, and how it refers; fails on any ambiguity."""
    m = REF.fullmatch(phrase)
    assert m, phrase
    word, colour, noun = m["word"], m["colour"], m["noun"]
    candidates = [i for i, o in enumerate(objects)
                  if colour in (None, o["colour"]) and noun in ("object", o["shape"])]  # fmt: skip
    box = {i: np.asarray(objects[i]["box"]) for i in candidates}
    if word is None:
        assert len(candidates) == 1 and (colour or noun != "object"), phrase
        return candidates[0], "attribute"
    if word in ("leftmost", "rightmost", "top", "bottom"):
        axis = 0 if word in ("leftmost", "rightmost") else 1
        sign = 1 if word in ("rightmost", "bottom") else -1
        edge = {i: sign * b[axis + (2 if sign > 0 else 0)] for i, b in box.items()}
        centre = {i: sign * (b[axis] + b[axis + 2]) / 2 for i, b in box.items()}
        winners = {max(edge, key=edge.get), max(centre, key=centre.get)}
        assert len(winners) == 1 and len(candidates) >= 2, phrase
        (index,) = winners
        # Clearly first: ahead of every other candidate by at least two pixels in both senses.
        assert all(min(edge[index] - edge[i], centre[index] - centre[i]) >= 2 / 64 - 1e-6
                   for i in candidates if i != index), phrase  # fmt: skip
        return index, "position"
    sides = {i: b[2] - b[0] for i, b in box.items()}
    assert len(candidates) == 2 if word in ("bigger", "smaller") else len(candidates) >= 3, phrase
    extreme = (max if word in ("bigger", "biggest") else min)(sides.values())
    (index,) = [i for i, side in sides.items() if side == extreme]
    return index, "size"


def test_every_instruction_picks_exactly_one_object(samples):
    for s in every(samples):
        kind, parts = parse(s["instruction"])
        assert kind == s["kind"]
        if parts.get("corner"):
            assert (s["refer"], s["referent"], s["place"]) == ("corner", -1, parts["corner"])
        else:
            index, refer = resolve(parts["ref"], s["objects"])
            assert (index, refer) == (s["referent"], s["refer"]), s["instruction"]
        if kind != "add":
            assert s["object"] == s["referent"]
            before = s["objects"][s["object"]]
            assert (s["from_colour"], s["from_shape"]) == (before["colour"], before["shape"])
            expected = (parts.get("colour") or before["colour"], parts.get("shape") or before["shape"])
            assert (s["colour"], s["shape"]) == expected
            assert expected != (before["colour"], before["shape"]) or kind == "remove"
            continue
        assert (s["colour"], s["shape"], s["size"]) == (parts["colour"], parts["shape"], parts["size"])
        new = np.asarray(s["box"], np.float64)
        assert 0 <= new.min() and new.max() <= 1
        for obj in s["objects"]:  # the new object lands on empty background
            b = np.asarray(obj["box"])
            assert new[0] >= b[2] or b[0] >= new[2] or new[1] >= b[3] or b[1] >= new[3]
        if parts.get("corner"):
            vertical, horizontal = parts["corner"].split()
            assert (new[1] < 0.25 if vertical == "top" else new[3] > 0.75), s["instruction"]
            assert (new[0] < 0.25 if horizontal == "left" else new[2] > 0.75), s["instruction"]
            continue
        anchor = np.asarray(s["objects"][s["referent"]]["box"])
        centre, anchor_centre = (new[:2] + new[2:]) / 2, (anchor[:2] + anchor[2:]) / 2
        side = parts["side"] or parts["vertical"]
        axis = 0 if side in ("left", "right") else 1
        assert np.isclose(centre[1 - axis], anchor_centre[1 - axis])
        assert (new[axis + 2] < anchor[axis]) if side in ("left", "above") else (new[axis] > anchor[axis + 2])


def test_one_object_scenes_refer_by_attribute_and_the_demo_draws_them():
    """max_objects=1: position and size need two candidates, so only attribute (and corner)
    references are drawn; the demo's test split follows the config's eval spec."""
    from fireedit_jax import demo

    one = shapes.ShapesConfig(size=32, max_objects=1)
    drawn = [shapes.generate(one, "train", i) for i in range(40)]
    assert all(len(s["objects"]) == 1 for s in drawn)
    assert {s["refer"] for s in drawn} == {"attribute", "corner"}
    config = demo.demo_config(1, 8)
    config.data.eval.max_objects = 1
    tests = demo.test_samples(config, 4)
    assert [len(s["objects"]) for s in tests] == [1] * 4
    want = shapes.generate(shapes.ShapesConfig(size=32, max_objects=1), "test", 3)
    np.testing.assert_array_equal(tests[3]["source"], want["source"])


def test_kinds_restrict_the_edits_drawn():
    """ShapesConfig.kinds: a sub-task; a list (a config file's) is accepted, an unknown kind refused."""
    only = shapes.ShapesConfig(size=32, kinds=["colour", "remove"])
    assert only.kinds == ("colour", "remove")
    assert {shapes.generate(only, "train", i)["kind"] for i in range(40)} == {"colour", "remove"}
    for kinds in (("recolour",), ()):
        with pytest.raises(ValueError, match="colour, shape, remove, add"):
            shapes.ShapesConfig(kinds=kinds)


def test_heldout_pairs_are_only_produced_in_heldout(samples):
    for split in ("train", "test"):
        produced = {(s["colour"], s["shape"]) for s in samples[split]}
        assert not produced & shapes.HELDOUT_PAIRS
        assert len(produced) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(shapes.HELDOUT_PAIRS)
    heldout = samples["heldout"]
    assert {(s["colour"], s["shape"]) for s in heldout} == shapes.HELDOUT_PAIRS
    assert {s["kind"] for s in heldout} == set(shapes.KINDS)


# ---------------------------------------------------------------------------- metrics


def test_distances_on_known_cases():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (3, 16, 16, 3), np.uint8)
    assert np.all(metrics.l1(images, images) == 0) and np.all(metrics.l2(images, images) == 0)
    np.testing.assert_allclose(metrics.l1(images + 10, images), 10 / 255, rtol=1e-6)
    np.testing.assert_allclose(metrics.l2(images + 10, images), (10 / 255) ** 2, rtol=1e-5)
    zeros = np.zeros((2, 16, 16, 3), np.float32)
    boxes = np.asarray([[0.25, 0.25, 0.75, 0.75], [0, 0, 0.5, 1]], np.float32)
    shifted = zeros.copy()
    shifted[0, 4:12, 4:12] = 0.2  # exactly box 0
    shifted[1, :, 8:] = 0.3  # exactly outside box 1
    np.testing.assert_allclose(metrics.l1(shifted, zeros), [0.2 * 64 / 256, 0.3 * 0.5], rtol=1e-6)
    np.testing.assert_allclose(metrics.l1_outside(shifted, zeros, boxes), [0.0, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        metrics.l1(zeros, zeros[:, :8])


def test_background_is_far_from_every_palette_colour():
    low = shapes_render.BACKGROUND_TINT[0] - shapes_render.BACKGROUND_WOBBLE - 1
    high = shapes_render.BACKGROUND_TINT[1] + shapes_render.BACKGROUND_WOBBLE + 1
    for colour in shapes_render.PALETTE.values():
        nearest = np.clip(colour, low, high)
        assert np.linalg.norm(np.subtract(colour, nearest)) > metrics.COLOUR_TOLERANCE + 20


@pytest.mark.parametrize("size", [64, 32])
def test_success_of_target_and_of_copying_the_source(size, samples, samples_32):
    chosen = every(samples)[::3] if size == 64 else samples_32
    targets = np.stack([s["target"] for s in chosen])
    sources = np.stack([s["source"] for s in chosen])
    exact = metrics.evaluate(targets, targets, chosen)
    copied = metrics.evaluate(sources, targets, chosen)
    assert all(r["l1"] == r["l2"] == r["l1_outside"] == 0 for r in exact)
    assert all(r["l1_outside"] == 0 and r["l1"] > 0 for r in copied)  # only the box differs
    assert all(r["kept"] == 1.0 and r["specific"] == r["success"] for r in exact + copied)
    for kind in shapes.KINDS:
        assert np.mean([r["success"] for r in exact if r["kind"] == kind]) >= 0.99, kind
        assert np.mean([r["success"] for r in copied if r["kind"] == kind]) <= 0.01, kind
    summary = metrics.summarize(copied)
    assert summary["overall"]["count"] == len(chosen)
    assert set(summary["kind"]) == set(shapes.KINDS) and set(summary["refer"]) == set(shapes.REFERS)
    assert sum(r["count"] for r in summary["refer"].values()) == len(chosen)


def painted(sample, colour=None, shape=None):
    """The sample's target with the edited box repainted: `shape` in `colour` on the source's pixels."""
    out = sample["target"].copy()
    x0, y0, x1, y1 = (np.asarray(sample["box"]) * out.shape[0]).round().astype(int)
    region = out[y0:y1, x0:x1]
    region[shapes_render.shape_mask(sample["shape"], x1 - x0, y1 - y0)] = region[0, 0]  # the box corner: background
    new = shapes_render.shape_mask(shape or sample["shape"], x1 - x0, y1 - y0)
    region[new] = shapes_render.PALETTE[colour or sample["colour"]]
    return out


def first(samples, kind):
    return next(s for s in samples["train"] if s["kind"] == kind and s["size"] == "big")


def test_success_fails_for_the_wrong_edit(samples):
    colour, shape, remove, add = (first(samples, kind) for kind in shapes.KINDS)
    other_colour = next(c for c in shapes.COLOURS if c not in (colour["colour"], colour["from_colour"]))
    other_shape = next(s for s in shapes.SHAPES if s not in (shape["shape"], shape["from_shape"]))
    cases = [
        (colour, painted(colour), True),
        (colour, painted(colour, colour=other_colour), False),
        (shape, painted(shape, colour=other_colour), True),  # the shape is right, whatever its colour
        (shape, painted(shape, shape=other_shape), False),
        (add, painted(add, shape=next(s for s in shapes.SHAPES if s != add["shape"])), False),
        (add, painted(add, colour=next(c for c in shapes.COLOURS if c != add["colour"])), False),
    ]
    blot = remove["target"].copy()
    x0, y0, x1, y1 = (np.asarray(remove["box"]) * 64).round().astype(int)
    blot[y0:y1, x0:x1] = 0  # no palette colour left, but not background either
    cases.append((remove, blot, False))
    for sample, output, expected in cases:
        (record,) = metrics.evaluate(output[None], sample["target"][None], [sample])
        assert record["success"] == float(expected), (sample["instruction"], record)


def test_kept_counts_the_other_objects_an_edit_destroyed(samples):
    sample = next(s for s in samples["train"] if s["kind"] == "remove" and len(s["objects"]) >= 3)
    size = sample["target"].shape[0]
    others = [o for i, o in enumerate(sample["objects"]) if i != sample["object"]]
    wiped = sample["target"].copy()
    x0, y0, x1, y1 = (np.asarray(others[0]["box"]) * size).round().astype(int)
    wiped[y0:y1, x0:x1] = metrics.ring_colour(wiped, (x0, y0, x1, y1)) * 255  # another object: background
    (exact,) = metrics.evaluate(sample["target"][None], sample["target"][None], [sample])
    (record,) = metrics.evaluate(wiped[None], sample["target"][None], [sample])
    assert exact["success"] == exact["specific"] == exact["kept"] == 1.0
    assert record["success"] == 1.0 and record["specific"] == 0.0
    assert record["kept"] == pytest.approx(1 - 1 / len(others))


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_every_instruction(samples, tmp_path):
    tokenizer = shapes_words.build_tokenizer()
    instructions = [s["instruction"] for s in every(samples)]
    ids = tokenizer(instructions)["input_ids"]
    unk, bos, eos = tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (tokenizer.pad_token_id, unk, bos, eos) == (0, 1, 2, 3)
    for text, row in zip(instructions, ids):
        assert unk not in row and row[0] == bos and row[-1] == eos and len(row) == len(text.split()) + 2
        assert tokenizer.decode(row, skip_special_tokens=True) == text
    used = {w for text in instructions for w in text.split()}
    assert used == set(shapes_words.vocabulary())  # the vocabulary is exactly what the generator says
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(instructions[:50])["input_ids"] == ids[:50]
    assert loaded("Make THE red circle blue")["input_ids"] == tokenizer("make the red circle blue")["input_ids"]


def test_check_instruction_names_unknown_words():
    words = ["remove", "the", "leftmost", "red", "circle"]
    assert shapes_words.check_instruction("Remove the leftmost red circle") == words
    with pytest.raises(ValueError, match=r"pink, hexagon\. Known words: make, paint") as error:
        shapes_words.check_instruction("make the pink hexagon blue")
    assert all(word in str(error.value) for word in shapes_words.vocabulary())


# ---------------------------------------------------------------------------- source and files


def test_source_is_grain_compatible():
    import grain

    source = shapes.ShapeEditSource("test", 20, CONFIG_32)
    assert len(source) == 20
    reference = shapes.generate(CONFIG_32, "test", 7)
    for copy in (source, pickle.loads(pickle.dumps(source)), grain.MapDataset.source(source)):
        got = copy[7]
        assert got["instruction"] == reference["instruction"]
        np.testing.assert_array_equal(got["target"], reference["target"])
    with pytest.raises(IndexError):
        source[20]
    with pytest.raises(ValueError, match="unknown split"):
        shapes.ShapeEditSource("val")


def test_folder_jsonl_matches_the_samples(tmp_path):
    config = shapes.ShapesConfig(box_jitter=0.05, distractor_boxes=2)
    folder = shapes.write_folder(str(tmp_path), "heldout", 12, config)
    with open(os.path.join(folder, "samples.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 12
    for i, line in enumerate(lines):
        sample = shapes.generate(config, "heldout", i)
        for name in ("source", "target"):
            np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, line[name]))), sample[name])
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, line["mask"]))) > 127, sample["mask"])
        for name in ("boxes", "box"):
            np.testing.assert_array_equal(np.asarray(line[name], np.float32), sample[name])
        rest = {k: v for k, v in sample.items() if k not in ("source", "target", "mask", "boxes", "box")}
        assert {k: line[k] for k in rest} == rest
        assert set(line) == set(sample)
    records = JsonlSource(folder)  # the training pipeline reads the same folder
    assert len(records) == 12
    assert records[3].instruction == lines[3]["instruction"]
    np.testing.assert_array_equal(records[3].boxes, np.asarray(lines[3]["boxes"], np.float32))
    assert records[3].target_image == os.path.join(folder, lines[3]["target"])
    assert records[3].mask_image == os.path.join(folder, lines[3]["mask"])


def test_main_writes_splits_and_tokenizer(tmp_path, capsys):
    assert shapes.main(["--out", str(tmp_path), "--split", "train", "test", "--num", "3", "--size", "32"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["test", "tokenizer", "train"]
    assert len(os.listdir(tmp_path / "train" / "images")) == 9  # source, target, mask
    assert Image.open(tmp_path / "test" / "images" / "000002_target.png").size == (32, 32)
    assert "wrote 3 train samples" in capsys.readouterr().out


def test_cli_writes_the_folder_layout(tmp_path):
    from fireedit_jax import cli

    assert cli.main(["shapes", "--out", str(tmp_path), "--split", "test", "--num", "3"]) == 0
    lines = (tmp_path / "test" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "tokenizer").is_dir()
