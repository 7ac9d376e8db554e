"""Multi-head attention with its own projections (Q-Former, TATI, HVCA)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import dense

Dtype = Any


class MultiHeadAttention(nn.Module):
    """Projections q = x·Wq, k = c·Wk, v = c·Wv (D = x's width), N-head attention, output ·Wo.

    Params `query`, `key`, `value`, `output` (kernels [in, D], biases if `use_bias`).
    """

    num_heads: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context, mask=None):
        """x: float[B, T, D]; context: float[B, S, C]; mask: bool[B, S] | None (True = attend) → float[B, T, D]."""
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} does not split into {self.num_heads} heads")

        def project(name, inputs):  # → float[B, L, N, H]
            y = dense(width, ("embed", "heads"), name=name, **kw)(inputs)
            return y.reshape(*y.shape[:2], self.num_heads, width // self.num_heads)

        q, k, v = project("query", x), project("key", context), project("value", context)
        mask = None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]
        y = dot_product_attention(q, k, v, mask=mask, implementation=self.attention)
        return dense(width, ("heads", "embed"), name="output", **kw)(y.reshape(*x.shape[:2], width))
