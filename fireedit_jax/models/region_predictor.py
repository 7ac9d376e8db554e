"""The region predictor: where to edit, from image tokens, the instruction and (optionally) proposals.

Shapes: B batch, P = h·w image tokens (no class token), Di their width, T instruction tokens,
Dt instruction width, R proposal boxes, Db box-token width, D width, F MLP hidden width, E the
CLIP joint embedding width, s the sub-patch factor.

Beyond Editing Pairs' §3.2, Eq. 1-3 (the defaults; pre-LN residuals, bias-free attention
projections):

  x = image_proj(F_I)      c = text_norm(text_proj(F_c))                     [B, P, D], [B, T, D]
  x += MHA(q = LN(x), k|v = c, padding keys masked)      Eq. 1, F_fused
  x += MHA(q = LN(x), k|v = LN(x))                        Eq. 2, F'_fused (returned as `fused`)
  logits = W₂·GELU(W₁·LN(x))                              Eq. 3, one logit per patch   [B, P]
  M = sigmoid(logits), thresholded and laid out on the h × w patch grid

and the semantic projection g of Eq. 4-5 (mean-pool → LN → Linear → GELU → Linear to E),
applied to `fused` and to the source's own tokens, image_proj(F_I). The paper gives no sizes
beyond its encoders (CLIP ViT-L/14 and FLAN-T5-Base, both 768 wide); the rest is ours.

Grounded editing (the region head trained on edit pairs) widens it, each by a config field:
  num_layers   blocks of (cross-attention, self-attention[, MLP with block_mlp]): relations
               between objects ("the leftmost square") need more than one
  subpixel     each token predicts s × s logits, a grid s times finer than its own (a
               2-pixel-patch grid outlines a 5-pixel object only to within a pixel)
  coordinates  each token's (x, y) on its grid, embedded and added (tokens without position
               embeddings: the VLM's image states)
  score_boxes  proposals join the sequence: one token per box (its own features, e.g. the VLM's
               region states, or the image tokens it covers, mean-pooled; + its geometry) and
               one "no box" token; `box_logits` [B, R + 1] score which box is edited, the last
               entry none of them (an addition, the background): Groma's answer with a region.
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
NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class RegionPredictorConfig:
    """Region predictor dimensions; the defaults follow the paper's encoders (768 wide) and its
    single (cross-attention, self-attention) block.

    initial_probability: every patch's edit probability at initialisation (the head's bias).
    box_dim: the width of given box tokens (FireEdit: the LLM's); 0 = pooled from the image tokens.
    """

    image_dim: int = 768  # CLIP ViT-L/14 patch tokens, the paper's 768 (the joint-space width)
    text_dim: int = 768  # FLAN-T5-Base's d_model
    width: int = 768
    num_heads: int = 12
    mlp_hidden: int = 768
    embed_dim: int = 768  # CLIP ViT-L/14's projection_dim
    initial_probability: float = 0.15
    layer_norm_eps: float = 1e-5
    num_layers: int = 1
    block_mlp: bool = False
    subpixel: int = 1
    coordinates: bool = False
    score_boxes: bool = False
    box_dim: int = 0

    def __post_init__(self):
        for name in ("image_dim", "text_dim", "width", "num_heads", "mlp_hidden", "embed_dim", "num_layers", "subpixel"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegionPredictorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} does not split into {self.num_heads} heads")
        if not 0.0 < self.initial_probability < 1.0:
            raise ValueError(f"initial_probability must lie in (0, 1), got {self.initial_probability}")
        if self.box_dim < 0:
            raise ValueError(f"RegionPredictorConfig.box_dim must be ≥ 0, got {self.box_dim}")


@flax.struct.dataclass
class RegionPrediction:
    """logits: float32[B, P·s²], pre-sigmoid per cell of the (s times finer) grid, row-major;
    fused: float[B, P, D], the instruction-fused patch features F'_fused;
    fused_embedding: float32[B, E] = g(fused), for L_sa's target term (Eq. 4);
    image_embedding: float32[B, E] = g(image_proj(F_I)), for L_sa's source term (Eq. 5);
    box_logits: float32[B, R + 1] (score_boxes), padded boxes at NEG_INF, the last entry "no box"; else None;
    box: float32[B, 4] (score_boxes) the edit's box regressed from the "no box" token (normalised xyxy),
      the region where no proposal is edited (an addition); else None."""

    logits: jax.Array
    fused: jax.Array
    fused_embedding: jax.Array
    image_embedding: jax.Array
    box_logits: jax.Array | None = None
    box: jax.Array | None = None


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


class PredictorBlock(nn.Module):
    """x += MHA(LN(x), text); x += MHA(LN(x), LN(x)) over the tokens not masked out; [x += MLP(LN(x))].

    Params: cross_attention_norm, cross_attention, self_attention_norm, self_attention
    (+ mlp_norm, mlp_hidden, mlp_out).
    """

    config: RegionPredictorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, text, text_mask, token_mask=None):
        """x: float[B, S, D]; text: float[B, T, D]; text_mask: bool[B, T]; token_mask: bool[B, S] | None."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731
        # Bias-free: a key bias shifts all of a query's scores equally, so softmax ignores it.
        attend = lambda name: MultiHeadAttention(cfg.num_heads, use_bias=False, attention=self.attention,  # noqa: E731
                                                 name=name, **kw)  # fmt: skip
        x = x + attend("cross_attention")(norm("cross_attention_norm")(x), text, text_mask)
        h = norm("self_attention_norm")(x)
        x = x + attend("self_attention")(h, h, token_mask)
        if cfg.block_mlp:
            h = dense(cfg.mlp_hidden, ("embed", "mlp"), name="mlp_hidden", **kw)(norm("mlp_norm")(x))
            x = x + dense(cfg.width, ("mlp", "embed"), name="mlp_out", **kw)(jax.nn.gelu(h, approximate=False))
        return x


class RegionPredictor(nn.Module):
    """Instruction-conditioned edit logits per (sub-)patch, [per proposal], and g on the fused and
    the source features.

    Params: image_proj, text_proj, text_norm, block_0 … block_{L-1}, head_norm, head_hidden,
    head_out, semantic_projection (+ coordinate_proj) (+ box_geometry, no_box, box_proj if box_dim,
    box_norm, box_out).
    """

    config: RegionPredictorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, image_tokens, text_tokens, text_mask, boxes=None, box_mask=None, box_tokens=None,
                 ) -> RegionPrediction:  # fmt: skip
        """Predicts the edit region.

        Args:
          image_tokens: float[B, P, Di] on a square h × w grid (row-major; CLIP's patch tokens
            without the class token, or the VLM's image states).
          text_tokens: float[B, T, Dt], the instruction's encoder states.
          text_mask: bool[B, T], True on real tokens; every example needs at least one.
          boxes, box_mask: float[B, R, 4] normalised xyxy, bool[B, R] (score_boxes; None: no proposals).
          box_tokens: float[B, R, Db] the boxes' own features (box_dim > 0), else pooled from the image.
        Returns:
          RegionPrediction.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if image_tokens.shape[-1] != cfg.image_dim or text_tokens.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"RegionPredictor expects image tokens {cfg.image_dim} and text tokens {cfg.text_dim} wide, "
                f"got {image_tokens.shape[-1]} and {text_tokens.shape[-1]}"
            )
        if text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask {text_mask.shape} does not match text tokens {text_tokens.shape[:2]}")
        b, p, _ = image_tokens.shape
        grid = math.isqrt(p)
        if grid * grid != p:
            raise ValueError(f"{p} image tokens do not fill a square grid")
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731

        image = dense(cfg.width, ("embed", "mlp"), name="image_proj", **kw)(image_tokens.astype(self.dtype))
        text = norm("text_norm")(dense(cfg.width, ("embed", "mlp"), name="text_proj", **kw)(text_tokens.astype(self.dtype)))
        x = image
        if cfg.coordinates:
            x = x + dense(cfg.width, (None, "mlp"), name="coordinate_proj", **kw)(grid_centres(grid, b).astype(self.dtype))
        token_mask = None
        if cfg.score_boxes:
            if boxes is None:
                boxes, box_mask = jnp.zeros((b, 0, 4), jnp.float32), jnp.zeros((b, 0), bool)
            box_mask = jnp.ones(boxes.shape[:2], bool) if box_mask is None else jnp.asarray(box_mask, bool)
            proposals = self._box_tokens(image, boxes, box_tokens, grid)
            no_box = self.param("no_box", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp")),
                                (1, cfg.width), self.param_dtype)  # fmt: skip
            x = jnp.concatenate([x, proposals, jnp.broadcast_to(no_box.astype(x.dtype), (b, 1, cfg.width))], axis=1)
            token_mask = jnp.concatenate([jnp.ones((b, p), bool), box_mask, jnp.ones((b, 1), bool)], axis=1)
        for i in range(cfg.num_layers):
            x = PredictorBlock(cfg, attention=self.attention, name=f"block_{i}", **kw)(x, text, text_mask, token_mask)
        fused = x[:, :p]

        h = norm("head_norm")(fused)
        h = jax.nn.gelu(dense(cfg.mlp_hidden, ("embed", "mlp"), name="head_hidden", **kw)(h), approximate=False)
        prior = math.log(cfg.initial_probability / (1.0 - cfg.initial_probability))
        # Starting at 0.5 everywhere would mark the whole image for editing; a small prior
        # (initial_probability, 0.15) starts from "edit little" and the losses grow the region
        # where the target text needs it, while sigmoid' = p(1 - p) stays far from 0. Small
        # output weights keep every patch near that prior; not zero, so gradients reach below.
        small = nn.initializers.variance_scaling(1e-2, "fan_in", "normal")
        s = cfg.subpixel
        head_out = dense(s * s, ("mlp", None), kernel_init=small, bias_init=nn.initializers.constant(prior),
                         name="head_out", **kw)  # fmt: skip
        cells = head_out(h).astype(jnp.float32).reshape(b, grid, grid, s, s).transpose(0, 1, 3, 2, 4)
        logits = cells.reshape(b, p * s * s)

        box_logits = box = None
        if cfg.score_boxes:
            h = norm("box_norm")(x[:, p:])
            scores = dense(1, ("mlp", None), name="box_out", **kw)(h)[..., 0]
            box_logits = jnp.where(token_mask[:, p:], scores.astype(jnp.float32), NEG_INF)
            box = self._regress_box(h, scores, token_mask[:, p:], boxes)

        g = SemanticProjection(cfg.mlp_hidden, cfg.embed_dim, cfg.layer_norm_eps, name="semantic_projection", **kw)
        # The paper applies "the same network g" to F_fused (D wide) and F_I (Di wide): F_I
        # enters g through the predictor's own image_proj, the features Eq. 1 starts from.
        return RegionPrediction(logits=logits, fused=fused, fused_embedding=g(fused), image_embedding=g(image),
                                box_logits=box_logits, box=box)  # fmt: skip

    def _regress_box(self, h, box_scores, box_mask, boxes):
        """The edit's box where no proposal is edited, float32[B, 4] xyxy: the "no box" token points
        (softly) at an anchor, a proposal or the whole image (an addition beside an object, or in a
        corner), and an MLP maps its state and the anchor's geometry to (centre, size) in [0, 1].
        A proposal's anchor score is its edit score (`box_out`): the object the instruction names
        is the one to add beside; the whole image has its own score from the "no box" token.

        h: float[B, R + 1, D] the normed box tokens, "no box" last; box_scores: float[B, R + 1];
        box_mask: bool[B, R + 1]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32), (boxes.shape[0], 1, 4))
        anchors = jnp.concatenate([boxes.astype(jnp.float32), whole], axis=1)
        image_score = dense(1, ("mlp", None), name="image_anchor_out", **kw)(h[:, -1:])[..., 0]
        scores = jnp.concatenate([box_scores[:, :-1], image_score], axis=1).astype(jnp.float32)
        weights = jax.nn.softmax(jnp.where(box_mask, scores, NEG_INF), axis=-1)
        anchor = jnp.einsum("br,brc->bc", weights, anchors)
        features = jnp.concatenate([h[:, -1], box_geometry(anchor).astype(h.dtype)], axis=-1)
        hidden = jax.nn.gelu(dense(cfg.mlp_hidden, (None, "mlp"), name="box_regression_hidden", **kw)(features),
                             approximate=False)  # fmt: skip
        # (centre, size) linear in the anchor's geometry, the coefficients read from the tokens: "left of
        # X" is x1 = X.x0 − gap, whatever X. Small coefficients and a small central box at init.
        small = nn.initializers.variance_scaling(1e-2, "fan_in", "normal")
        coefficients = dense(4 * 8, ("mlp", None), kernel_init=small, name="box_regression", **kw)(hidden)
        offset = dense(4, ("mlp", None), kernel_init=small, name="box_offset", **kw,
                       bias_init=lambda *_: jnp.asarray([0.5, 0.5, 0.2, 0.2], jnp.float32))(hidden)  # fmt: skip
        geometry = (box_geometry(anchor) + 1.0) / 2.0  # in [0, 1]
        centre_size = jnp.einsum("bij,bj->bi", coefficients.astype(jnp.float32).reshape(-1, 4, 8), geometry)
        centre_size = centre_size + offset.astype(jnp.float32)
        centre, half = centre_size[:, :2], jnp.abs(centre_size[:, 2:]) / 2
        return jnp.clip(jnp.concatenate([centre - half, centre + half], -1), 0.0, 1.0)

    def _box_tokens(self, image, boxes, box_tokens, grid: int):
        """float[B, R, D]: each box's features (given, projected; or the image tokens it covers,
        mean-pooled) + an embedding of its geometry (corners, centre, size)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.box_dim:
            if box_tokens is None or box_tokens.shape[-1] != cfg.box_dim:
                raise ValueError(f"the region predictor reads {cfg.box_dim}-wide box tokens (box_dim), got "
                                 f"{None if box_tokens is None else box_tokens.shape}")  # fmt: skip
            features = dense(cfg.width, ("embed", "mlp"), name="box_proj", **kw)(box_tokens.astype(self.dtype))
        else:
            weights = box_coverage(boxes, grid)  # [B, R, P]
            pooled = jnp.einsum("brp,bpd->brd", weights, image.astype(jnp.float32))
            features = (pooled / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-6)).astype(self.dtype)
        h = dense(cfg.mlp_hidden, (None, "mlp"), name="box_geometry_hidden", **kw)(box_geometry(boxes).astype(self.dtype))
        return features + dense(cfg.width, ("mlp", "embed"), name="box_geometry", **kw)(jax.nn.gelu(h, approximate=False))


def box_geometry(boxes):
    """float[..., 4] normalised xyxy → float32[..., 8]: corners, centre and size, mapped to [-1, 1]."""
    boxes = boxes.astype(jnp.float32)
    geometry = jnp.concatenate([boxes, (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
    return 2.0 * geometry - 1.0


def grid_centres(grid: int, batch: int = 1):
    """float32[batch, grid², 2]: each cell's centre (x, y) in [-1, 1], row-major."""
    centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid * 2.0 - 1.0
    ys, xs = jnp.meshgrid(centres, centres, indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], -1).reshape(1, grid * grid, 2), (batch, grid * grid, 2))


