"""CLIP text and vision towers (transformers' CLIPTextModel / CLIPVisionModel), with optional projections.

Shapes: B batch, T tokens (text) or 1 + h·w (vision: class token + patches), D width,
N heads, H head dim (D/N), F MLP width, L layers, V vocabulary, P patch size,
h/w patch-grid height/width, E projection (joint embedding) width.

Both towers share one pre-LN transformer encoder, its L layers under `nn.scan`
(params stacked on a leading `layers` axis); the text tower's attention is causal.
`hidden_layers` selects entries of transformers' `hidden_states` tuple: index 0 is the
encoder's input (the embeddings; for vision after pre-LayerNorm), index i the output
of layer i, so −2 is the penultimate layer; none of them has the final norm applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import conv, dense, partitioned
from fireedit_jax.nn.norms import LayerNorm
from fireedit_jax.nn.resize import bicubic_resize

Dtype = Any

ACTIVATION_AXES = ("activation_batch", None, "activation_embed")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# The pixel normalisation CLIP was trained with (transformers' CLIPImageProcessor).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# With this eos_token_id transformers pools at argmax(input_ids) (checkpoints from before
# its PR #24773, e.g. SD1.5's text encoder); otherwise at the first eos_token_id.
LEGACY_EOS_TOKEN_ID = 2

# Ours ← transformers' name.
_HF_SHARED_NAMES = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "projection_dim": "projection_dim",
}
_HF_TEXT_NAMES = {**_HF_SHARED_NAMES, **{k: k for k in ("vocab_size", "max_position_embeddings", "eos_token_id")}}
_HF_VISION_NAMES = {**_HF_SHARED_NAMES, **{k: k for k in ("image_size", "patch_size", "num_channels")}}
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407, "projection_dim": 512,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}


def check_transformer_config(config, activations=ACTIVATIONS) -> None:
    """Validates a transformer tower's config (CLIP, ViT, DINOv2): heads, activation, patch grid."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} does not split into {config.num_heads} heads")
    if config.hidden_act not in activations:
        raise ValueError(f"hidden_act {config.hidden_act!r} not supported: one of {sorted(activations)}")
    if hasattr(config, "patch_size") and config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")


def _hf_fields(config: Mapping[str, Any], sub_config: str, names: Mapping[str, str], defaults: Mapping[str, Any]) -> dict:
    """Our fields from a tower's config dict, or from a full CLIPConfig dict holding it under `sub_config`."""
    full = config.get(sub_config) or config.get(f"{sub_config}_dict")
    tower = dict(full or config)
    if full is not None and "projection_dim" in config:  # CLIPModel projects to its own projection_dim
        tower["projection_dim"] = config["projection_dim"]
    return {ours: tower.get(hf, defaults[hf]) for ours, hf in names.items()}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower; defaults are CLIP ViT-L/14's (Stable Diffusion 1.5's text encoder).

    `eos_token_id` picks the pooled position (see LEGACY_EOS_TOKEN_ID); `with_projection`
    adds `text_projection` (D → projection_dim, no bias) for the joint embedding.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    projection_dim: int = 768
    with_projection: bool = False
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        check_transformer_config(self)

    @classmethod
    def vit_l14(cls, **overrides) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text tower (123,060,480 params without projection)."""
        return cls(**overrides)

    @classmethod
    def vit_b32(cls, **overrides) -> CLIPTextConfig:
        """openai/clip-vit-base-patch32's text tower."""
        return cls(**{**dict(hidden_size=512, intermediate_size=2048, num_heads=8, projection_dim=512), **overrides})

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> CLIPTextConfig:
        """From a transformers CLIPTextConfig dict, or a CLIPConfig one (its `text_config`).

        `ours` sets our own fields (with_projection, remat).
        """
        fields = _hf_fields(config, "text_config", _HF_TEXT_NAMES, _HF_TEXT_DEFAULTS)
        if not isinstance(fields["eos_token_id"], int):
            raise ValueError(f"eos_token_id={fields['eos_token_id']!r} not supported: one token id")
        return cls(**fields, **ours)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision tower (ViT); defaults are CLIP ViT-L/14's at 224 pixels.

    Inputs of another size use bicubically interpolated position embeddings.
    `with_projection` adds `visual_projection` (D → projection_dim, no bias).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    with_projection: bool = False
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        check_transformer_config(self)

    @property
    def grid_size(self) -> int:
        """Patches per side at the configured resolution."""
        return self.image_size // self.patch_size

    @classmethod
    def vit_l14(cls, **overrides) -> CLIPVisionConfig:
        """openai/clip-vit-large-patch14's vision tower (303,179,776 params without projection)."""
        return cls(**overrides)

    @classmethod
    def vit_b32(cls, **overrides) -> CLIPVisionConfig:
        """openai/clip-vit-base-patch32's vision tower."""
        base = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=32, projection_dim=512)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> CLIPVisionConfig:
        """From a transformers CLIPVisionConfig dict, or a CLIPConfig one (its `vision_config`).

        `ours` sets our own fields (with_projection, remat).
        """
        fields = _hf_fields(config, "vision_config", _HF_VISION_NAMES, _HF_VISION_DEFAULTS)
        for name in ("image_size", "patch_size"):
            if not isinstance(fields[name], int):
                raise ValueError(f"{name}={fields[name]!r} not supported: square images and patches (one int)")
        return cls(**fields, **ours)


