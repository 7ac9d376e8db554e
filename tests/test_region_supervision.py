"""The region head of grounded editing: the predictor's proposals, cells and regressed box, its loss, the region it picks."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.models.region_predictor import (
    NEG_INF,
    RegionPrediction,
    RegionPredictor,
    RegionPredictorConfig,
    bounding_box_mask,
    box_coverage,
    box_pixels,
    edit_region,
    example_inputs,
)
from fireedit_jax.train import region_supervision as rs

HEAD = RegionPredictorConfig(image_dim=12, text_dim=10, width=16, num_heads=2, mlp_hidden=24, embed_dim=8, num_layers=2,
                             block_mlp=True, subpixel=2, coordinates=True, score_boxes=True)  # fmt: skip
GRID = 3


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, GRID * GRID, HEAD.image_dim)).astype(np.float32)
    text = rng.normal(size=(2, 4, HEAD.text_dim)).astype(np.float32)
    boxes = np.asarray([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.3, 0.9]]] * 2, np.float32)
    box_mask = np.asarray([[True, True, True], [True, True, False]])
    return image, text, np.ones((2, 4), bool), boxes, box_mask


@pytest.fixture(scope="module")
def head():
    params = flax.linen.meta.unbox(jax.jit(RegionPredictor(HEAD).init)(jax.random.key(0), *example_inputs(HEAD)))
    return params, jax.jit(RegionPredictor(HEAD).apply)


def test_shapes_and_padded_boxes(head):
    params, forward = head
    out = forward(params, *_inputs())
    assert out.logits.shape == (2, (GRID * 2) ** 2) and out.box_logits.shape == (2, 4) and out.box.shape == (2, 4)
    assert float(out.box_logits[1, 2]) == NEG_INF and np.all(np.asarray(out.box_logits[0]) > NEG_INF)
    assert np.all((np.asarray(out.box) >= 0) & (np.asarray(out.box) <= 1))
    assert np.all(np.asarray(out.box[:, 2:]) >= np.asarray(out.box[:, :2]))
    # a padded box changes nothing else: drop it, or move it anywhere
    image, text, text_mask, boxes, box_mask = _inputs()
    moved = boxes.copy()
    moved[1, 2] = [0.7, 0.0, 0.9, 0.2]
    again = forward(params, image, text, text_mask, moved, box_mask)
    fewer = forward(params, image[1:], text[1:], text_mask[1:], boxes[1:, :2], box_mask[1:, :2])
    np.testing.assert_allclose(again.logits, out.logits, atol=1e-6)
    np.testing.assert_allclose(fewer.box_logits[0, [0, 1, 2]], out.box_logits[1, [0, 1, 3]], atol=1e-5)
    np.testing.assert_allclose(fewer.box[0], out.box[1], atol=1e-5)
    # the instruction matters
    other = forward(params, image, text[::-1].copy(), text_mask, boxes, box_mask)
    assert np.abs(np.asarray(other.box_logits[0]) - np.asarray(out.box_logits[0])).max() > 1e-4


def test_sub_patch_cells_are_laid_out_row_major(head):
    """Patch (i, j)'s s × s logits land on cells (s·i … s·i + s − 1, s·j …) of the finer grid."""
    params, forward = head
    out = forward(params, *_inputs())
    tree = params["params"]
    image, text, text_mask, boxes, box_mask = _inputs()

    def capture(module, inputs, kwargs, context, _next):
        out = _next(*inputs, **kwargs)
        if module.name == "head_out":
            context.append(out)
        return out

    seen = []
    with flax.linen.intercept_methods(lambda f, args, kwargs, ctx: capture(ctx.module, args, kwargs, seen, f)):
        RegionPredictor(HEAD).apply({"params": tree}, image, text, text_mask, boxes, box_mask)
    per_patch = np.asarray(seen[0])[0].reshape(GRID, GRID, 2, 2)  # [i, j, a, b]
    cells = np.asarray(out.logits[0]).reshape(2 * GRID, 2 * GRID)
    for i, j, a, b in [(0, 0, 0, 1), (1, 2, 1, 0), (2, 1, 1, 1)]:
        assert cells[2 * i + a, 2 * j + b] == pytest.approx(per_patch[i, j, a, b], abs=1e-6)


def test_given_box_tokens_replace_pooled_ones():
    config = RegionPredictorConfig(**{**HEAD.__dict__, "box_dim": 6})
    inputs = example_inputs(config, patches=GRID * GRID)
    params = flax.linen.meta.unbox(RegionPredictor(config).init(jax.random.key(1), *inputs))
    assert "box_proj" in params["params"]
    image, text, text_mask, boxes, box_mask = _inputs()
    tokens = np.random.default_rng(3).normal(size=(2, 3, 6)).astype(np.float32)
    a = RegionPredictor(config).apply(params, image, text, text_mask, boxes, box_mask, tokens)
    b = RegionPredictor(config).apply(params, image, text, text_mask, boxes, box_mask, tokens + 1.0)
    assert np.abs(np.asarray(a.box_logits[0]) - np.asarray(b.box_logits[0])).max() > 1e-4
    with pytest.raises(ValueError, match="box tokens"):
        RegionPredictor(config).apply(params, image, text, text_mask, boxes, box_mask)