def box_coverage(boxes, height: int, width: int | None = None):
    """float[B, R, 4] normalised xyxy → float32[B, R, h·w]: the share of each cell of an h × w grid
    (row-major; w = h by default) inside each box (1 for a cell wholly inside, > 0 for one it touches)."""
    width = height if width is None else width
    boxes = boxes.astype(jnp.float32)

    def overlap(lo, hi, cells):  # [B, R] → [B, R, cells]: per cell along one axis
        edges = jnp.arange(cells + 1, dtype=jnp.float32) / cells
        return jnp.clip(jnp.minimum(hi[..., None], edges[1:]) - jnp.maximum(lo[..., None], edges[:-1]), 0.0) * cells

    along_x, along_y = overlap(boxes[..., 0], boxes[..., 2], width), overlap(boxes[..., 1], boxes[..., 3], height)
    return (along_y[..., :, None] * along_x[..., None, :]).reshape(*boxes.shape[:2], height * width)


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


def cell_probability(logits, height: int, width: int):
    """Cell logits float[B, n²] (row-major) → the edit probability float32[B, H, W], each cell's value
    over the pixels it covers (nearest)."""
    grid = probability_grid(logits, math.isqrt(logits.shape[-1]))[..., None]
    return jax.image.resize(grid, (grid.shape[0], height, width, 1), "nearest")[..., 0]


