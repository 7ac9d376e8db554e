"""Beyond Editing Pairs' learnable edit region: where to edit, from CLIP patch tokens and the instruction.

Shapes: B batch, P image patches (h·w, no class token), Di patch-token width (CLIP vision),
T instruction tokens, Dt instruction width (T5), D width, F MLP hidden width, E the CLIP
joint embedding width, N heads.

The paper's §3.2, Eq. 1-3 (pre-LN residuals, bias-free attention projections):

  x = image_proj(F_I)      c = text_norm(text_proj(F_c))                     [B, P, D], [B, T, D]
  x += MHA(q = LN(x), k|v = c, padding keys masked)      Eq. 1, F_fused
  x += MHA(q = LN(x), k|v = LN(x))                        Eq. 2, F'_fused (returned as `fused`)
  logits = W₂·GELU(W₁·LN(x))                              Eq. 3, one logit per patch   [B, P]
  M = sigmoid(logits), thresholded and laid out on the h × w patch grid

and the semantic projection g of Eq. 4-5 (mean-pool → LN → Linear → GELU → Linear to E),
applied to `fused` and to the source's own tokens, image_proj(F_I). The paper gives no
sizes beyond its encoders (CLIP ViT-L/14 and FLAN-T5-Base, both 768 wide); the rest of the
defaults are ours.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.linear import dense
from fireedit_jax.nn.multihead import MultiHeadAttention
from fireedit_jax.nn.norms import LayerNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class RegionPredictorConfig:
    """Region predictor dimensions; the defaults follow the paper's encoders (768 wide).

    initial_probability: every patch's edit probability at initialisation (the head's bias).
    """

    image_dim: int = 768  # CLIP ViT-L/14 patch tokens, the paper's 768 (the joint-space width)
    text_dim: int = 768  # FLAN-T5-Base's d_model
    width: int = 768
    num_heads: int = 12
    mlp_hidden: int = 768
    embed_dim: int = 768  # CLIP ViT-L/14's projection_dim
    initial_probability: float = 0.15
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("image_dim", "text_dim", "width", "num_heads", "mlp_hidden", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegionPredictorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} does not split into {self.num_heads} heads")
        if not 0.0 < self.initial_probability < 1.0:
            raise ValueError(f"initial_probability must lie in (0, 1), got {self.initial_probability}")


@flax.struct.dataclass
class RegionPrediction:
    """logits: float32[B, P], pre-sigmoid (the edit probability is sigmoid(logits));
    fused: float[B, P, D], the instruction-fused patch features F'_fused;
    fused_embedding: float32[B, E] = g(fused), for L_sa's target term (Eq. 4);
    image_embedding: float32[B, E] = g(image_proj(F_I)), for L_sa's source term (Eq. 5)."""

    logits: jax.Array
    fused: jax.Array
    fused_embedding: jax.Array
    image_embedding: jax.Array


