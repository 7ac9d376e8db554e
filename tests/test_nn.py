"""Shared building blocks: chunked attention, torch-compatible bicubic, norms, embeddings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fireedit_jax.nn import attention, embeddings, norms, resize


def naive_attention(q, k, v, mask=None, is_causal=False, bias=0.0, scale=None):
    n, kv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale + bias
    if is_causal:
        causal = np.tril(np.ones(scores.shape[-2:], bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = np.where(mask, scores, -1e30)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("t,s,n,kv,chunk", [(37, 37, 4, 4, 8), (64, 77, 4, 2, 16), (10, 5, 2, 1, 1024)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_attention_equals_naive(t, s, n, kv, chunk, masked, is_causal, highest_precision):
    rng = np.random.default_rng(t + s)
    q = rng.normal(size=(2, t, n, 8)).astype(np.float32)
    k = rng.normal(size=(2, s, kv, 8)).astype(np.float32)
    v = rng.normal(size=(2, s, kv, 8)).astype(np.float32)
    mask = None
    if masked:  # padding mask over keys, per batch element; keep key 0 so no row is empty
        keep = rng.random((2, 1, 1, s)) > 0.3
        keep[..., 0] = True
        mask = keep
    out = attention.dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, is_causal=is_causal,
        implementation="xla", query_chunk=chunk,
    )
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, mask, is_causal), atol=1e-5)


def test_chunked_attention_with_bias_and_scale(highest_precision):
    """An additive bias shared over the batch (T5's relative positions), no scaling, GQA, padding, chunks."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 13, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 11, 2, 8)).astype(np.float32) for _ in range(2))
    bias = rng.normal(size=(1, 4, 13, 11)).astype(np.float32)
    mask = np.ones((2, 1, 1, 11), bool)
    mask[1, ..., 7:] = False
    out = attention.dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias), mask=mask, scale=1.0,
        implementation="xla", query_chunk=5,
    )
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, mask, bias=bias, scale=1.0), atol=1e-5)


def test_attention_rejects_unknown_implementation():
    x = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="not in"):
        attention.dot_product_attention(x, x, x, implementation="flash3")


def test_cudnn_request_falls_back_off_gpu(highest_precision):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32) for _ in range(3))
    out = attention.dot_product_attention(q, k, v, implementation="cudnn")  # head dim 4, float32
    np.testing.assert_allclose(np.asarray(out), naive_attention(*map(np.asarray, (q, k, v))), atol=1e-5)


@pytest.mark.parametrize("src,dst", [((37, 37), (32, 32)), ((16, 16), (32, 24)), ((5, 7), (70, 3))])
def test_bicubic_matches_torch(src, dst):
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.tensor(x).permute(0, 3, 1, 2), size=dst, mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize.bicubic_resize(jnp.asarray(x), dst)), ref, atol=1e-5)


def test_norms_match_torch(highest_precision):
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 64)).astype(np.float32) * 3 + 1
    gn = norms.GroupNorm(num_groups=8, epsilon=1e-6)
    params = gn.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), flax_unbox(params))
    ref = torch.nn.GroupNorm(8, 64, eps=1e-6)
    ref.weight.data = torch.tensor(np.asarray(params["params"]["scale"]))
    ref.bias.data = torch.tensor(np.asarray(params["params"]["bias"]))
    want = ref(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(gn.apply(params, x)), want, atol=1e-5)

    ln = norms.LayerNorm(epsilon=1e-5)
    lp = flax_unbox(ln.init(jax.random.key(0), x))
    want = torch.nn.functional.layer_norm(torch.tensor(x), (64,), eps=1e-5).numpy()
    np.testing.assert_allclose(np.asarray(ln.apply(lp, x)), want, atol=1e-5)


def test_ada_layer_norm_starts_independent_of_condition():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    c1, c2 = jax.random.normal(jax.random.key(1), (2, 8)), jax.random.normal(jax.random.key(2), (2, 8))
    ada = norms.AdaLayerNorm()
    params = ada.init(jax.random.key(3), x, c1)
    np.testing.assert_array_equal(ada.apply(params, x, c1), ada.apply(params, x, c2))
    bumped = jax.tree.map(lambda p: p + 0.1, flax_unbox(params))
    assert not np.allclose(ada.apply(bumped, x, c1), ada.apply(bumped, x, c2))


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 10, 500, 999], np.float32)
    for flip, shift, dim in [(True, 0, 320), (False, 1, 33)]:
        want = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        got = embeddings.sinusoidal_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
        # 1 ulp of a float32 frequency moves sin(999·f) by ~6e-5: the float32 floor.
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def flax_unbox(tree):
    import flax

    return flax.linen.meta.unbox(tree)
