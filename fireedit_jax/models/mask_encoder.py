"""PromptEditDiff's mask encoder: an edit mask → spatial tokens for the UNet's gated injection layer.

Shapes: B batch, h×w latent size, G = (h / 2^k)·(w / 2^k) tokens after k strided convs,
D the token width (the UNet's cross_attention_dim, what its fusers' `linear` reads).

A light CNN over the mask at latent resolution and each cell's coordinates (so every token
knows where it sits; the UNet's features have no position embedding): a 3×3 conv, then one
stride-2 3×3 conv per further width, SiLU between, then a per-cell Linear to D. The tokens
enter every transformer block of the UNet through `models.unet.GatedInjection` (a gated
cross-attention to them, or GLIGEN's gated self-attention: `unet.injection_layer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fireedit_jax.nn.embeddings import coordinates
from fireedit_jax.nn.linear import conv, dense

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MaskEncoderConfig:
    """channels: the convs' widths; every width after the first halves the grid (stride 2).
    out_dim: the tokens' width (the UNet's cross_attention_dim)."""

    channels: tuple[int, ...] = (64, 128, 256, 256)  # SD1.5's 64 × 64 latent → 8 × 8 = 64 tokens
    out_dim: int = 768

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        if not self.channels:
            raise ValueError("MaskEncoderConfig.channels needs at least one width")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class MaskEncoder(nn.Module):
    config: MaskEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, mask):
        """mask: float[B, h, w, 1] in [0, 1] (1 = edit), h and w multiples of the downsample factor
        → tokens float[B, G, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        factor = cfg.downsample_factor
        if mask.shape[1] % factor or mask.shape[2] % factor:
            raise ValueError(f"mask of {mask.shape[1]}×{mask.shape[2]} latent cells: the mask encoder's "
                             f"{len(cfg.channels) - 1} strided convs need multiples of {factor}")  # fmt: skip
        mask = mask.astype(self.dtype)
        x = jnp.concatenate([mask, coordinates(mask)], -1)
        for i, width in enumerate(cfg.channels):
            x = nn.silu(conv(width, strides=1 if i == 0 else 2, name=f"conv_{i}", **kw)(x))
        tokens = dense(cfg.out_dim, ("conv_out", "embed"), name="proj", **kw)(x)
        return tokens.reshape(tokens.shape[0], -1, cfg.out_dim)