def edit_region(prediction: RegionPrediction, height: int, width: int, boxes=None, *, threshold: float = 0.5,
                cells_box: bool = False):  # fmt: skip
    """An edit's mask float32[B, H, W] in {0, 1} from a prediction: with box scores, the box the
    predictor picks (boxes: the proposals float[B, R, 4] it scored), or where it picks none of them
    (or there are none) its regressed box; else the cells above `threshold` (their bounding box with
    `cells_box`)."""
    if prediction.box_logits is None:
        cells = threshold_mask(cell_probability(prediction.logits, height, width), threshold)
        return bounding_box_mask(cells) if cells_box else cells
    choice = jnp.argmax(prediction.box_logits, axis=-1)  # R = "no box"
    candidates = prediction.box[:, None]
    if boxes is not None and boxes.shape[1]:
        candidates = jnp.concatenate([boxes.astype(jnp.float32), candidates], axis=1)
    else:
        choice = jnp.zeros_like(choice)
    return box_pixels(jnp.take_along_axis(candidates, choice[:, None, None], axis=1)[:, 0], height, width)


def box_pixels(boxes, height: int, width: int):
    """float[B, 4] normalised xyxy → float32[B, H, W]: 1 on the pixels whose centres lie in the box
    (a box on pixel edges covers exactly its pixels)."""
    ys, xs = ((jnp.arange(n, dtype=jnp.float32) + 0.5) / n for n in (height, width))
    inside = lambda c, lo, hi: (c >= lo[:, None]) & (c < hi[:, None])  # noqa: E731
    rows, cols = inside(ys, boxes[:, 1], boxes[:, 3]), inside(xs, boxes[:, 0], boxes[:, 2])
    return (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)


