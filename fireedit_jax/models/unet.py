"""The Stable Diffusion 1.x UNet (diffusers' UNet2DConditionModel), with decoupled cross-attention.

Shapes: B batch, H/W feature-map height/width, C channels, T = H·W image tokens,
S context (text) tokens, V visual tokens, D context width, N heads, Hd head dim.
Feature maps are NHWC.

FireEdit makes every cross-attention decoupled (IP-Adapter style):
  Z' = Attn(Q, K1(context), V1(context)) + λ·Attn(Q, K2(visual), V2(visual)), then to_out,
with bias-free K2/V2 (`to_k_ip`, `to_v_ip`) that exist only when `config.decoupled`.
Optionally (`addition_embed_type="text"`, diffusers' option of that name) the context is also
attention-pooled into the time embedding; SD1.5 and IP2P have no such path.

Mask-guided editing (PromptEditDiff) injects spatial tokens G (the mask encoder's) with
`gated_injection`: each transformer block gets a gated layer after its self-attention, φ = 0 at
init, so a converted UNet is unchanged until the gates train. `injection_layer` picks it:
  "self"   GLIGEN's gated self-attention (diffusers' `attention_type="gated"`, converts):
           H = H + tanh(φ_a)·Attn([H, Linear(G)])[:T], H = H + tanh(φ_d)·FF(H); O((T + G)²)
  "cross"  PromptEditDiff's H = H + φ·Attn(H, F_M): H attends to Linear(G) alone, no FF; O(T·G),
           a few percent of the block where "self" adds a second self-attention and feed-forward
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PLAIN_DOWN and PLAIN_UP are not used here: configs/tiny.py imports them from this module.
from fireedit_jax.models.unet_config import CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, UNetConfig  # noqa: F401
from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.embeddings import TimestepMLP, sinusoidal_embedding
from fireedit_jax.nn.linear import conv, dense, partitioned
from fireedit_jax.nn.mlp import GEGLUFeedForward
from fireedit_jax.nn.norms import GroupNorm, LayerNorm

Dtype = Any

ACTIVATION_AXES = ("activation_batch", None, None, "activation_embed")
TRANSFORMER_NORM_EPS = 1e-6  # fixed in diffusers' Transformer2DModel, whatever norm_eps says


def _constrain(x):
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _maybe_remat(module_cls, config: UNetConfig):
    return _remat(module_cls) if config.remat else module_cls


@functools.cache
def _remat(module_cls):
    return nn.remat(module_cls)


def upsample_nearest(x, size: tuple[int, int]):
    """x: float[B, h, w, C] → float[B, H, W, C], as torch nearest interpolation (index = ⌊i·h/H⌋)."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    # torch's float32 source index: min(⌊i · (in / out)⌋, in − 1)
    index = lambda n_in, n_out: np.minimum(  # noqa: E731
        np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(int), n_in - 1
    )
    return x[:, index(h, size[0])][:, :, index(w, size[1])]


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3×3 conv, + time projection, GroupNorm, SiLU, 3×3 conv, + (1×1 conv) shortcut."""

    config: UNetConfig
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        """x: float[B, H, W, Cin]; temb: float[B, 4·C0] → float[B, H, W, out_channels]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name=name, **kw)  # noqa: E731
        h = conv(self.out_channels, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
        t = dense(self.out_channels, ("embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
        h = h + t[:, None, None, :]
        h = conv(self.out_channels, name="conv2", **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return _constrain(x + h)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection.

    Self-attention when `context` is None. With `decoupled`, a second key/value
    pair (to_k_ip, to_v_ip) attends to `visual` and is added λ-weighted before to_out.
    """

    heads: int
    decoupled: bool = False
    visual_scale: float = 1.0
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context=None, visual=None):
        """x: float[B, T, C]; context: float[B, S, D] | None; visual: float[B, V, D] | None → float[B, T, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        context = x if context is None else context

        def project(name, inputs):  # → float[B, L, N, Hd]
            y = dense(width, ("embed", "heads"), use_bias=False, name=name, **kw)(inputs)
            return y.reshape(*y.shape[:2], self.heads, width // self.heads)

        def attend(q, k, v):
            return dot_product_attention(q, k, v, implementation=self.attention)

        q = project("to_q", x)
        out = attend(q, project("to_k", context), project("to_v", context))
        if self.decoupled:
            if visual is None and self.is_initializing():
                visual = jnp.zeros((x.shape[0], 1, context.shape[-1]), x.dtype)  # creates to_k_ip/to_v_ip
            if visual is not None:
                ip = attend(q, project("to_k_ip", visual), project("to_v_ip", visual))
                out = out + jnp.asarray(self.visual_scale, out.dtype) * ip
        elif visual is not None:
            raise ValueError("visual tokens given to a UNet without the decoupled branch (config.decoupled=False)")
        out = out.reshape(*x.shape[:2], width)
        init = dict(kernel_init=nn.initializers.zeros) if self.zero_init_out else {}
        return dense(width, ("heads", "embed"), name="to_out", **init, **kw)(out)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention (decoupled if configured), GEGLU feed-forward."""

    config: UNetConfig
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context, visual, grounding):
        """x: float[B, T, C]; context: float[B, S, D]; visual: float[B, V, D] | None;
        grounding: float[B, G, D] | None (gated_injection) → float[B, T, C]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name, decoupled, zero: Attention(  # noqa: E731
            self.heads, decoupled, cfg.visual_scale, zero, attention=self.attention, name=name, **kw
        )
        x = x + attn("attn1", False, False)(LayerNorm(name="norm1", **kw)(x))
        if cfg.gated_injection:
            if grounding is None and self.is_initializing():
                grounding = jnp.zeros((x.shape[0], 1, context.shape[-1]), x.dtype)  # creates the fuser
            if grounding is not None:
                x = GatedInjection(self.heads, cfg.injection_layer, attention=self.attention, name="fuser", **kw)(
                    x, grounding
                )
        elif grounding is not None:
            raise ValueError("grounding tokens given to a UNet without gated injection (config.gated_injection=False)")
        x = x + attn("attn2", cfg.decoupled, cfg.zero_init_cross_out)(LayerNorm(name="norm2", **kw)(x), context, visual)
        return x + GEGLUFeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))


class GatedInjection(nn.Module):
    """The grounding tokens' gated layer (module docstring), each branch added through a tanh
    gate that starts at zero. layer="self": GLIGEN's GatedSelfAttentionDense, the features attend
    over themselves and the projected grounding tokens (only the feature positions are kept), then
    a gated GEGLU feed-forward; layer="cross": the features attend to the projected tokens alone."""

    heads: int
    layer: str = "self"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, grounding):
        """x: float[B, T, C]; grounding: float[B, G, D] → float[B, T, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = dense(x.shape[-1], ("embed", "mlp"), name="linear", **kw)(grounding.astype(self.dtype))
        attention = Attention(self.heads, attention=self.attention, name="attn", **kw)
        if self.layer == "cross":
            attended = attention(LayerNorm(name="norm1", **kw)(x), tokens)
        else:
            attended = attention(LayerNorm(name="norm1", **kw)(jnp.concatenate([x, tokens], axis=1)))[:, : x.shape[1]]

        def gate(name):  # tanh(φ), φ a learnt scalar from 0: the block starts as the identity
            return jnp.tanh(self.param(name, partitioned(nn.initializers.zeros, ()), (), self.param_dtype)).astype(x.dtype)

        x = x + gate("alpha_attn") * attended
        if self.layer == "cross":
            return x
        return x + gate("alpha_dense") * GEGLUFeedForward(name="ff", **kw)(LayerNorm(name="norm2", **kw)(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel on continuous input: GroupNorm, proj_in, blocks, proj_out, + input."""

    config: UNetConfig
    heads: int
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context, visual, grounding):
        """x: float[B, H, W, C]; context: float[B, S, D]; visual, grounding: float[B, ·, D] | None → float[B, H, W, C]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape

        def project(name, y):  # a 1×1 conv and a Linear are the same map on NHWC
            if cfg.use_linear_projection:
                return dense(channels, ("conv_in", "conv_out"), name=name, **kw)(y)
            return conv(channels, 1, padding=0, name=name, **kw)(y)

        h = project("proj_in", GroupNorm(cfg.norm_num_groups, TRANSFORMER_NORM_EPS, name="norm", **kw)(x))
        h = h.reshape(b, height * width, channels)
        for i in range(self.num_layers):
            h = TransformerBlock(cfg, self.heads, attention=self.attention, name=f"transformer_blocks_{i}", **kw)(
                h, context, visual, grounding
            )
        h = project("proj_out", h.reshape(b, height, width, channels))
        return _constrain(x + h)


class DownBlock(nn.Module):
    """One resolution level of the encoder: (resnet [, transformer]) × layers, then a strided conv."""

    config: UNetConfig
    level: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, temb, context, visual, grounding):
        """Returns the output and the skip tensors for the decoder, highest resolution first."""
        cfg, i, kw = self.config, self.level, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels[i]
        skips = []
        for j in range(cfg.layers_per_block[i]):
            x = _maybe_remat(ResnetBlock, cfg)(cfg, channels, name=f"resnets_{j}", **kw)(x, temb)
            if cfg.down_block_types[i] == CROSS_DOWN:
                x = _maybe_remat(SpatialTransformer, cfg)(
                    cfg, cfg.num_heads[i], cfg.transformer_layers_per_block[i],
                    attention=self.attention, name=f"attentions_{j}", **kw,
                )(x, context, visual, grounding)
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = conv(channels, strides=2, name="downsampler", **kw)(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, transformer, resnet at the lowest resolution."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, temb, context, visual, grounding):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels[-1]
        x = _maybe_remat(ResnetBlock, cfg)(cfg, channels, name="resnets_0", **kw)(x, temb)
        x = _maybe_remat(SpatialTransformer, cfg)(
            cfg, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1],
            attention=self.attention, name="attentions_0", **kw,
        )(x, context, visual, grounding)
        return _maybe_remat(ResnetBlock, cfg)(cfg, channels, name="resnets_1", **kw)(x, temb)


class UpBlock(nn.Module):
    """One decoder level (`index` 0 = lowest resolution): (concat skip, resnet [, transformer]) × (layers + 1), upsample."""

    config: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, skips, temb, context, visual, grounding, upsample_size=None):
        """skips: this level's encoder tensors, consumed last first; upsample_size: (H, W) or None."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        level = len(cfg.block_out_channels) - 1 - self.index  # the encoder level at this resolution
        channels = cfg.block_out_channels[level]
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = _maybe_remat(ResnetBlock, cfg)(cfg, channels, name=f"resnets_{j}", **kw)(x, temb)
            if cfg.up_block_types[self.index] == CROSS_UP:
                x = _maybe_remat(SpatialTransformer, cfg)(
                    cfg, cfg.num_heads[level], cfg.transformer_layers_per_block[level],
                    attention=self.attention, name=f"attentions_{j}", **kw,
                )(x, context, visual, grounding)
        if upsample_size is not None:
            x = conv(channels, name="upsampler", **kw)(upsample_nearest(x, upsample_size))
        return x


class AttentionPooling(nn.Module):
    """DeepFloyd IF's pooling: a query from the tokens' mean (+ a learnt embedding) attends over it and them."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: float[B, S, D] → float[B, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        position = self.param("positional_embedding", nn.initializers.normal(d**-0.5), (1, d), self.param_dtype)
        query = jnp.mean(x, axis=1, keepdims=True) + position.astype(x.dtype)  # float[B, 1, D]
        tokens = jnp.concatenate([query, x], axis=1)

        def heads(name, y):  # → float[B, L, N, D / N]
            return dense(d, ("embed", "heads"), name=name, **kw)(y).reshape(b, -1, self.heads, d // self.heads)

        q, k, v = heads("q_proj", query), heads("k_proj", tokens), heads("v_proj", tokens)
        return dot_product_attention(q, k, v).reshape(b, d)


class TextTimeEmbedding(nn.Module):
    """diffusers' TextTimeEmbedding: LayerNorm, AttentionPooling, Linear, LayerNorm (→ added to the time embedding)."""

    dim: int
    heads: int
    zero_init: bool = False  # norm2's scale starts at zero: nothing is added at init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context):
        """context: float[B, S, D] → float[B, dim]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = AttentionPooling(self.heads, name="pool", **kw)(LayerNorm(name="norm1", **kw)(context))
        x = dense(self.dim, ("embed", "mlp"), name="proj", **kw)(pooled)
        return LayerNorm(axis_name="mlp", zero_scale=self.zero_init, name="norm2", **kw)(x)


class UNet(nn.Module):
    """ε-prediction UNet of Stable Diffusion 1.x (InstructPix2Pix with in_channels=8)."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, sample, timesteps, context, visual=None, grounding=None):
        """Predicts the noise.

        Args:
          sample: float[B, H, W, Cin] (for IP2P: noisy latent ‖ image latent).
          timesteps: float[B] (or a scalar), in the scheduler's 0..1000 range.
          context: float[B, S, D] text conditioning (D = cross_attention_dim).
          visual: float[B, V, D] visual tokens for the decoupled branch, or None.
          grounding: float[B, G, D] tokens for the gated injection layer (gated_injection; the
            mask encoder's), or None: the fusers are skipped, exactly as a UNet without them.
        Returns:
          float[B, H, W, Cout].
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(attention=self.attention, **kw)
        levels = len(cfg.block_out_channels)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), sample.shape[:1])
        temb = sinusoidal_embedding(
            timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        temb = TimestepMLP(cfg.time_embed_dim, name="time_embedding", **kw)(temb.astype(self.dtype))
        context = context.astype(self.dtype)
        if cfg.addition_embed_type == "text":
            temb = temb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                            cfg.zero_init_cross_out, name="add_embedding", **kw)(context)  # fmt: skip
        visual = None if visual is None else visual.astype(self.dtype)
        grounding = None if grounding is None else grounding.astype(self.dtype)

        x = _constrain(conv(cfg.block_out_channels[0], name="conv_in", **kw)(sample.astype(self.dtype)))
        skips = [x]
        for i in range(levels):
            x, level_skips = DownBlock(cfg, i, name=f"down_blocks_{i}", **blocks)(x, temb, context, visual, grounding)
            skips += level_skips
        x = MidBlock(cfg, name="mid_block", **blocks)(x, temb, context, visual, grounding)
        for u in range(levels):
            n = cfg.layers_per_block[levels - 1 - u] + 1
            skips, level_skips = skips[:-n], skips[-n:]
            # Upsample to the next skip's size, so odd sizes round-trip as in diffusers.
            size = tuple(skips[-1].shape[1:3]) if u < levels - 1 else None
            x = UpBlock(cfg, u, name=f"up_blocks_{u}", **blocks)(x, level_skips, temb, context, visual, grounding, size)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, name="conv_out", **kw)(x)


def init_visual_from_text(params):
    """Copies every cross-attention's to_k/to_v kernel into to_k_ip/to_v_ip (IP-Adapter's init).

    Creates the visual leaves where they are absent (converted checkpoints), so
    `init_visual_from_text(convert_unet(...))` is a complete decoupled UNet. Works
    on plain and on logically boxed trees.
    """
    if not isinstance(params, Mapping):
        return params
    out = {k: init_visual_from_text(v) for k, v in params.items()}
    if "attn2" in out:
        attn = dict(out["attn2"])
        for text, visual in (("to_k", "to_k_ip"), ("to_v", "to_v_ip")):
            attn[visual] = {"kernel": jax.tree.map(jnp.array, attn[text]["kernel"])}
        out["attn2"] = attn
    return out
