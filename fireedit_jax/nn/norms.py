"""Normalisations, computed in float32 whatever the compute dtype."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.linear import dense, partitioned

Dtype = Any


def _standardize(x, axes, eps):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (params `scale`, `bias` of axis `axis_name`)."""

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str = "embed"
    zero_scale: bool = False  # the scale starts at 0 (the output at its bias)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _standardize(x.astype(jnp.float32), -1, self.epsilon)
        d = x.shape[-1]
        if self.use_scale:
            init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
            y = y * self.param("scale", partitioned(init, (self.axis_name,)), (d,), self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) · scale (LLaMA), statistics in float32."""

    epsilon: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.epsilon)
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or N…C) channels-last tensors, as torch.nn.GroupNorm."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        y = _standardize(grouped, axes, self.epsilon).reshape(x.shape)
        y = y * self.param("scale", partitioned(nn.initializers.ones, ("conv_out",)), (c,), self.param_dtype)
        y = y + self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (c,), self.param_dtype)
        return y.astype(self.dtype)


class AdaLayerNorm(nn.Module):
    """x̂·(1 + scale) + shift with (shift, scale) = Linear(SiLU(cond)), zero-initialised (ELLA).

    At initialisation the modulation is zero, so the block ignores `cond`.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        """x: float[B, T, D]; cond: float[B, C] → float[B, T, D]."""
        emb = dense(
            2 * x.shape[-1],
            ("embed", "mlp"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.zeros,
            name="linear",
        )(nn.silu(cond))
        shift, scale = jnp.split(emb.astype(jnp.float32)[:, None, :], 2, axis=-1)
        y = _standardize(x.astype(jnp.float32), -1, self.epsilon)
        return (y * (1 + scale) + shift).astype(self.dtype)