def test_box_coverage_pixels_and_bounding_box():
    cover = np.asarray(box_coverage(jnp.asarray([[[0.25, 0.0, 0.75, 0.5]]]), 2, 4))[0, 0].reshape(2, 4)
    np.testing.assert_allclose(cover, [[0, 1, 1, 0], [0, 0, 0, 0]])
    cover = np.asarray(box_coverage(jnp.asarray([[[0.1, 0.0, 0.5, 0.5]]]), 2))[0, 0].reshape(2, 2)
    np.testing.assert_allclose(cover, [[0.8, 0.0], [0.0, 0.0]], atol=1e-6)
    pixels = np.asarray(box_pixels(jnp.asarray([[0.25, 0.5, 0.5, 1.0], [0.3, 0.0, 0.4, 0.2]]), 4, 8))
    np.testing.assert_array_equal(np.nonzero(pixels[0]), np.nonzero(np.pad(np.ones((2, 2)), ((2, 0), (2, 4)))))
    assert pixels[1].sum() == 1 and pixels[1, 0, 2] == 1  # only the pixel whose centre (2.5 / 8) is inside
    mask = np.zeros((2, 5, 6), np.float32)
    mask[0, 1, 1] = mask[0, 3, 4] = 1
    box = np.asarray(bounding_box_mask(jnp.asarray(mask)))
    assert box[0].sum() == 12 and box[0, 1:4, 1:5].all() and box[1].sum() == 0


def test_edit_region_picks_the_box_or_the_regressed_one():
    boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]] * 3)
    logits = jnp.zeros((3, 16))
    box_logits = jnp.asarray([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 4.0]])
    regressed = jnp.asarray([[0.0, 0.5, 0.25, 1.0]] * 3)
    prediction = RegionPrediction(logits, None, None, None, box_logits=box_logits, box=regressed)
    region = np.asarray(edit_region(prediction, 4, 4, boxes))
    np.testing.assert_array_equal(region[0], np.pad(np.ones((2, 2)), ((0, 2), (0, 2))))
    np.testing.assert_array_equal(region[1], np.pad(np.ones((2, 2)), ((2, 0), (2, 0))))
    np.testing.assert_array_equal(region[2], np.pad(np.ones((2, 1)), ((2, 0), (0, 3))))
    cells = jnp.asarray([[5.0, -5.0, -5.0, -5.0]])  # no box scores: the cells above the threshold
    plain = RegionPrediction(cells, None, None, None)
    np.testing.assert_array_equal(np.asarray(edit_region(plain, 4, 4)), [np.pad(np.ones((2, 2)), ((0, 2), (0, 2)))])


def test_targets_boxes_and_labels():
    mask = np.zeros((3, 8, 8, 1), np.float32)
    mask[0, 2:4, 4:8] = 1  # the second proposal exactly
    mask[1, 6:8, 0:2] = 1  # no proposal near it: "no box"
    np.testing.assert_allclose(np.asarray(rs.cell_targets(mask, 4))[0].reshape(4, 4)[1], [0, 0, 1, 1])
    boxes, present = rs.bounding_boxes(jnp.asarray(mask))
    np.testing.assert_allclose(boxes[0], [0.5, 0.25, 1.0, 0.5])
    assert list(np.asarray(present)) == [True, True, False]
    proposals = jnp.asarray([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.5], [0.5, 0.25, 1.0, 0.5]]] * 3)
    box_mask = jnp.asarray([[True, True, False]] * 3)
    assert list(np.asarray(rs.proposal_labels(proposals, box_mask, jnp.asarray(mask)))) == [1, 3, 3]  # R = 3: no box
    np.testing.assert_allclose(rs.box_iou(proposals[:1], boxes[:1])[0], [0.0, 1.0, 1.0])
    a, b = jnp.asarray([[0.0, 0.0, 0.5, 0.5]]), jnp.asarray([[0.5, 0.5, 1.0, 1.0]])
    assert float(rs.generalized_iou(a, a)[0]) == pytest.approx(1.0)
    assert float(rs.generalized_iou(a, b)[0]) == pytest.approx(-0.5)  # IoU 0, hull 1, union 0.5


def test_region_loss_terms_and_gradients(head):
    params, _ = head
    image, text, text_mask, boxes, box_mask = _inputs()
    mask = np.zeros((2, 12, 12, 1), np.float32)
    mask[0, 0:6, 0:6] = 1  # the first proposal: its label
    mask[1, 1:3, 8:11] = 1  # an addition: "no box", the regressed box trained towards it

    def loss(p, weights=None):
        out = RegionPredictor(HEAD).apply(p, image, text, text_mask, boxes, box_mask)
        return rs.region_supervision(out.logits, mask, GRID * 2, box_logits=out.box_logits, box=out.box, boxes=boxes,
                                     box_mask=box_mask, weights=weights)  # fmt: skip

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one program for every weighting
    (total, parts), grads = step(params, jnp.ones(2))
    want = parts["region_bce"] + parts["region_dice"] + parts["region_boxes"] + parts["region_box_l1"] + parts["region_giou"]
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert float(total) == pytest.approx(float(jax.jit(loss)(params)[0]), rel=1e-6)  # weights 1 = no weights
    flat = flax.traverse_util.flatten_dict(grads["params"])
    for path in [("no_box",), ("box_regression", "kernel"), ("box_out", "kernel"),
                 ("head_out", "kernel"), ("block_1", "mlp_out", "kernel"), ("coordinate_proj", "kernel")]:  # fmt: skip
        assert float(jnp.linalg.norm(flat[path])) > 1e-6, path
    (dropped, _), _ = step(params, jnp.asarray([1.0, 0.0]))
    alone = RegionPredictor(HEAD).apply(params, image[:1], text[:1], text_mask[:1], boxes[:1], box_mask[:1])
    want, _ = rs.region_supervision(alone.logits, mask[:1], GRID * 2, box_logits=alone.box_logits, box=alone.box,
                                    boxes=boxes[:1], box_mask=box_mask[:1])  # fmt: skip
    assert float(dropped) == pytest.approx(float(want), rel=1e-5)
