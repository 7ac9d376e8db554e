"""Dense and conv layers whose parameters carry logical axis names.

Factories rather than wrapper modules, so a layer's params sit directly under its
own name (`to_q/kernel`), as in the PyTorch checkpoints we convert from.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init, axes: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=nn.initializers.zeros,
    name: str | None = None,
) -> nn.Dense:
    """y = x·W + b over the last axis; W is [in, out] with logical axes `axes`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(bias_init, axes[1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> nn.Conv:
    """2-D convolution on NHWC; kernel [kh, kw, in, out], torch-style symmetric padding."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=[(padding, padding)] * 2,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )
