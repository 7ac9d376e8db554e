"""Region targets from edit pairs: a record's mask where it has one, else the pair's difference mask."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fireedit_jax.data import parquet_source, shapes
from fireedit_jax.data.region_targets import difference_mask
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.train import inputs
from fireedit_jax.train.run import load_config

LATENT_CELL = 2  # pixels per latent cell of the ShapeEdit configs (pixel unshuffle by 2)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image feature


def test_shapes_difference_mask_finds_every_kinds_box():
    """On ShapeEdit the target differs from the source only inside the edited box: the difference mask's
    box is the edit's within one latent cell, for every kind (small shape changes included: a 5-pixel
    circle made a square differs in 4 scattered corner pixels)."""
    config = shapes.ShapesConfig(size=32)
    worst = {}
    for index in range(240):
        sample = shapes.generate(config, "train", index)
        mask = difference_mask(sample["source"], sample["target"])
        ys, xs = np.nonzero(mask)
        assert len(xs), sample["instruction"]
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        edit = np.round(np.asarray(sample["box"]) * config.size)
        worst[sample["kind"]] = max(worst.get(sample["kind"], 0), int(np.abs(found - edit).max()))
    assert set(worst) == set(shapes.KINDS)
    assert max(worst.values()) <= LATENT_CELL, worst


def test_difference_mask_drops_specks_keeps_strokes_and_dilates():
    source = np.full((20, 20, 3), 128, np.uint8)
    target = source.copy()
    target[3, 3] += 60  # one speck: dropped
    target[10:13, 4:16, 0] = 250  # a stroke 3 × 12: kept, grown by one pixel
    target[17, 17, 1] += 10  # below the threshold
    mask = difference_mask(source, target)
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (9, 13, 3, 16)
    assert not mask[3, 3] and not mask[17, 17]
    assert not difference_mask(source, source).any()


def _png(pixels: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return {"bytes": buffer.getvalue(), "path": "x.png"}


def test_magicbrush_pairs_with_and_without_masks_reach_the_batch(tmp_path):
    """A MagicBrush-format parquet, one row with its annotated mask and one without: the grounded loss's
    batches carry the record's mask for the first and the pair's difference mask for the second."""
    rng = np.random.default_rng(0)
    source = rng.integers(60, 200, (40, 40, 3)).astype(np.uint8)
    target = source.copy()
    target[8:20, 24:36] = (250, 20, 20)  # the edit: a red block top right
    given = np.zeros((40, 40), np.uint8)
    given[20:40, 0:20] = 255  # an annotation elsewhere (bottom left), so that it is told apart
    rows = [
        {"img_id": "1", "turn_index": 1, "source_img": _png(source), "mask_img": _png(given), "instruction": "add a red square",
         "target_img": _png(target)},
        {"img_id": "2", "turn_index": 1, "source_img": _png(source), "mask_img": None, "instruction": "add a red square",
         "target_img": _png(target)},
    ]  # fmt: skip
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE),
                        ("mask_img", IMAGE), ("instruction", pa.string()), ("target_img", IMAGE)])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema), tmp_path / "mb.parquet")

    config = load_config("configs/shapes_grounded.py")
    config.data.sources = {"mb": {"kind": "magicbrush", "path": str(tmp_path / "mb.parquet")}}
    model = EditModel.from_config(config.model)
    transform = inputs.make_transform(config, model, inputs.make_tokenizer(config.data.tokenizer))
    records = parquet_source.magicbrush_source(str(tmp_path / "mb.parquet"))
    with_mask, without = (transform(records[i])[0]["mask"][..., 0] for i in range(2))
    size = config.resolution
    assert with_mask.shape == (size, size) and with_mask.dtype == np.uint8
    np.testing.assert_array_equal(with_mask, np.asarray(Image.fromarray(given).resize((size, size))) >= 128)
    ys, xs = np.nonzero(without)  # the red block (8:20, 24:36 of 40) at 32 px, grown by a pixel
    assert abs(ys.min() - 8 * size / 40) <= 2 and abs(ys.max() + 1 - 20 * size / 40) <= 2
    assert abs(xs.min() - 24 * size / 40) <= 2 and abs(xs.max() + 1 - 36 * size / 40) <= 2

    iterator = inputs.make_train_iterator(config, transform, batch_size=2)
    batch = next(iterator)
    assert batch["mask"].shape == (2, size, size, 1)
    found = {tuple(np.nonzero(m[..., 0])[0][[0, -1]]) for m in batch["mask"]}
    assert found == {tuple(np.nonzero(with_mask)[0][[0, -1]]), tuple(np.nonzero(without)[0][[0, -1]])}
    assert {"region_ids", "boxes", "box_mask", "source", "target", "input_ids"} <= set(batch)
