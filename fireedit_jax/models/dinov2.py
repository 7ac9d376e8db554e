"""DINOv2 ViT (transformers' Dinov2Model and Dinov2WithRegistersModel).

Shapes: B batch, T tokens (1 class + R registers + h·w patches), D width, N heads,
H head dim (D/N), F MLP width, L layers, P patch size, g position-embedding grid side
(image_size / P), h/w patch-grid height/width of the input.

Pre-LN blocks with layer scale: x += γ₁·Attn(LN(x)); x += γ₂·FFN(LN(x)), the FFN a GELU
MLP or (ViT-g) a SwiGLU. The L blocks run under `nn.scan` (params stacked on a leading
`layers` axis). Position embeddings are learnt for a g×g grid and bicubically resized
to h×w as transformers does it: plain torch bicubic for Dinov2Model, antialiased
bicubic (Keys a = −0.5, widened support when shrinking) for Dinov2WithRegistersModel.
Register tokens are inserted after the class token, after the position embeddings
were added (they have none).

`hidden_layers` selects entries of transformers' `hidden_states` tuple: index 0 is the
embeddings, index i the output of block i; none has the final LayerNorm applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.models.clip import check_transformer_config
from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import conv, dense, partitioned
from fireedit_jax.nn.norms import LayerNorm
from fireedit_jax.nn.resize import bicubic_resize

Dtype = Any

ACTIVATION_AXES = ("activation_batch", None, "activation_embed")
ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}
# The pixel normalisation DINOv2 was trained with (ImageNet's, as its BitImageProcessor).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

# Ours ← transformers' name.
_HF_NAMES = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "mlp_ratio",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "qkv_bias": "qkv_bias",
    "layerscale_value": "layerscale_value",
    "use_swiglu_ffn": "use_swiglu_ffn",
    "num_register_tokens": "num_register_tokens",
}
# transformers' defaults for fields a config.json leaves out (the two configs differ in patch size).
_HF_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "hidden_act": "gelu",
    "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 14, "num_channels": 3, "qkv_bias": True,
    "layerscale_value": 1.0, "use_swiglu_ffn": False, "num_register_tokens": 0,
}
_HF_REGISTERS_DEFAULTS = {**_HF_DEFAULTS, "patch_size": 16, "num_register_tokens": 4}
REGISTERS_MODEL_TYPE = "dinov2_with_registers"


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """DINOv2 ViT; defaults are DINOv2-L/14's (facebook/dinov2-large).

    `interpolate_antialias` picks the position-embedding resampling: None means as
    transformers for this kind of model, i.e. antialiased with register tokens
    (Dinov2WithRegistersModel), plain bicubic without (Dinov2Model).
    """

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518  # position embeddings are learnt for (image_size / patch_size)² patches
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0  # initial γ of the layer scales
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    interpolate_antialias: bool | None = None
    remat: bool = False  # rematerialise each block in the backward pass

    def __post_init__(self):
        check_transformer_config(self, ACTIVATIONS)

    @property
    def grid_size(self) -> int:
        """g: position embeddings per side."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens before the patches."""
        return 1 + self.num_register_tokens

    @property
    def mlp_dim(self) -> int:
        """F; SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8 (as transformers)."""
        width = int(self.hidden_size * self.mlp_ratio)
        return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width

    @property
    def antialias(self) -> bool:
        return self.num_register_tokens > 0 if self.interpolate_antialias is None else self.interpolate_antialias

    @classmethod
    def vit_s14(cls, **overrides) -> DINOv2Config:
        """facebook/dinov2-small (with num_register_tokens=4: dinov2-with-registers-small)."""
        return cls(**{**dict(hidden_size=384, num_layers=12, num_heads=6), **overrides})

    @classmethod
    def vit_b14(cls, **overrides) -> DINOv2Config:
        """facebook/dinov2-base."""
        return cls(**{**dict(hidden_size=768, num_layers=12, num_heads=12), **overrides})

    @classmethod
    def vit_l14(cls, **overrides) -> DINOv2Config:
        """facebook/dinov2-large (304,367,616 params without the mask token)."""
        return cls(**overrides)

    @classmethod
    def vit_g14(cls, **overrides) -> DINOv2Config:
        """facebook/dinov2-giant (SwiGLU FFN)."""
        return cls(**{**dict(hidden_size=1536, num_layers=40, num_heads=24, use_swiglu_ffn=True), **overrides})

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> DINOv2Config:
        """From a transformers Dinov2Config or Dinov2WithRegistersConfig dict (told apart by `model_type`).

        `ours` sets our own fields (e.g. remat).
        """
        registers = config.get("model_type") == REGISTERS_MODEL_TYPE
        defaults = _HF_REGISTERS_DEFAULTS if registers else _HF_DEFAULTS
        fields = {name: config.get(hf, defaults[hf]) for name, hf in _HF_NAMES.items()}
        for name in ("image_size", "patch_size"):
            value = fields[name]
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"{name}={value!r} not supported: square images and patches")
                fields[name] = value[0]
        return cls(**fields, **{"interpolate_antialias": registers, **ours})