class SemanticProjection(nn.Module):
    """g: spatial tokens → one vector in the CLIP joint space (mean-pool, LN, 2-layer GELU MLP).

    Params: norm, hidden, out.
    """

    hidden: int
    embed_dim: int
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        """tokens: float[B, P, D] → float32[B, E]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
        h = LayerNorm(self.layer_norm_eps, name="norm", **kw)(pooled)
        h = jax.nn.gelu(dense(self.hidden, ("embed", "mlp"), name="hidden", **kw)(h), approximate=False)
        return dense(self.embed_dim, ("mlp", "embed"), name="out", **kw)(h).astype(jnp.float32)


class RegionPredictor(nn.Module):
    """Instruction-conditioned per-patch edit logits, plus g on the fused and the source features.

    Params: image_proj, text_proj, text_norm, cross_attention_norm, cross_attention,
    self_attention_norm, self_attention, head_norm, head_hidden, head_out, semantic_projection.
    """

    config: RegionPredictorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, image_tokens, text_tokens, text_mask) -> RegionPrediction:
        """Predicts the edit region.

        Args:
          image_tokens: float[B, P, Di], the source's CLIP vision patch tokens (no class token).
          text_tokens: float[B, T, Dt], the instruction's T5 encoder states.
          text_mask: bool[B, T], True on real tokens; every example needs at least one.
        Returns:
          RegionPrediction (logits float32[B, P], fused float[B, P, D], and the two g embeddings).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if image_tokens.shape[-1] != cfg.image_dim or text_tokens.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"RegionPredictor expects image tokens {cfg.image_dim} and text tokens {cfg.text_dim} wide, "
                f"got {image_tokens.shape[-1]} and {text_tokens.shape[-1]}"
            )
        if text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask {text_mask.shape} does not match text tokens {text_tokens.shape[:2]}")
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731
        # Bias-free: a key bias shifts all of a query's scores equally, so softmax ignores it.
        attend = lambda name: MultiHeadAttention(cfg.num_heads, use_bias=False, attention=self.attention,  # noqa: E731
                                                 name=name, **kw)  # fmt: skip

        image = dense(cfg.width, ("embed", "mlp"), name="image_proj", **kw)(image_tokens.astype(self.dtype))
        text = dense(cfg.width, ("embed", "mlp"), name="text_proj", **kw)(text_tokens.astype(self.dtype))
        text = norm("text_norm")(text)
        x = image + attend("cross_attention")(norm("cross_attention_norm")(image), text, text_mask)
        h = norm("self_attention_norm")(x)
        fused = x + attend("self_attention")(h, h)

        h = norm("head_norm")(fused)
        h = jax.nn.gelu(dense(cfg.mlp_hidden, ("embed", "mlp"), name="head_hidden", **kw)(h), approximate=False)
        prior = math.log(cfg.initial_probability / (1.0 - cfg.initial_probability))
        # Starting at 0.5 everywhere would mark the whole image for editing; a small prior
        # (initial_probability, 0.15) starts from "edit little" and the losses grow the region
        # where the target text needs it, while sigmoid' = p(1 - p) stays far from 0. Small
        # output weights keep every patch near that prior; not zero, so gradients reach below.
        small = nn.initializers.variance_scaling(1e-2, "fan_in", "normal")
        head_out = dense(1, ("mlp", None), kernel_init=small, bias_init=nn.initializers.constant(prior),
                         name="head_out", **kw)  # fmt: skip
        logits = head_out(h)[..., 0].astype(jnp.float32)

        g = SemanticProjection(cfg.mlp_hidden, cfg.embed_dim, cfg.layer_norm_eps, name="semantic_projection", **kw)
        # The paper applies "the same network g" to F_fused (D wide) and F_I (Di wide): F_I
        # enters g through the predictor's own image_proj, the features Eq. 1 starts from.
        return RegionPrediction(logits=logits, fused=fused, fused_embedding=g(fused), image_embedding=g(image))


def probability_grid(logits, grid: int | tuple[int, int]):
    """logits: float[B, P] → the edit probabilities float32[B, h, w] on the patch grid (P = h·w,
    row-major as CLIP's patches; `grid` = h = w, or (h, w))."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if logits.shape[-1] != h * w:
        raise ValueError(f"{logits.shape[-1]} patch logits do not fill a {h} × {w} grid")
    return jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], h, w)


def threshold_mask(prob, threshold: float = 0.5):
    """Probabilities float[...] → the edit mask float32[...] (1 where prob > threshold; the
    edit loop's mask convention)."""
    return (prob > threshold).astype(jnp.float32)


def example_inputs(config: RegionPredictorConfig, batch: int = 1, patches: int = 4, text_tokens: int = 8):
    """Zero inputs with every text token real, e.g. for `jax.eval_shape(RegionPredictor(cfg).init, rng, *...)`."""
    return (
        jnp.zeros((batch, patches, config.image_dim), jnp.float32),
        jnp.zeros((batch, text_tokens, config.text_dim), jnp.float32),
        jnp.ones((batch, text_tokens), bool),
    )
