"""Low-rank adaptation (LoRA, Hu et al. 2021) of dense projections, as PEFT does it.

  y = x·W (+ b) + (α/r)·dropout(x)·A·B,   A: [in, r], B: [r, out]

The adapter's params `lora_a` and `lora_b` sit beside the base `kernel` (and `bias`),
so `q_proj/kernel`, `q_proj/lora_a`, `q_proj/lora_b`. They are always float32 while
the frozen kernel may be stored in bfloat16. With `rank=0` the layer is a plain dense
layer with the same param names, which is what `merge_lora` output loads into.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.linear import default_kernel_init, partitioned

Dtype = Any

# PEFT initialises A like torch.nn.Linear: kaiming_uniform(a=√5), i.e. U(±1/√fan_in).
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRADense(nn.Module):
    """A dense layer over the last axis with an optional low-rank update.

    Attributes:
      features: output width.
      axes: logical axes of the kernel [in, out]; A gets (in, None), B (None, out).
      rank: r; 0 means no adapter.
      alpha: α; the update is scaled by α/r.
      dropout: dropout rate on the adapter's input only (PEFT's lora_dropout).
      lora_dtype: storage dtype of A and B (float32 whatever `param_dtype` is).
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """x: float[..., in] → float[..., out] in `dtype`."""
        d_in = x.shape[-1]
        kernel = self.param("kernel", partitioned(self.kernel_init, self.axes), (d_in, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.rank:
            a = self.param("lora_a", partitioned(lora_a_init, (self.axes[0], None)), (d_in, self.rank), self.lora_dtype)
            b = self.param("lora_b", partitioned(nn.initializers.zeros, (None, self.axes[1])), (self.rank, self.features), self.lora_dtype)
            h = nn.Dropout(self.dropout)(x, deterministic=deterministic)
            h = jnp.einsum("...i,ir->...r", h, a.astype(self.dtype))
            update = jnp.einsum("...r,ro->...o", h, b.astype(self.dtype))
            y = y + jnp.asarray(self.alpha / self.rank, self.dtype) * update
        return y


def lora_scale(config_or_scale) -> float:
    """α/r from a number, or from an object with `lora_alpha` and `lora_rank` (e.g. LlamaConfig)."""
    if isinstance(config_or_scale, (int, float)):
        return float(config_or_scale)
    return config_or_scale.lora_alpha / config_or_scale.lora_rank


def merge_lora(params, config_or_scale):
    """Folds every adapter into its kernel: W ← W + (α/r)·A·B; the LoRA leaves are removed.

    Works on unboxed nested dicts, also with scanned (layer-stacked) kernels
    [L, in, out] and adapters [L, in, r], [L, r, out]. The sum is taken in float32 and
    stored in the kernel's dtype. Load the result into the same model with rank 0.
    """
    scale = lora_scale(config_or_scale)

    def merge(tree):
        if not isinstance(tree, dict):
            return tree
        tree = {k: merge(v) for k, v in tree.items()}
        if "lora_a" in tree and "lora_b" in tree:
            a, b = tree.pop("lora_a"), tree.pop("lora_b")
            kernel = tree["kernel"]
            update = jnp.einsum(
                "...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            tree["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * update).astype(kernel.dtype)
        return tree

    return merge(params)
