"""TATI against ELLA's time-aware perceiver resampler, re-implemented here in torch (REFERENCES.md §3)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from golden import check_golden

from fireedit_jax.models.tati import TATI, TATIConfig, example_inputs

TINY = TATIConfig(num_blocks=2, num_latents=6, width=32, num_heads=4, input_dim=24, time_channel=16, time_embed_dim=20)


# ---------------------------------------------------------------------------- ELLA in torch


class AdaLayerNorm(torch.nn.Module):
    def __init__(self, dim, time_dim):
        super().__init__()
        self.linear = torch.nn.Linear(time_dim, 2 * dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, t_emb):
        shift, scale = self.linear(F.silu(t_emb)).view(len(x), 1, -1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class PerceiverAttentionBlock(torch.nn.Module):
    def __init__(self, dim, heads, time_dim):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.c_fc, self.c_proj = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)
        self.ln_1, self.ln_2, self.ln_ff = (AdaLayerNorm(dim, time_dim) for _ in range(3))

    def forward(self, x, latents, t_emb):
        normed = self.ln_1(latents, t_emb)
        kv = torch.cat([normed, self.ln_2(x, t_emb)], dim=1)
        latents = latents + self.attn(normed, kv, kv, need_weights=False)[0]
        return latents + self.c_proj(torch.relu(self.c_fc(self.ln_ff(latents, t_emb))) ** 2)


class ELLA(torch.nn.Module):
    """ELLA(…) = Timesteps + TimestepEmbedding + PerceiverResampler(output_dim=None)."""

    def __init__(self, cfg: TATIConfig):
        super().__init__()
        self.position = Timesteps(cfg.time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(cfg.time_channel, cfg.time_embed_dim)
        self.latents = torch.nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.num_latents, cfg.width))
        self.time_aware_linear = torch.nn.Linear(cfg.time_embed_dim, cfg.width)
        self.proj_in = torch.nn.Linear(cfg.input_dim, cfg.width)
        self.blocks = torch.nn.ModuleList(
            PerceiverAttentionBlock(cfg.width, cfg.num_heads, cfg.time_embed_dim) for _ in range(cfg.num_blocks)
        )

    def forward(self, x, timesteps):
        t_emb = self.time_embedding(self.position(timesteps)[:, None, :])  # [B, 1, T], as ELLA
        latents = self.latents[None].repeat(len(x), 1, 1) + self.time_aware_linear(F.silu(t_emb))
        x = self.proj_in(x)
        for block in self.blocks:
            latents = block(x, latents, t_emb)
        return latents


def load_into_torch(params, cfg: TATIConfig) -> ELLA:
    """Copies our params into the torch reference (kernels transposed, q/k/v packed into in_proj)."""
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params["params"])
    ref = ELLA(cfg).eval()

    def linear(module, ours):
        module.weight.data, module.bias.data = ours["kernel"].T.contiguous(), ours["bias"]

    linear(ref.time_embedding.linear_1, p["time_embedding"]["linear_1"])
    linear(ref.time_embedding.linear_2, p["time_embedding"]["linear_2"])
    ref.latents.data = p["latents"]
    linear(ref.time_aware_linear, p["time_aware_linear"])
    linear(ref.proj_in, p["proj_in"])
    for i, block in enumerate(ref.blocks):
        ours = p[f"blocks_{i}"]
        attn = ours["attention"]
        block.attn.in_proj_weight.data = torch.cat([attn[n]["kernel"].T for n in ("query", "key", "value")])
        block.attn.in_proj_bias.data = torch.cat([attn[n]["bias"] for n in ("query", "key", "value")])
        linear(block.attn.out_proj, attn["output"])
        linear(block.c_fc, ours["mlp_in"])
        linear(block.c_proj, ours["mlp_out"])
        for name in ("ln_1", "ln_2", "ln_ff"):
            linear(getattr(block, name).linear, ours[name]["linear"])
    return ref


# ---------------------------------------------------------------------------- tests


def _perturb_adaln(params, scale=0.1, seed=1):
    """Random values for the (zero-initialised) adaLN modulation linears only."""
    flat = flax.traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return flax.traverse_util.unflatten_dict({
        path: leaf + scale * jax.random.normal(key, leaf.shape) if {"ln_1", "ln_2", "ln_ff"} & set(path) else leaf
        for key, (path, leaf) in zip(keys, flat.items())
    })


@pytest.fixture(scope="module")
def init_params():
    return flax.linen.meta.unbox(jax.jit(TATI(TINY).init)(jax.random.key(0), *example_inputs(TINY, batch=2, length=9)))


@pytest.fixture(scope="module")
def forward():
    return jax.jit(TATI(TINY).apply)


def _x(batch=2, length=9):
    return np.random.default_rng(0).normal(size=(batch, length, TINY.input_dim)).astype(np.float32)


def test_matches_ella_reference(init_params, forward, highest_precision):
    params = _perturb_adaln(init_params)
    x, timesteps = _x(), np.array([3.0, 917.0], np.float32)
    with torch.no_grad():
        want = load_into_torch(params, TINY)(torch.from_numpy(x), torch.from_numpy(timesteps)).numpy()
    got = np.asarray(forward(params, x, timesteps))
    assert got.shape == (2, TINY.num_latents, TINY.width)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.max(np.abs(got[0] - got[1])) > 1e-2  # distinct timesteps (and inputs) give distinct outputs


def _without_time_aware_linear(params):
    """Holds the latents' time shift fixed (zero), leaving the blocks as the only way t enters."""
    p = jax.tree.map(lambda a: a, params)
    p["params"]["time_aware_linear"] = jax.tree.map(jnp.zeros_like, p["params"]["time_aware_linear"])
    return p


def test_blocks_ignore_t_at_init_and_depend_on_it_once_modulated(init_params, forward):
    x = _x(batch=1)
    at = lambda params, t: np.asarray(forward(params, x, np.array([t], np.float32)))  # noqa: E731
    frozen = _without_time_aware_linear(init_params)
    np.testing.assert_array_equal(at(frozen, 10.0), at(frozen, 900.0))
    modulated = _perturb_adaln(frozen)
    assert np.max(np.abs(at(modulated, 10.0) - at(modulated, 900.0))) > 1e-2
    # With its default (non-zero) time_aware_linear the initialised TATI is already time-aware.
    assert np.max(np.abs(at(init_params, 10.0) - at(init_params, 900.0))) > 1e-3


def test_scalar_timestep_is_shared_by_the_batch(init_params, forward):
    params, x = _perturb_adaln(init_params), _x()
    shared = np.asarray(forward(params, x, 250.0))
    np.testing.assert_allclose(shared, np.asarray(forward(params, x, np.full((2,), 250.0, np.float32))), atol=1e-6)


def test_fireedit_golden_tree():
    config = TATIConfig.fireedit()
    tree = jax.eval_shape(TATI(config).init, jax.random.key(0), *example_inputs(config))
    assert jax.eval_shape(TATI(config).apply, tree, *example_inputs(config, batch=3)).shape == (3, 77, 768)
    got = check_golden("tati_fireedit", tree)
    assert got["total_params"] == sum(p.numel() for p in ELLA(config).parameters()) == 23_334_144