def normalize_pixels(images):
    """images: float[B, H, W, 3] in [0, 1] → DINOv2's normalised pixel values."""
    return (images - jnp.asarray(PIXEL_MEAN, images.dtype)) / jnp.asarray(PIXEL_STD, images.dtype)


# ---------------------------------------------------------------------------- position embeddings


def interpolate_grid(grid, size: tuple[int, int], antialias: bool):
    """grid: float[g, g, D] → float32[h, w, D], as torch's bicubic interpolate (align_corners=False)."""
    return bicubic_resize(grid.astype(jnp.float32), size, antialias=antialias)


# ---------------------------------------------------------------------------- network


class Block(nn.Module):
    """x += γ₁·Attn(LN(x)); x += γ₂·FFN(LN(x))."""

    config: DINOv2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x):
        """x: float[B, T, D] → float[B, T, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, d = x.shape
        n = cfg.num_heads

        def layer_scale(name):
            init = nn.initializers.constant(cfg.layerscale_value)
            return self.param(name, partitioned(init, ("embed",)), (d,), self.param_dtype).astype(self.dtype)

        y = LayerNorm(cfg.layer_norm_eps, name="norm1", **kw)(x)
        q, k, v = (
            dense(d, ("embed", "heads"), use_bias=cfg.qkv_bias, name=f"{p}_proj", **kw)(y).reshape(b, t, n, d // n)
            for p in "qkv"
        )
        y = dot_product_attention(q, k, v, implementation=self.attention).reshape(b, t, d)
        y = dense(d, ("heads", "embed"), name="o_proj", **kw)(y)
        x = x + nn.with_logical_constraint(y * layer_scale("layer_scale1"), ACTIVATION_AXES)

        y = LayerNorm(cfg.layer_norm_eps, name="norm2", **kw)(x)
        if cfg.use_swiglu_ffn:
            gate = dense(cfg.mlp_dim, ("embed", "mlp"), name="gate_proj", **kw)(y)
            up = dense(cfg.mlp_dim, ("embed", "mlp"), name="up_proj", **kw)(y)
            y = dense(d, ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)
        else:
            y = ACTIVATIONS[cfg.hidden_act](dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(y))
            y = dense(d, ("mlp", "embed"), name="fc2", **kw)(y)
        return x + nn.with_logical_constraint(y * layer_scale("layer_scale2"), ACTIVATION_AXES)


def _keep_hidden_state(block, carry, slot):
    """One scan step: run the block and write its output into `saved[slot]`.

    Unrequested layers write into a spare last slot, so only the requested hidden
    states are kept (not all L) and the step is the same for every layer.
    """
    x, saved = carry
    x = block(x)
    return (x, jax.lax.dynamic_update_index_in_dim(saved, x.astype(saved.dtype), slot, 0)), None


def _layer_slots(indices: Sequence[int], num_layers: int) -> tuple[list[int], np.ndarray]:
    """(each requested index normalised to 0…L, int32[L]: the saved slot of block l's output, or the spare slot)."""
    normalised = []
    for i in indices:
        if not -(num_layers + 1) <= i <= num_layers:
            raise IndexError(f"hidden state {i} out of range for {num_layers} layers (0 … {num_layers}, or negative)")
        normalised.append(i % (num_layers + 1))
    kept = sorted({i for i in normalised if i > 0})
    slots = np.full(num_layers, len(kept), np.int32)
    for slot, i in enumerate(kept):
        slots[i - 1] = slot
    return normalised, slots


@flax.struct.dataclass
class DINOv2Output:
    """last_hidden_state: float[B, T, D] after the final LayerNorm; hidden_states: the requested
    entries of transformers' hidden_states, each float[B, T, D] (no final norm); grid: (h, w)."""

    last_hidden_state: jax.Array
    hidden_states: tuple = ()
    grid: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))


