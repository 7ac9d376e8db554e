"""Transforms (boxes follow crop and flip, buckets, tokenisation) and the grain pipeline
(determinism, exact resume, process shards, mixing, bad records, global arrays)."""

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec
from PIL import Image, ImageDraw
from test_data_sources import png_bytes, write_ip2p_parquet

from fireedit_jax.data import pipeline
from fireedit_jax.data.records import BadRecord, EditRecord, Task
from fireedit_jax.data.parquet_source import instructpix2pix_source
from fireedit_jax.data.transforms import (
    EditTransform,
    TextField,
    clip_text_field,
    crop_boxes,
    decode_image,
    swap_left_right,
)

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "move", "the", "left", "right", "cup", "to", "edit", "a", "b"]
VOCAB = {word: i for i, word in enumerate(WORDS)}


def word_ids(text: str) -> list[int]:
    """The plainest tokenizer the protocol takes: a callable text → ids."""
    return [VOCAB.get(word, VOCAB["<unk>"]) for word in text.split()]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer built offline that adds <s> … </s> like CLIP's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class ListSource:
    def __init__(self, name, records):
        self.name, self.records = name, records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def make_records(n: int, seed: int = 0) -> list[EditRecord]:
    images = [png_bytes(seed * 1000 + k, (20, 16)) for k in range(2 * n)]
    box = np.array([[0.1, 0.1, 0.8, 0.9]], np.float32)
    return [
        EditRecord(f"r{i}", images[2 * i], "edit a" + " b" * (i % 5), images[2 * i + 1], boxes=np.tile(box, (i % 4, 1)))
        for i in range(n)
    ]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------- transforms


def test_swap_left_right():
    assert swap_left_right("Move the left cup to the RIGHT") == "Move the right cup to the LEFT"
    assert swap_left_right("the leftmost car, right-hand side; Left") == "the rightmost car, left-hand side; Right"
    assert swap_left_right("copyright leftover alright") == "copyright leftover alright"


def _render(size, box, value) -> bytes:
    image = Image.new("RGB", size)
    w, h = size
    # a box edge at x covers the pixels [x0·W, x1·W)
    ImageDraw.Draw(image).rectangle([box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1], fill=(value,) * 3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _painted_box(pixels: np.ndarray, threshold: int) -> np.ndarray | None:
    """xyxy pixel edges of the pixels above threshold."""
    ys, xs = np.nonzero(pixels[..., 0] > threshold)
    return None if len(xs) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("size", [(120, 80), (80, 120)])
def test_crop_and_flip_keep_boxes_on_the_pixels(size):
    box = np.array([0.25, 0.2, 0.6, 0.85], np.float32)
    record = EditRecord(
        "render", _render(size, box, 255), "move the left cup to the right", _render(size, box, 160), boxes=box[None]
    )
    transform = EditTransform(resolution=64, min_crop_scale=0.5, texts=(TextField("instruction", word_ids, (8,)),))
    flips = set()
    for seed in range(12):
        example, _ = transform(record, np.random.default_rng(seed))
        flipped = example["instruction_ids"][2] == VOCAB["right"]
        flips.add(bool(flipped))
        np.testing.assert_array_equal(
            example["instruction_ids"], word_ids(swap_left_right(record.instruction) if flipped else record.instruction)
        )
        expected = example["boxes"][0] * 64 if len(example["boxes"]) else None
        for key, threshold in (("source", 127), ("target", 80)):
            painted = _painted_box(example[key], threshold)
            if expected is None:  # the crop missed the box: so do the pixels
                assert painted is None or np.prod(painted[2:] - painted[:2]) <= 2, (seed, key)
            else:
                np.testing.assert_allclose(painted, expected, atol=1.0, err_msg=f"seed {seed} {key}")
    assert flips == {True, False}  # both cases were checked

    # without a generator: the centred square, no flip
    example, _ = transform(record)
    half = 40 / np.array(size * 2)  # the largest square: 80 pixels
    centre = crop_boxes(box[None], 0.5 + half * np.array([-1, -1, 1, 1]))
    np.testing.assert_allclose(example["boxes"], centre, atol=1e-6)
    np.testing.assert_allclose(_painted_box(example["source"], 127), centre[0] * 64, atol=1.0)


def test_decode_rgb_and_bad_bytes():
    buffer = io.BytesIO()
    Image.new("LA", (5, 4), (10, 255)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).mode == "RGB"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, "JPEG")
    assert decode_image(buffer.getvalue(), min_side=20).size == (32, 24)  # JPEG scaled by 1/2, not 1/4
    assert decode_image(buffer.getvalue(), min_side=30).size == (64, 48)
    with pytest.raises(BadRecord, match="r7: source image cannot be decoded"):
        decode_image(png_bytes(0)[:60], "r7: source image")
    with pytest.raises(BadRecord, match="cannot be decoded"):
        decode_image("/nonexistent/x.png")


