"""FireEdit's Hybrid Visual Cross Attention (HVCA): learnable queries read the image features
under the guidance of the edit features; the result v enters the UNet's decoupled cross-attention.

Shapes: B batch, Q queries (16), S visual tokens, V visual width (1024), E edit tokens (77),
C edit width (768), D hidden width (1024), N heads, H head dim (D/N), O output width (768).

The paper gives L = 2 blocks of "two cross-attention layers and a feed-forward network",
16 queries, in 1024 / hidden 1024 / out 768. Everything else follows IP-Adapter Plus'
Resampler (tencent-ailab/IP-Adapter ip_adapter/resampler.py; REFERENCES.md §4):

  latents = latents₀ (N(0, D^-1/2))                                       [B, Q, D]
  x_v = visual_proj_in(visual)   x_e = edit_proj_in(edit)   (Linear with bias, to D)
  per block (pre-LN residuals):
    latents += PerceiverAttn(x_v, latents, mask)      visual features first,
    latents += PerceiverAttn(x_e, latents)            then the edit features,
    latents += W₂·GELU(W₁·LN(latents))                (4× wide, bias-free, exact GELU)
  v = LN(proj_out(latents))                                               [B, Q, O]
  PerceiverAttn(x, l) = Wo·MHA(q = Wq·LN_l(l), k|v = Wk|Wv·[LN_x(x) ‖ LN_l(l)])
    (bias-free q/k/v/out; the queries also attend to themselves, so a fully masked
    visual input still has keys)

LayerNorms use torch's default eps 1e-5. The visual tokens are the CLIP ViT-L/14
penultimate states and DINOv2's last states, each at 224 and 448, concatenated along the
token axis; their own position embeddings are all the position information (no source or
position embedding is added here, as in IP-Adapter). `visual_mask` drops tokens (e.g.
padding) exactly: a masked token acts as an absent one. The 2 blocks are unrolled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.multihead import MultiHeadAttention
from fireedit_jax.nn.linear import dense, partitioned
from fireedit_jax.nn.norms import LayerNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class HVCAConfig:
    """HVCA dimensions; the defaults are FireEdit's (supplement §1, Parameter Settings)."""

    num_queries: int = 16
    num_blocks: int = 2
    visual_dim: int = 1024  # CLIP ViT-L/14 and DINOv2-L/14 token width
    edit_dim: int = 768  # the Q-Former output width
    hidden: int = 1024
    num_heads: int = 16
    out_dim: int = 768  # the UNet's cross-attention width
    ffn_mult: int = 4
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} does not split into {self.num_heads} heads")

    @classmethod
    def fireedit(cls, **overrides) -> HVCAConfig:
        """FireEdit's HVCA: L = 2 blocks, 16 queries, 1024 → 1024 → 768, 16 heads of 64."""
        return cls(**overrides)


class PerceiverAttention(nn.Module):
    """IP-Adapter's PerceiverAttention: latents query [LN(x) ‖ LN(latents)].

    Params: norm_context, norm_latents, attention/{query,key,value,output} (bias-free).
    """

    config: HVCAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, latents, mask=None):
        """x: float[B, S, D]; latents: float[B, Q, D]; mask: bool[B, S] | None → float[B, Q, D] (the update)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = LayerNorm(cfg.layer_norm_eps, name="norm_latents", **kw)(latents)
        context = jnp.concatenate([LayerNorm(cfg.layer_norm_eps, name="norm_context", **kw)(x), normed], axis=1)
        if mask is not None:
            mask = jnp.concatenate([jnp.asarray(mask, bool), jnp.ones(latents.shape[:2], bool)], axis=1)
        return MultiHeadAttention(cfg.num_heads, use_bias=False, attention=self.attention, name="attention", **kw)(
            normed, context, mask
        )


class HVCABlock(nn.Module):
    """Cross-attention to the visual features, to the edit features, FFN; pre-LN residuals.

    Params: visual_attention, edit_attention (PerceiverAttention), ffn_norm, ffn_in, ffn_out.
    """

    config: HVCAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, latents, visual, visual_mask, edit):
        """latents: float[B, Q, D]; visual: float[B, S, D]; visual_mask: bool[B, S] | None;
        edit: float[B, E, D] → float[B, Q, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attend = lambda name: PerceiverAttention(cfg, attention=self.attention, name=name, **kw)  # noqa: E731
        latents = latents + attend("visual_attention")(visual, latents, visual_mask)
        latents = latents + attend("edit_attention")(edit, latents)
        h = LayerNorm(cfg.layer_norm_eps, name="ffn_norm", **kw)(latents)
        h = dense(cfg.ffn_mult * cfg.hidden, ("embed", "mlp"), use_bias=False, name="ffn_in", **kw)(h)
        h = jax.nn.gelu(h, approximate=False)
        return latents + dense(cfg.hidden, ("mlp", "embed"), use_bias=False, name="ffn_out", **kw)(h)


class HVCA(nn.Module):
    """Learnable queries, input projections, `num_blocks` HVCABlocks, proj_out + norm_out.

    Params: latents [Q, D], visual_proj_in, edit_proj_in, blocks_{i}, proj_out, norm_out.
    """

    config: HVCAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, visual, visual_mask, edit):
        """Refines the visual features into v.

        Args:
          visual: float[B, S, V], the hybrid image features (concatenated along tokens).
          visual_mask: bool[B, S], True on real tokens; None = all real.
          edit: float[B, E, C], the Q-Former output (the edit representation).
        Returns:
          float[B, Q, O]: the visual tokens v for the UNet's decoupled cross-attention.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if visual.shape[-1] != cfg.visual_dim or edit.shape[-1] != cfg.edit_dim:
            raise ValueError(
                f"HVCA expects visual features {cfg.visual_dim} and edit features {cfg.edit_dim} wide, "
                f"got {visual.shape[-1]} and {edit.shape[-1]}"
            )
        latents = self.param("latents", partitioned(nn.initializers.normal(cfg.hidden**-0.5), (None, "embed")),
                             (cfg.num_queries, cfg.hidden), self.param_dtype)
        latents = jnp.broadcast_to(latents.astype(self.dtype), (visual.shape[0], *latents.shape))
        visual = dense(cfg.hidden, ("embed", "mlp"), name="visual_proj_in", **kw)(visual.astype(self.dtype))
        edit = dense(cfg.hidden, ("embed", "mlp"), name="edit_proj_in", **kw)(edit.astype(self.dtype))
        for i in range(cfg.num_blocks):
            block = HVCABlock(cfg, attention=self.attention, name=f"blocks_{i}", **kw)
            latents = block(latents, visual, visual_mask, edit)
        out = dense(cfg.out_dim, ("mlp", "embed"), name="proj_out", **kw)(latents)
        return LayerNorm(cfg.layer_norm_eps, name="norm_out", **kw)(out)


def example_inputs(config: HVCAConfig, batch: int = 1, visual_tokens: int = 4, edit_tokens: int = 77):
    """Zero inputs, e.g. for `jax.eval_shape(HVCA(cfg).init, rng, *example_inputs(cfg))`."""
    return (
        jnp.zeros((batch, visual_tokens, config.visual_dim), jnp.float32),
        None,
        jnp.zeros((batch, edit_tokens, config.edit_dim), jnp.float32),
    )
