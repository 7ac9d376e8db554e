"""Plain ViT (transformers' ViTModel without its pooler): the DINO encoders of the editing metrics.

Shapes: B batch, T tokens (1 class token + h·w patches), D width, N heads, F MLP width,
L layers, P patch size, g position-embedding grid side (image_size / P), h/w the
input's patch-grid height/width.

Patch conv, class token, learnt position embeddings, L pre-LN layers (the encoder
shared with CLIP, models/clip.py: q/k/v/out projections with biases, GELU MLP, under
`nn.scan`), final LayerNorm. MagicBrush's DINO score is the cosine of the class token
of the final normalised states (`ViTOutput.class_token`), which is what
facebookresearch/dino's `dino_vits16` returns.

Inputs of another size use position embeddings resized as transformers'
`interpolate_pos_encoding` does: torch bicubic to the new grid by size (align_corners
False). (The original DINO code resizes by a scale factor with a +0.1 offset instead;
at the metrics' 224 pixels neither resizes.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.models.clip import Encoder, check_transformer_config
from fireedit_jax.nn.linear import conv, partitioned
from fireedit_jax.nn.norms import LayerNorm
from fireedit_jax.nn.resize import bicubic_resize

Dtype = Any

# The ImageNet normalisation DINO was trained with.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

# Ours ← transformers' name.
_HF_NAMES = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
}
# transformers' ViTConfig defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A plain ViT; defaults are DINO ViT-S/16's (facebook/dino-vits16, torch.hub `dino_vits16`).

    layer_norm_eps 1e-6 is the original DINO code's; transformers' converted DINO
    configs may say otherwise (`from_hf` takes theirs).
    """

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 12
    num_heads: int = 6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        check_transformer_config(self)

    @property
    def grid_size(self) -> int:
        """Patches per side at the configured resolution."""
        return self.image_size // self.patch_size

    @classmethod
    def dino_vits16(cls, **overrides) -> ViTConfig:
        """DINO ViT-S/16 (21,665,664 params without pooler): MagicBrush's DINO metric."""
        return cls(**overrides)

    @classmethod
    def dino_vitb16(cls, **overrides) -> ViTConfig:
        """DINO ViT-B/16."""
        return cls(**{**dict(hidden_size=768, intermediate_size=3072, num_heads=12), **overrides})

    @classmethod
    def dino_vitb8(cls, **overrides) -> ViTConfig:
        """DINO ViT-B/8: PIE-Bench's structure distance."""
        return cls.dino_vitb16(**{"patch_size": 8, **overrides})

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> ViTConfig:
        """From a transformers ViTConfig dict; `ours` sets our own fields (remat)."""
        fields = {ours_name: config.get(hf, _HF_DEFAULTS[hf]) for ours_name, hf in _HF_NAMES.items()}
        for name in ("image_size", "patch_size"):
            if not isinstance(fields[name], int):
                raise ValueError(f"{name}={fields[name]!r} not supported: square images and patches (one int)")
        if not config.get("qkv_bias", True):
            raise ValueError("qkv_bias=False not supported: the q/k/v projections have biases")
        return cls(**fields, **ours)


def normalize_pixels(images):
    """images: float[B, H, W, 3] in [0, 1] → ImageNet-normalised pixel values."""
    return (images - jnp.asarray(PIXEL_MEAN, images.dtype)) / jnp.asarray(PIXEL_STD, images.dtype)


@flax.struct.dataclass
class ViTOutput:
    """last_hidden_state: float[B, T, D] after the final LayerNorm; hidden_states: the requested
    entries of transformers' hidden_states tuple (index 0 the embeddings, i the output of
    layer i; no final norm)."""

    last_hidden_state: jax.Array
    hidden_states: tuple = ()

    @property
    def class_token(self) -> jax.Array:
        """float[B, D]: the normalised class token (DINO's image feature)."""
        return self.last_hidden_state[:, 0]


class ViTModel(nn.Module):
    """Patch embedding, class token, position embeddings, encoder, final LayerNorm."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, pixel_values, *, hidden_layers: Sequence[int] = ()):
        """Encodes images.

        Args:
          pixel_values: float[B, H, W, C], normalised (see `normalize_pixels`); any size of
            at least one patch (a remainder of fewer than P pixels is dropped, as the
            patch conv does).
          hidden_layers: indices into transformers' hidden_states tuple to return.
        Returns:
          ViTOutput.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, g = cfg.hidden_size, cfg.patch_size, cfg.grid_size
        patches = conv(d, p, strides=p, padding=0, name="patch_embedding", **kw)(pixel_values.astype(self.dtype))
        b, h, w, _ = patches.shape
        cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), ("embed",)), (d,), self.param_dtype)
        positions = self.param("position_embedding", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                               (g * g + 1, d), self.param_dtype)
        grid = bicubic_resize(positions[1:].reshape(g, g, d), (h, w)).reshape(h * w, d)
        positions = jnp.concatenate([positions[:1], grid], axis=0)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches.reshape(b, h * w, d)], axis=1)
        x = x + positions.astype(self.dtype)
        x, hidden = Encoder(cfg, causal=False, attention=self.attention, name="encoder", **kw)(x, None, hidden_layers)
        x = LayerNorm(cfg.layer_norm_eps, name="layernorm", **kw)(x)
        return ViTOutput(last_hidden_state=x, hidden_states=hidden)


def example_inputs(config: ViTConfig, batch: int = 1):
    """Zero images of the configured size, e.g. for `jax.eval_shape(model.init, rng, *example_inputs(cfg))`."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
