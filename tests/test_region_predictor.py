"""The learnable edit region predictor (Beyond Editing Pairs): shapes, padding, its prior, g, gradients, one trace."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.models.region_predictor import (
    RegionPredictor,
    RegionPredictorConfig,
    SemanticProjection,
    example_inputs,
    probability_grid,
    threshold_mask,
)
from fireedit_jax.train.region_losses import semantic_alignment

TINY = RegionPredictorConfig(image_dim=12, text_dim=10, width=16, num_heads=2, mlp_hidden=24, embed_dim=8)
GRID, TEXT = 3, 5  # a 3 × 3 patch grid, 5 instruction tokens


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, GRID * GRID, TINY.image_dim)).astype(np.float32)
    text = rng.normal(size=(batch, TEXT, TINY.text_dim)).astype(np.float32)
    mask = np.ones((batch, TEXT), bool)
    mask[1, 3:] = False  # the second instruction has 3 real tokens
    return image, text, mask


@pytest.fixture(scope="module")
def params():
    return flax.linen.meta.unbox(
        jax.jit(RegionPredictor(TINY).init)(jax.random.key(0), *example_inputs(TINY, 2, GRID * GRID, TEXT))
    )


@pytest.fixture(scope="module")
def forward():
    return jax.jit(RegionPredictor(TINY).apply)


def test_config_validation():
    with pytest.raises(ValueError, match="heads"):
        RegionPredictorConfig(width=10, num_heads=3)
    with pytest.raises(ValueError, match="initial_probability"):
        RegionPredictorConfig(initial_probability=0.0)
    with pytest.raises(ValueError, match="embed_dim"):
        RegionPredictorConfig(embed_dim=0)
    with pytest.raises(ValueError, match="12 and text tokens 10"):
        RegionPredictor(TINY).init(jax.random.key(0), *example_inputs(RegionPredictorConfig(text_dim=12)))


def test_shapes_dtypes_and_logical_axes(params, forward):
    out = forward(params, *_inputs())
    assert out.logits.shape == (2, GRID * GRID) and out.logits.dtype == jnp.float32
    assert out.fused.shape == (2, GRID * GRID, TINY.width)
    assert out.fused_embedding.shape == out.image_embedding.shape == (2, TINY.embed_dim)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
    boxed = jax.eval_shape(RegionPredictor(TINY).init, jax.random.key(0), *example_inputs(TINY))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax.linen.Partitioned))
    assert leaves and all(isinstance(leaf, flax.linen.Partitioned) for leaf in leaves)


def test_paper_config_parameter_count():
    cfg = RegionPredictorConfig()
    tree = flax.linen.meta.unbox(jax.eval_shape(RegionPredictor(cfg).init, jax.random.key(0), *example_inputs(cfg)))
    d, f, e = cfg.width, cfg.mlp_hidden, cfg.embed_dim
    projections = (cfg.image_dim + 1) * d + (cfg.text_dim + 1) * d
    norms = 4 * 2 * d  # text, cross-attention, self-attention and head LayerNorms
    attention = 2 * 4 * d * d  # two bias-free attentions
    head = (d + 1) * f + (f + 1)
    g = 2 * d + (d + 1) * f + (f + 1) * e
    assert sum(x.size for x in jax.tree.leaves(tree)) == projections + norms + attention + head + g


def test_padded_text_tokens_do_not_matter(params, forward):
    image, text, mask = _inputs()
    out = forward(params, image, text, mask)
    perturbed = text.copy()
    perturbed[1, 3:] += 10.0 * np.random.default_rng(1).normal(size=perturbed[1, 3:].shape)
    again = forward(params, image, perturbed, mask)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(out)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # A padded token acts as an absent one.
    alone = forward(params, image[1:], text[1:, :3], mask[1:, :3])
    np.testing.assert_allclose(alone.logits[0], out.logits[1], atol=1e-5)
    # The instruction matters: other real tokens change the logits.
    other = forward(params, image, text[::-1].copy(), mask)
    assert np.max(np.abs(other.logits - out.logits)) > 1e-4


def test_initial_probability_is_small_but_not_vanishing(params, forward):
    prob = jax.nn.sigmoid(forward(params, *_inputs(seed=3, batch=4)).logits)
    assert abs(float(prob.mean()) - TINY.initial_probability) < 0.03
    assert 0.05 < float(prob.min()) and float(prob.max()) < 0.3
    mask = threshold_mask(prob)
    assert float(mask.max()) == 0.0  # nothing is edited before training


def test_g_applies_to_fused_and_to_projected_image_tokens(params, forward):
    image, text, mask = _inputs()
    out = forward(params, image, text, mask)
    g = SemanticProjection(TINY.mlp_hidden, TINY.embed_dim, TINY.layer_norm_eps)
    g_params = {"params": params["params"]["semantic_projection"]}
    proj = params["params"]["image_proj"]
    projected = image @ proj["kernel"] + proj["bias"]
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(g.apply(g_params, out.fused), out.fused_embedding, atol=1e-5)
        np.testing.assert_allclose(g.apply(g_params, projected), out.image_embedding, atol=1e-5)
    # The source's embedding sees the image only; the fused one sees the instruction too.
    other = forward(params, image, text + 1.0, mask)
    np.testing.assert_allclose(other.image_embedding, out.image_embedding, atol=1e-6)
    assert np.max(np.abs(other.fused_embedding - out.fused_embedding)) > 1e-4


def test_gradients_reach_every_parameter(params):
    image, text, mask = _inputs()
    model = RegionPredictor(TINY)
    target = jnp.asarray(np.random.default_rng(4).uniform(size=(2, GRID * GRID)), jnp.float32)
    text_embeddings = jnp.asarray(np.random.default_rng(5).normal(size=(2, 2, TINY.embed_dim)), jnp.float32)

    def losses(params):
        out = model.apply(params, image, text, mask)
        region = jnp.mean(jnp.square(jax.nn.sigmoid(out.logits) - target))
        return region, semantic_alignment(out.fused_embedding, out.image_embedding, *text_embeddings)

    region_grads, alignment_grads = jax.jit(jax.jacrev(losses))(params)
    norms = lambda grads: {"/".join(path): float(jnp.linalg.norm(leaf))  # noqa: E731
                           for path, leaf in flax.traverse_util.flatten_dict(grads["params"]).items()}  # fmt: skip
    region_norms, alignment_norms = norms(region_grads), norms(alignment_grads)
    # The mask's loss trains everything but g; L_sa trains g and, through F_fused, all but the head.
    # The floor is far above roundoff (a key bias, which softmax ignores, gets ~1e-11) and below the
    # smallest real gradient (~1e-3).
    for path, norm in region_norms.items():
        assert norm == 0.0 if path.startswith("semantic_projection/") else norm > 1e-6, path
    for path, norm in alignment_norms.items():
        assert norm == 0.0 if path.startswith("head_") else norm > 1e-6, path


def test_one_trace_for_two_calls(params):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grid(params, image, text, mask):
        return probability_grid(RegionPredictor(TINY).apply(params, image, text, mask).logits, GRID)

    first = grid(params, *_inputs(seed=0))
    second = grid(params, *_inputs(seed=1))
    assert first.shape == second.shape == (2, GRID, GRID)
    assert not np.allclose(first, second)


def test_probability_grid_and_threshold_mask():
    logits = jnp.asarray([[-2.0, 0.0, 3.0, 0.1, -0.1, 5.0]])
    prob = probability_grid(logits, (2, 3))
    np.testing.assert_allclose(prob, jax.nn.sigmoid(logits).reshape(1, 2, 3), rtol=1e-6)
    np.testing.assert_array_equal(threshold_mask(prob), [[[0, 0, 1], [1, 0, 1]]])
    np.testing.assert_array_equal(threshold_mask(prob, 0.9), [[[0, 0, 1], [0, 0, 1]]])
    assert probability_grid(jnp.zeros((2, 4)), 2).shape == (2, 2, 2)
    with pytest.raises(ValueError, match="5 patch logits"):
        probability_grid(jnp.zeros((1, 5)), 2)
