"""Beyond Editing Pairs' region losses against hand computations on planted vectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.train.region_losses import (
    clip_guidance,
    contrastive,
    cosine_distance,
    directional,
    region_loss_parts,
    self_similarity,
    semantic_alignment,
    structural,
)

X, Y = np.array([1.0, 0.0, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)


def _batch(*rows):
    return jnp.asarray(np.stack(rows))


def test_cosine_distance_of_known_angles():
    a = _batch(X, X, X, X + Y)
    b = _batch(3 * X, Y, -2 * X, X)  # parallel, orthogonal, opposite, 45°
    np.testing.assert_allclose(cosine_distance(a, b), [0.0, 1.0, 2.0, 1.0 - 1.0 / math.sqrt(2)], atol=1e-6)


def test_cosine_distance_invariant_to_positive_scaling_and_safe_at_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 4, 5)).astype(np.float32)
    want = cosine_distance(a, b)
    scale = rng.uniform(0.01, 100.0, size=(4, 1)).astype(np.float32)
    np.testing.assert_allclose(cosine_distance(a * scale, b), want, rtol=1e-5)
    np.testing.assert_allclose(cosine_distance(a, b * scale[::-1]), want, rtol=1e-5)
    np.testing.assert_allclose(cosine_distance(-a, b), 2.0 - want, rtol=1e-5)
    zero = jnp.zeros((1, 5))
    assert float(cosine_distance(zero, b[:1])[0]) == 1.0
    grad = jax.grad(lambda z: cosine_distance(z, b[:1]).sum())(zero)
    assert np.all(np.isfinite(grad))


def test_semantic_alignment_sums_both_terms_and_averages_the_batch():
    # example 0: g(F_fused) ∥ e(c_tgt) (0), g(F_I) ⊥ e(c_src) (1); example 1: opposite (2), parallel (0).
    g_fused, text_target = _batch(X, X), _batch(2 * X, -X)
    g_image, text_source = _batch(Y, Y), _batch(X, 5 * Y)
    loss = semantic_alignment(g_fused, g_image, text_target, text_source)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, ((0.0 + 1.0) + (2.0 + 0.0)) / 2, atol=1e-6)


def test_clip_guidance():
    np.testing.assert_allclose(clip_guidance(_batch(X, X), _batch(-X, Y)), (2.0 + 1.0) / 2, atol=1e-6)


def test_directional_is_zero_when_the_image_moves_as_the_text():
    rng = np.random.default_rng(1)
    image_source, text_source, text_target = rng.normal(size=(3, 2, 6)).astype(np.float32)
    text_change = text_target - text_source
    np.testing.assert_allclose(directional(image_source, image_source + 0.3 * text_change, text_source, text_target),
                               0.0, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(directional(image_source, image_source - text_change, text_source, text_target),
                               2.0, atol=1e-6)  # fmt: skip
    # Swapping the roles of source and target reverses both directions: the loss is unchanged.
    image_edit = rng.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(directional(image_edit, image_source, text_target, text_source),
                               directional(image_source, image_edit, text_source, text_target), rtol=1e-6)  # fmt: skip


def test_directional_hand_computation():
    # image moves along X, text along X + Y: cos = 1/√2.
    loss = directional(_batch(Y), _batch(Y + 2 * X), _batch(X), _batch(2 * X + Y))
    np.testing.assert_allclose(loss, 1.0 - 1.0 / math.sqrt(2), atol=1e-6)


def test_self_similarity_of_two_patches():
    patches = jnp.asarray([[[1.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]: 45° apart
    c = 1.0 / math.sqrt(2)
    np.testing.assert_allclose(self_similarity(patches), [[[1.0, c], [c, 1.0]]], atol=1e-6)
    # Invariant to each patch's positive scale and to a rotation of the feature space.
    rotation = np.array([[0.6, -0.8], [0.8, 0.6]], np.float32)
    scaled = patches * jnp.asarray([[[3.0], [0.1]]])
    np.testing.assert_allclose(self_similarity(scaled @ rotation), self_similarity(patches), atol=1e-6)


def test_structural_is_the_mean_squared_difference_of_self_similarities():
    source = jnp.asarray([[[1.0, 0.0], [1.0, 1.0]]])
    edit = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
    # S_src off-diagonal 1/√2, S_edit 0: two entries of (1/√2)² = 1/2 among four.
    np.testing.assert_allclose(structural(source, edit), 0.25, atol=1e-6)
    np.testing.assert_allclose(structural(source, 7.0 * source), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_region_loss_parts_weights_each_part(dtype):
    rng = np.random.default_rng(2)
    vectors = {name: jnp.asarray(rng.normal(size=(3, 8)), dtype)
               for name in ("g_fused", "g_image", "text_source", "text_target", "image_source", "image_edit")}
    patches = {name: jnp.asarray(rng.normal(size=(3, 5, 4)), dtype) for name in ("patches_source", "patches_edit")}
    weights = dict(lambda_sa=0.5, lambda_clip=2.0, lambda_guidance=3.0, lambda_directional=0.25, lambda_structural=10.0)
    total, parts = region_loss_parts(**vectors, **patches, **weights)

    v = {name: x.astype(jnp.float32) for name, x in {**vectors, **patches}.items()}
    want = {
        "semantic_alignment": semantic_alignment(v["g_fused"], v["g_image"], v["text_target"], v["text_source"]),
        "clip_guidance": clip_guidance(v["image_edit"], v["text_target"]),
        "directional": directional(v["image_source"], v["image_edit"], v["text_source"], v["text_target"]),
        "structural": structural(v["patches_source"], v["patches_edit"]),
    }
    want["clip"] = 3.0 * want["clip_guidance"] + 0.25 * want["directional"] + 10.0 * want["structural"]
    assert set(parts) == set(want)
    for name, value in parts.items():
        assert value.dtype == jnp.float32 and value.shape == ()
        np.testing.assert_allclose(value, want[name], rtol=1e-5)
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(total, 0.5 * want["semantic_alignment"] + 2.0 * want["clip"], rtol=1e-5)


def test_contrastive_is_the_mean_of_both_cross_entropies():
    images = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    texts = jnp.asarray([[3.0, 0.0], [1.0, 1.0]])  # cos: [[1, 1/√2], [0, 1/√2]]
    cos = np.array([[1.0, 1 / np.sqrt(2)], [0.0, 1 / np.sqrt(2)]]) / 0.5
    rows = -np.mean([cos[0, 0] - np.log(np.exp(cos[0]).sum()), cos[1, 1] - np.log(np.exp(cos[1]).sum())])
    cols = -np.mean([cos[0, 0] - np.log(np.exp(cos[:, 0]).sum()), cos[1, 1] - np.log(np.exp(cos[:, 1]).sum())])
    np.testing.assert_allclose(contrastive(images, texts, 0.5), (rows + cols) / 2, rtol=1e-6)