def bounding_box_mask(mask):
    """float[B, H, W] in {0, 1} → float32[B, H, W]: 1 on each mask's bounding box (all 0 for an empty mask)."""
    rows, cols = jnp.any(mask > 0, axis=2), jnp.any(mask > 0, axis=1)  # [B, H], [B, W]

    def span(line):  # [B, N] → bool[B, N]: between the first and the last True
        return (jnp.cumsum(line, axis=1) > 0) & (jnp.cumsum(line[:, ::-1], axis=1)[:, ::-1] > 0)

    return (span(rows)[:, :, None] & span(cols)[:, None, :]).astype(jnp.float32)


def example_inputs(config: RegionPredictorConfig, batch: int = 1, patches: int = 4, text_tokens: int = 8):
    """Zero inputs with every text token real, e.g. for `jax.eval_shape(RegionPredictor(cfg).init, rng, *...)`;
    with score_boxes also two boxes (and their tokens when box_dim)."""
    inputs = (
        jnp.zeros((batch, patches, config.image_dim), jnp.float32),
        jnp.zeros((batch, text_tokens, config.text_dim), jnp.float32),
        jnp.ones((batch, text_tokens), bool),
    )
    if not config.score_boxes:
        return inputs
    boxes = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.5, 0.5], jnp.float32), (batch, 2, 4))
    tokens = jnp.zeros((batch, 2, config.box_dim), jnp.float32) if config.box_dim else None
    return (*inputs, boxes, jnp.ones((batch, 2), bool), tokens)
