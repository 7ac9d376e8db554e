"""Diffusion timestep embeddings; coordinate channels."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fireedit_jax.nn.linear import dense

Dtype = Any


def sinusoidal_embedding(
    timesteps, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
):
    """Stable Diffusion's timestep embedding: float[B] → float32[B, dim].

    freq_i = exp(−ln(max_period)·i / (dim/2 − freq_shift)); [sin, cos] (or [cos, sin]).
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift)).astype(np.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)], -1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """Linear(in → dim), SiLU, Linear(dim → dim) (diffusers' TimestepEmbedding)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.dim, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        return dense(self.dim, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(nn.silu(x))


def coordinates(x):
    """float[B, h, w, C] → float[B, h, w, 2]: each cell's (x, y), −1 at the left / top edge, +1 at the right / bottom."""
    b, h, w, _ = x.shape
    ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], -1), (b, h, w, 2)).astype(x.dtype)