def normalize_pixels(images):
    """images: float[B, H, W, 3] in [0, 1] → CLIP's normalised pixel values."""
    return (images - jnp.asarray(PIXEL_MEAN, images.dtype)) / jnp.asarray(PIXEL_STD, images.dtype)


class EncoderLayer(nn.Module):
    """Pre-LN self-attention and MLP; `emit` also returns the output for the scan to stack."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    emit: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        """x: float[B, T, D]; mask: bool[B, 1, 1, T] | None → (x, x or None)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, d = x.shape
        n = cfg.num_heads

        y = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        q, k, v = (dense(d, ("embed", "heads"), name=f"{p}_proj", **kw)(y).reshape(b, t, n, d // n) for p in "qkv")
        y = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.attention)
        x = x + nn.with_logical_constraint(dense(d, ("heads", "embed"), name="out_proj", **kw)(y.reshape(b, t, d)), ACTIVATION_AXES)

        y = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        y = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(y))
        x = x + nn.with_logical_constraint(dense(d, ("mlp", "embed"), name="fc2", **kw)(y), ACTIVATION_AXES)
        return x, (x if self.emit else None)


class Encoder(nn.Module):
    """L scanned EncoderLayers (params under `layers`, stacked on the `layers` axis)."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, mask=None, hidden_layers: Sequence[int] = ()):
        """x: float[B, T, D] → (float[B, T, D] after layer L, the requested hidden states as a tuple)."""
        cfg = self.config
        layer = nn.remat(EncoderLayer, prevent_cse=False) if cfg.remat else EncoderLayer
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.causal, bool(hidden_layers), self.dtype, self.param_dtype, self.attention, name="layers")
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        out, per_layer = layers(x, mask)
        return out, _select_hidden_states(x, per_layer, hidden_layers, cfg.num_layers)


def _select_hidden_states(inputs, per_layer, indices: Sequence[int], num_layers: int) -> tuple:
    """Entries of transformers' hidden_states tuple (inputs, layer 1 … layer L outputs) by index."""
    selected = []
    for i in indices:
        if not -(num_layers + 1) <= i <= num_layers:
            raise IndexError(f"hidden state {i} out of range for {num_layers} layers (0 … {num_layers}, or negative)")
        i %= num_layers + 1
        selected.append(inputs if i == 0 else per_layer[i - 1])
    return tuple(selected)