def test_tokenizer_protocols_buckets_and_truncation(hf_tokenizer):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    texts = ["move the cup", "move the left cup to the right", "cup " * 20]
    want = [word_ids(t) for t in texts]
    for tokenizer in (word_ids, backend, hf_tokenizer):  # a callable, `tokenizers`, transformers
        field = TextField("instruction", tokenizer, (4, 8, 16))
        encoded = [field.encode(t) for t in texts]
        for (ids, cut), ids_wanted in zip(encoded, want):
            np.testing.assert_array_equal(ids, ids_wanted[:16])
            assert cut == (len(ids_wanted) > 16)
    transform = EditTransform(texts=(TextField("instruction", word_ids, (4, 8, 16), pad_id=VOCAB["<pad>"]),))
    for chosen, length in (([0], 4), ([0, 1], 8), ([0, 1, 2], 16)):
        batch = transform.collate([{"instruction_ids": field.encode(texts[i])[0]} for i in chosen])
        assert batch["instruction_ids"].shape == (len(chosen), length)
        np.testing.assert_array_equal(batch["instruction_mask"].sum(1), [min(len(want[i]), 16) for i in chosen])
        np.testing.assert_array_equal(batch["instruction_ids"][0], want[0] + [0] * (length - 3))

    # CLIP text targets: <s> caption </s>, padded to 77; a long caption keeps its </s>
    clip = clip_text_field(hf_tokenizer, length=8)
    ids, cut = clip.encode("move the cup")
    np.testing.assert_array_equal(ids, [2, 4, 5, 8, 3])
    ids, cut = clip.encode("cup " * 20)
    assert cut and list(ids) == [2] + [8] * 6 + [3]
    batch = EditTransform(texts=(clip,)).collate([{"clip_ids": clip.encode("move the cup")[0]}])
    np.testing.assert_array_equal(batch["clip_ids"], [[2, 4, 5, 8, 3, 0, 0, 0]])
    assert clip_text_field(hf_tokenizer).buckets == (77,)
    with pytest.raises(BadRecord, match="no target_caption for the clip tokens"):
        EditTransform(texts=(clip,))(EditRecord("k", png_bytes(0), "move", png_bytes(1)))


def test_vqa_and_box_buckets():
    vqa = EditRecord("q", png_bytes(1), "what is it?", answer="a cup", task=Task.VQA)
    many = EditRecord("m", png_bytes(2), "x", png_bytes(3), boxes=np.tile([[0.0, 0.0, 1.0, 1.0]], (130, 1)))
    transform = EditTransform(resolution=8, box_buckets=(0, 8, 32, 100))
    example, truncated = transform(vqa)
    assert not example["target"].any() and truncated == ()
    assert (example["task"], example["vlm_weight"], example["diffusion_weight"]) == (Task.VQA, 1.0, 0.0)
    example_many, truncated = transform(many)
    assert truncated == ("boxes",) and example_many["boxes"].shape == (100, 4)
    assert transform.collate([example])["boxes"].shape == (1, 0, 4)
    three = dict(example, boxes=np.ones((3, 4), np.float32))
    batch = transform.collate([example, three])
    assert batch["boxes"].shape == (2, 8, 4)
    np.testing.assert_array_equal(batch["box_mask"].sum(1), [0, 3])
    assert transform.collate([three, example_many])["boxes"].shape == (2, 100, 4)