def patch_grid(tokens, grid: tuple[int, int], config: DINOv2Config):
    """tokens: float[B, T, D] → float[B, h, w, D]: the patches, class and register tokens dropped."""
    b, _, d = tokens.shape
    return tokens[:, config.num_prefix_tokens :].reshape(b, *grid, d)


class DINOv2Model(nn.Module):
    """Patch embedding, class (+ register) tokens, position embeddings, L blocks, final LayerNorm."""

    config: DINOv2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, pixel_values, *, hidden_layers: Sequence[int] = ()):
        """Encodes images.

        Args:
          pixel_values: float[B, H, W, C], normalised (see `normalize_pixels`); any size of
            at least one patch (a remainder of fewer than P pixels is dropped, as the
            patch conv does); position embeddings are resized to the h×w patch grid.
          hidden_layers: indices into transformers' hidden_states tuple to return
            (e.g. (-3, -2, -1)); only those are kept.
        Returns:
          DINOv2Output.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, g = cfg.hidden_size, cfg.grid_size
        patches = conv(d, cfg.patch_size, strides=cfg.patch_size, padding=0, name="patch_embedding", **kw)(
            pixel_values.astype(self.dtype)
        )
        b, h, w, _ = patches.shape
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", partitioned(init, ("embed",)), (d,), self.param_dtype)
        positions = self.param("position_embeddings", partitioned(init, (None, "embed")), (g * g + 1, d),
                               self.param_dtype)
        grid = interpolate_grid(positions[1:].reshape(g, g, d), (h, w), cfg.antialias).reshape(h * w, d)
        positions = jnp.concatenate([positions[:1].astype(jnp.float32), grid], axis=0).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches.reshape(b, h * w, d)], 1)
        x = x + positions
        if cfg.num_register_tokens:
            registers = self.param("register_tokens", partitioned(nn.initializers.zeros, (None, "embed")),
                                   (cfg.num_register_tokens, d), self.param_dtype)
            registers = jnp.broadcast_to(registers.astype(self.dtype), (b, cfg.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        indices, slots = _layer_slots(hidden_layers, cfg.num_layers)
        block = (nn.remat(Block, prevent_cse=False) if cfg.remat else Block)(
            cfg, attention=self.attention, name="layers", **kw
        )
        scan = nn.scan(
            _keep_hidden_state,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        saved = jnp.zeros((int(slots.max(initial=0)) + 1, *x.shape), x.dtype)
        out, saved = scan(block, (x, saved), jnp.asarray(slots))[0]
        hidden = tuple(x if i == 0 else saved[slots[i - 1]] for i in indices)
        out = LayerNorm(cfg.layer_norm_eps, name="layernorm", **kw)(out)
        return DINOv2Output(last_hidden_state=out, hidden_states=hidden, grid=(h, w))


def example_inputs(config: DINOv2Config, batch: int = 1):
    """Zero images of the configured size, e.g. for `jax.eval_shape(model.init, rng, *example_inputs(cfg))`."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