@flax.struct.dataclass
class CLIPOutput:
    """last_hidden_state: float[B, T, D] (text: after the final LayerNorm; vision: the last layer's
    output, no norm — as transformers); pooler_output: float[B, D] (text: at the EOS token;
    vision: the class token after post-LayerNorm); embeds: float[B, E] (the projected
    pooler_output) or None without projection; hidden_states: the requested entries."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    embeds: jax.Array | None = None
    hidden_states: tuple = ()


def _projection(config, name: str, dtype, param_dtype):
    return dense(config.projection_dim, ("embed", None), use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPTextModel(nn.Module):
    """Token + position embeddings, causal encoder, final LayerNorm, EOS pooling (+ text_projection)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, hidden_layers: Sequence[int] = ()):
        """Encodes token ids.

        Args:
          input_ids: int[B, T], T ≤ max_position_embeddings.
          attention_mask: bool/int[B, T], true on real tokens; None = all real.
          hidden_layers: indices into transformers' hidden_states tuple to return.
        Returns:
          CLIPOutput.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
        d = cfg.hidden_size
        tokens = self.param("token_embedding", partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                            (cfg.vocab_size, d), self.param_dtype)
        positions = self.param("position_embedding", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                               (cfg.max_position_embeddings, d), self.param_dtype)
        x = (jnp.take(tokens, input_ids, axis=0) + positions[:t]).astype(self.dtype)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        x, hidden = Encoder(cfg, causal=True, attention=self.attention, name="encoder", **kw)(x, mask, hidden_layers)
        x = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)

        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # the first EOS
        pooled = x[jnp.arange(b), eos]
        embeds = _projection(cfg, "text_projection", **kw)(pooled) if cfg.with_projection else None
        return CLIPOutput(last_hidden_state=x, pooler_output=pooled, embeds=embeds, hidden_states=hidden)


class CLIPVisionModel(nn.Module):
    """Patch embedding, class token, position embeddings, pre-LN, encoder, post-LN pooled class token (+ projection)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, pixel_values, *, hidden_layers: Sequence[int] = ()):
        """Encodes images.

        Args:
          pixel_values: float[B, H, W, C], normalised (see `normalize_pixels`); any size
            of at least one patch: the position embeddings are interpolated as
            transformers' `interpolate_pos_encoding=True` does (a remainder of fewer
            than P pixels is dropped, as the patch conv does).
          hidden_layers: indices into transformers' hidden_states tuple to return.
        Returns:
          CLIPOutput.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, g = cfg.hidden_size, cfg.patch_size, cfg.grid_size
        patches = conv(d, p, strides=p, padding=0, use_bias=False, name="patch_embedding", **kw)(
            pixel_values.astype(self.dtype)
        )
        b, h, w, _ = patches.shape
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(d**-0.5), ("embed",)), (d,), self.param_dtype)
        positions = self.param("position_embedding", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                               (g * g + 1, d), self.param_dtype)
        grid = bicubic_resize(positions[1:].reshape(g, g, d), (h, w)).reshape(h * w, d)
        positions = jnp.concatenate([positions[:1], grid], axis=0)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches.reshape(b, h * w, d)], axis=1)
        x = x + positions.astype(self.dtype)
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layernorm", **kw)(x)
        x, hidden = Encoder(cfg, causal=False, attention=self.attention, name="encoder", **kw)(x, None, hidden_layers)
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        embeds = _projection(cfg, "visual_projection", **kw)(pooled) if cfg.with_projection else None
        return CLIPOutput(last_hidden_state=x, pooler_output=pooled, embeds=embeds, hidden_states=hidden)


def example_inputs(config: CLIPTextConfig | CLIPVisionConfig, batch: int = 1):
    """Zero inputs of the configured size, e.g. for `jax.eval_shape(model.init, rng, *example_inputs(cfg))`."""
    if isinstance(config, CLIPTextConfig):
        return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