def test_caption_examples_have_no_target_and_batch_only_with_their_kind():
    caption = EditRecord("c", png_bytes(4), "make the left cup b", source_caption="a left cup",
                         target_caption="a b left cup", task=Task.CAPTION)  # fmt: skip
    transform = EditTransform(resolution=8, texts=(TextField("caption", word_ids, (4, 8), source="target_caption"),))
    example, _ = transform(caption)
    flipped, _ = dataclasses.replace(transform, flip_probability=1.0)(caption, np.random.default_rng(0))
    assert "target" not in example and "target" not in flipped
    assert (example["task"], example["vlm_weight"], example["diffusion_weight"]) == (Task.CAPTION, 0.0, 0.0)
    batch = transform.collate([example, flipped])
    assert "target" not in batch and batch["source"].shape == (2, 8, 8, 3) and batch["caption_ids"].shape == (2, 4)
    np.testing.assert_array_equal(batch["caption_ids"][:, 2], [VOCAB["left"], VOCAB["right"]])  # flipped texts
    edit, _ = transform(EditRecord("e", png_bytes(5), "edit a", png_bytes(6), target_caption="a"))
    with pytest.raises(ValueError, match="a batch mixes examples with and without target \\(tasks caption, edit\\)"):
        transform.collate([example, edit])


# ------------------------------------------------------------------ pipeline


def _iterator(sources, **kwargs):
    options = dict(transform=EditTransform(resolution=8), batch_size=4, seed=0, shard=grain.sharding.NoSharding())
    options.update(kwargs)
    return pipeline.make_iterator(sources, options.pop("transform"), **options)


def test_same_seed_same_batches_and_exact_resume():
    source = ListSource("list", make_records(24))
    first, second = _iterator([source], seed=3), _iterator([source], seed=3)
    batches = take(first, 8)  # two epochs: reshuffled, freshly augmented
    assert_same_batches(batches, take(second, 8))
    epochs = [np.concatenate([b["record_index"] for b in batches[k : k + 6]]) for k in (0, 6)]
    assert sorted(epochs[0]) == list(range(24)) and not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(take(_iterator([source], seed=4), 1)[0]["record_index"], batches[0]["record_index"])

    # restore mid-epoch (after 2 of 6 batches), through JSON as a checkpoint would
    resumed = _iterator([source], seed=3)
    take(resumed, 5)  # a different position, overwritten by set_state
    iterator = _iterator([source], seed=3)
    take(iterator, 2)
    resumed.set_state(json.loads(json.dumps(iterator.get_state())))
    assert_same_batches(take(resumed, 5), batches[2:7])
    assert resumed.metrics() == {"data/read/list": 28, "data/skipped/list": 0}


def test_process_shards_cover_the_data_once():
    source = ListSource("list", make_records(11))
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(index, 2)
        batches = _iterator([source], batch_size=1, num_epochs=1, shard=shard)
        seen.append([int(b["record_index"][0]) for b in batches])
    assert sorted(seen[0] + seen[1]) == list(range(11))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == 6
    assert seen[0] != sorted(seen[0])  # shuffled within the shard


def test_weighted_mixture_and_evaluation_order():
    a, b = ListSource("a", make_records(40)), ListSource("b", make_records(40, seed=1))
    batches = take(_iterator([a, b], weights=[3, 1], batch_size=8), 4)
    which = np.concatenate([batch["source_index"] for batch in batches])
    assert (which == 0).sum() == 24 and (which == 1).sum() == 8
    with pytest.raises(ValueError, match="distinct"):
        _iterator([a, ListSource("a", [])])
    # evaluation: file order, the centred crop
    batch = take(_iterator([a], shuffle=False, augment=False), 1)[0]
    np.testing.assert_array_equal(batch["record_index"], [0, 1, 2, 3])
    example, _ = EditTransform(resolution=8)(a[2])
    np.testing.assert_array_equal(batch["source"][2], example["source"])


def test_texts_in_batches_and_truncation_counted():
    records = make_records(8)
    records[5] = EditRecord("long", records[5].source_image, "edit" + " b" * 30, records[5].target_image)
    transform = EditTransform(resolution=8, texts=(TextField("instruction", word_ids, (4, 8)),))
    with pytest.warns(UserWarning, match="1 instruction entries truncated"):
        batches = list(_iterator([ListSource("list", records)], transform=transform, num_epochs=1, shuffle=False))
    assert [b["instruction_ids"].shape for b in batches] == [(4, 8), (4, 8)]
    np.testing.assert_array_equal(batches[0]["instruction_mask"].sum(1), [2, 3, 4, 5])
    assert batches[1]["instruction_mask"][1].sum() == 8


def _corrupt_parquet(path, corrupt: set[int], n: int = 8):
    images = [(png_bytes(2 * i, (20, 16)), png_bytes(2 * i + 1, (20, 16))) for i in range(n)]
    images = [(src[:50] if i in corrupt else src, tgt) for i, (src, tgt) in enumerate(images)]
    write_ip2p_parquet(path, images, row_group_size=3)
    return instructpix2pix_source(path)


