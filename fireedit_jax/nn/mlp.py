"""Feed-forward blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fireedit_jax.nn.linear import dense

Dtype = Any


class GEGLUFeedForward(nn.Module):
    """Linear(d → 2·inner) split into (h, gate), h·GELU(gate), Linear(inner → d) (diffusers' GEGLU)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        inner = d * self.mult
        h = dense(2 * inner, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj_in")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        return dense(d, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj_out")(h)