def test_corrupt_image_skipped_counted_and_threshold(tmp_path):
    source = _corrupt_parquet(str(tmp_path / "one_bad.parquet"), {3})
    batches = _iterator([source], batch_size=1, num_epochs=1, min_records=8, max_skip_fraction=0.2)
    got = [int(b["record_index"][0]) for b in batches]
    assert sorted(got) == [0, 1, 2, 4, 5, 6, 7]
    iterator = _iterator([source], batch_size=7, num_epochs=1, min_records=100)
    next(iterator)
    assert iterator.metrics() == {"data/read/instructpix2pix": 8, "data/skipped/instructpix2pix": 1}

    source = _corrupt_parquet(str(tmp_path / "half_bad.parquet"), {0, 2, 4, 6})
    iterator = _iterator([source], batch_size=2, min_records=6, max_skip_fraction=0.25)
    with pytest.raises(pipeline.DataError, match=r"'instructpix2pix': \d of \d records .* max_skip_fraction=25.0%"):
        take(iterator, 10)


def test_worker_processes_resume_exactly_and_report_bad_sources(tmp_path):
    source = _corrupt_parquet(str(tmp_path / "data.parquet"), {5}, n=16)
    options = dict(batch_size=2, seed=1, min_records=1, max_skip_fraction=0.5)
    iterator = _iterator([source], **options, num_workers=2)
    reference = take(iterator, 3)
    state = iterator.get_state()
    reference += take(iterator, 3)
    iterator.close()
    resumed = _iterator([source], **options, num_workers=2)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), reference[3:])
    assert resumed.metrics() == iterator.metrics()
    assert iterator.metrics()["data/read/instructpix2pix"] - iterator.metrics()["data/skipped/instructpix2pix"] == 12
    resumed.close()

    bad = _corrupt_parquet(str(tmp_path / "bad.parquet"), set(range(8)))
    iterator = _iterator([bad], batch_size=2, min_records=2, num_workers=1)
    with pytest.raises(pipeline.DataError, match="source 'instructpix2pix': 2 of 2 records"):
        take(iterator, 1)
    iterator.close()


def test_global_batch_on_the_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    transform = EditTransform(resolution=8, texts=(TextField("instruction", word_ids, (4, 8)),))
    local = take(_iterator([ListSource("list", make_records(16))], transform=transform, batch_size=8), 1)[0]
    arrays = pipeline.make_global_batch(local, mesh, ("data", "fsdp"))
    assert arrays.keys() == local.keys()
    for key, array in arrays.items():
        assert array.sharding.spec == PartitionSpec(("data", "fsdp")) and array.dtype == local[key].dtype
        np.testing.assert_array_equal(np.asarray(array), local[key])
        assert array.addressable_shards[0].data.shape == (1,) + local[key].shape[1:]

    # other processes' buckets: padded up with each entry's pad value
    padded = pipeline.pad_to_shapes(
        {"instruction_ids": np.ones((2, 4), np.int32), "boxes": np.ones((2, 0, 4), np.float32)},
        {"instruction_ids": [8], "boxes": [8, 4]},
        {"instruction_ids": 7},
    )
    np.testing.assert_array_equal(padded["instruction_ids"][:, 4:], 7)
    assert padded["boxes"].shape == (2, 8, 4) and not padded["boxes"].any()


_TWO_PROCESSES = """
import os, sys
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from fireedit_jax.data.pipeline import make_global_batch
index = int(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=index)
mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
local = {"instruction_ids": np.full((2, 4 + 4 * index), index + 1, np.int32), "task": np.full(2, index, np.int32)}
ids = make_global_batch(local, mesh, pad_values={"instruction_ids": 7})["instruction_ids"]
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(ids)
print("RESULT", list(ids.shape), int(total), np.asarray(ids.addressable_shards[0].data).tolist())
"""


def test_global_batch_across_two_processes_agrees_on_buckets():
    """Process 0 has 4-token rows, process 1 8-token rows: both become 8, padded with 7."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    runs = [
        subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(i), port], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    results = [next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("RESULT")) for out in outputs]
    # global [4, 8]: 2 rows of (4 × 1 + 4 × 7) and 2 rows of 8 × 2
    assert results == ["[4, 8] 96 [[1, 1, 1, 1, 7, 7, 7, 7]]", "[4, 8] 96 [[2, 2, 2, 2, 2, 2, 2, 2]]"]
