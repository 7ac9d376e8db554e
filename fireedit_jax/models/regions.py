"""RoIAlign and Groma's region encoder: one LLM-width token per box.

Shapes: B batch, R boxes per image (padded; ≤ 100 in FireEdit), H W a feature map,
C its channels, P Q the RoI output side (height, width), h w the ViT patch grid
(32 × 32 at 448 px), D the ViT width (1024), E the fused width (1024), S the RoI side
of the encoder (14), F the region width (1024), L the LLM width (4096).

Region encoder (Groma's MLVLROIQueryModule, FoundationVision/Groma
groma/model/roi_align.py; REFERENCES.md §5), on DINOv2 `hidden_states[-3:]`:

  levels[l] [B, h, w, D]  (levels[0] = hidden_states[-3], levels[-1] = hidden_states[-1])
    → bilinear resize (align_corners=True) by 2^(n-1-l): 4×, 2×, 1× (128², 64², 32²)
  mlvl_fuse:
    → ‖ (x, y) coordinate channels, each linspace(-1, 1) along its axis      [.., D + 2]
    → input_conv_{l}: 1×1 conv (per level)                                   [.., E]
    → num_fuse rounds (5), each: channel shuffle, then fuse_{i} = 3×3 conv (no bias)
      → GroupNorm(64) → ReLU, one conv shared by all levels of the round.
      Channel shuffle of level l, with s = E // 4 and k = E − 2s kept channels:
        [ x_l[..., :k] ‖ up(x_{min(l+1, n-1)}[..., k+s:]) ‖ up(x_{max(l-1, 0)}[..., k:k+s]) ]
      i.e. the last quarter comes from the next coarser level, the third quarter from
      the next finer one (a level at the end of the chain takes its own), each
      bilinearly resized (align_corners=True) to level l's size.
  per level: RoIAlign S × S (sampling_ratio 2, aligned) → level_conv_{l}: 3×3 conv
  Σ_l, ReLU, flatten (S·S·E, in our P, Q, E order), flatten_linear → F
  + box MLP: pos_fc_1 (4 → 256), ReLU, pos_norm_1, pos_fc_2 (256 → F), ReLU, pos_norm_2
  → out_proj (F → L). Padded boxes give zero tokens; each token depends on its box only.

Boxes are normalised xyxy in [0, 1] in our API. Two quirks of Groma's code
(REFERENCES.md §5 caveats), reproduced only with `groma_compat=True`:
  - Groma feeds its Deformable-DETR boxes (cx, cy, w, h) to both RoIAlign (which reads
    x1, y1, x2, y2) and the box MLP, without conversion. Compat mode converts our xyxy
    boxes to cxcywh and treats those numbers as Groma does.
  - Groma's declared strides (14/8, 14/4, 14/2) are half the true ones (3.5, 7, 14 px
    for 128², 64², 32² at 448), so its RoIs land at twice their place. Compat mode uses
    spatial scale 2·f/14 instead of the true f/14 for a level resized by f.
Groma's weights were trained with both quirks: load them with `groma_compat=True` to
reproduce Groma; a region encoder trained here uses the correct default.
RoIs are in pixels of the image the patch grid covers, (w·14) × (h·14); Groma hardcodes
448, which is the same at its 32 × 32 grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.linear import conv, dense
from fireedit_jax.nn.norms import GroupNorm, LayerNorm
from fireedit_jax.nn.resize import bilinear_resize

Dtype = Any


# ---------------------------------------------------------------------------- RoIAlign


def _divide(a, b):
    """a / b correctly rounded in practice: XLA may divide by multiplying with an approximate
    reciprocal, which puts samples that torchvision places exactly on a border (or a
    quotient that should be a whole number, fed to ceil) one ulp off."""
    q = a / b
    return q + (a - q * b) / b


def _axis_taps(start, end, pooled: int, size: int, sampling_ratio: int, aligned: bool, max_grid: int | None):
    """Bilinear taps along one axis for every output bin: (index, weight), each [B, R, pooled, K].

    Follows torchvision's CPU kernel: samples at start + p·bin + (i + ½)·bin/grid, zero
    outside [-1, size], clamped to the border inside it. The sample mean over a bin is
    separable, so the weights already carry the 1/grid factor of this axis.
    """
    length = end - start
    if not aligned:
        length = jnp.maximum(length, 1.0)  # torchvision forces malformed legacy RoIs to 1 px
    bin_size = _divide(length, float(pooled))
    if sampling_ratio > 0:
        n = sampling_ratio
        grid = jnp.full_like(length, float(sampling_ratio))
    else:
        n = max_grid if max_grid is not None else math.ceil(size / pooled)
        grid = jnp.minimum(jnp.ceil(_divide(length, float(pooled))), n)  # ≤ 0 for empty or reversed boxes: no samples
    samples = jnp.arange(n, dtype=jnp.float32)
    coord = (
        start[..., None, None]
        + jnp.arange(pooled, dtype=jnp.float32)[:, None] * bin_size[..., None, None]
        + _divide((samples + 0.5) * bin_size[..., None, None], jnp.maximum(grid, 1.0)[..., None, None])
    )  # [B, R, pooled, n]
    valid = (samples < grid[..., None, None]) & (coord >= -1.0) & (coord <= size)
    coord = jnp.clip(coord, 0.0, size)
    low = jnp.floor(coord).astype(jnp.int32)
    edge = low >= size - 1
    low = jnp.where(edge, size - 1, low)
    high = jnp.where(edge, size - 1, low + 1)
    frac = jnp.where(edge, 0.0, coord - low)
    weight = jnp.where(valid, 1.0, 0.0) / jnp.maximum(grid, 1.0)[..., None, None]
    index = jnp.stack([low, high], -1).reshape(*low.shape[:-1], 2 * n)
    weights = jnp.stack([(1.0 - frac) * weight, frac * weight], -1).reshape(index.shape)
    return index, weights


@functools.partial(
    jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned", "max_adaptive_grid")
)
def roi_align(
    features,
    boxes,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    mask=None,
    max_adaptive_grid: int | None = None,
):
    """torchvision.ops.roi_align (average pooling) on channels-last maps, batched per image.

    Args:
      features: float[B, H, W, C].
      boxes: float[B, R, 4], x1 y1 x2 y2 in input-image pixels; R may be 0.
      output_size: P or (P, Q).
      spatial_scale: feature cells per pixel (e.g. 1/16 for a stride-16 map).
      sampling_ratio: > 0: that many samples per bin along each axis (exact).
        ≤ 0: adaptive, ceil(box side / bins) samples, as torchvision; shapes stay static by
        evaluating at most `max_adaptive_grid` samples per bin and axis (default ceil(H / P),
        resp. ceil(W / Q)): exact for boxes up to max_adaptive_grid·P cells tall (by
        default any box no larger than the map); larger boxes are averaged over that many.
      aligned: True shifts boxes by -½ cell (Detectron2 / mmcv default); False is the
        legacy mode (boxes at least one cell wide).
      mask: bool[B, R], False for padding boxes, whose output is zero; None = all real.
    Returns:
      float32[B, R, P, Q, C].

    No gradient flows into `boxes` (as in torchvision). Gathers one bilinear tap pair at a
    time in a loop, so memory stays at the output's size however many samples a bin takes.
    """
    b, h, w, c = features.shape
    r = boxes.shape[1]
    p, q = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if r == 0:
        return jnp.zeros((b, 0, p, q, c), jnp.float32)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    if mask is not None:
        boxes = jnp.where(mask[..., None], boxes, 0.0)
    cells = boxes * spatial_scale - (0.5 if aligned else 0.0)
    y_index, y_weight = _axis_taps(cells[..., 1], cells[..., 3], p, h, sampling_ratio, aligned, max_adaptive_grid)
    x_index, x_weight = _axis_taps(cells[..., 0], cells[..., 2], q, w, sampling_ratio, aligned, max_adaptive_grid)
    flat = features.reshape(b, h * w, c)
    ky, kx = y_index.shape[-1], x_index.shape[-1]

    def add_tap(tap, out):
        i, j = tap // kx, tap % kx
        index = y_index[:, :, :, None, i] * w + x_index[:, :, None, :, j]  # [B, R, P, Q]
        weight = y_weight[:, :, :, None, i] * x_weight[:, :, None, :, j]
        values = jax.vmap(lambda f, idx: jnp.take(f, idx, axis=0))(flat, index)
        return out + values.astype(jnp.float32) * weight[..., None]

    out = jax.lax.fori_loop(0, ky * kx, add_tap, jnp.zeros((b, r, p, q, c), jnp.float32))
    if mask is not None:
        out = jnp.where(mask[:, :, None, None, None], out, 0.0)
    return out


# ---------------------------------------------------------------------------- region encoder


@dataclasses.dataclass(frozen=True)
class RegionEncoderConfig:
    """Region encoder dimensions; the defaults are Groma's on DINOv2-L/14 at 448 px."""

    feature_dim: int = 1024  # D, the ViT width of each input level
    embed_dim: int = 1024  # E, the fused width
    num_levels: int = 3
    num_fuse: int = 5
    norm_groups: int = 64
    roi_size: int = 14  # S
    sampling_ratio: int = 2
    region_dim: int = 1024  # F
    pos_hidden_dim: int = 256
    llm_dim: int = 4096  # L
    patch_size: int = 14  # image pixels per patch: RoIs are in pixels of the (w·14) × (h·14) image
    norm_eps: float = 1e-5
    groma_compat: bool = False  # reproduce Groma's cxcywh boxes and halved strides (module docstring)

    def __post_init__(self):
        if self.embed_dim % self.norm_groups:
            raise ValueError(f"embed_dim {self.embed_dim} does not split into {self.norm_groups} groups")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 for the channel shuffle")

    @classmethod
    def groma(cls, **overrides) -> RegionEncoderConfig:
        """Groma's module: 3 levels of 1024-wide DINOv2-L features, 14 × 14 RoIs, LLaMA-7B width."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> RegionEncoderConfig:
        """For tests: 16 channels, 4 × 4 RoIs, 2 fuse rounds."""
        fields = dict(feature_dim=12, embed_dim=16, num_fuse=2, norm_groups=4, roi_size=4, region_dim=24,
                      pos_hidden_dim=8, llm_dim=32, patch_size=4)  # fmt: skip
        return cls(**{**fields, **overrides})

    def level_factor(self, level: int) -> int:
        """The upsampling factor of input level `level` (4, 2, 1 for three levels)."""
        return 2 ** (self.num_levels - 1 - level)

    def spatial_scale(self, level: int) -> float:
        """Feature cells per image pixel at `level`; Groma's declared strides give twice the true scale."""
        return self.level_factor(level) / self.patch_size * (2.0 if self.groma_compat else 1.0)


def xyxy_to_cxcywh(boxes):
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


class ConvNormReLU(nn.Module):
    """mmcv's ConvModule with GN: 3×3 conv (no bias) → GroupNorm → ReLU. Params: conv, norm."""

    features: int
    norm_groups: int
    norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.features, 3, use_bias=False, name="conv", **kw)(x)
        return nn.relu(GroupNorm(self.norm_groups, self.norm_eps, name="norm", **kw)(x))


class MultiLevelFuse(nn.Module):
    """Groma's MLVLFuseModule (module docstring). Params: input_conv_{l}, fuse_{i}/{conv, norm}."""

    config: RegionEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> list[jax.Array]:
        """levels: float[B, H_l, W_l, D] each, finest first → float[B, H_l, W_l, E] each."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = []
        for level, x in enumerate(levels):
            b, h, w, _ = x.shape
            xs, ys = jnp.meshgrid(jnp.linspace(-1.0, 1.0, w), jnp.linspace(-1.0, 1.0, h))
            coords = jnp.broadcast_to(jnp.stack([xs, ys], -1).astype(x.dtype), (b, h, w, 2))
            x = jnp.concatenate([x, coords], axis=-1)
            feats.append(conv(cfg.embed_dim, 1, padding=0, name=f"input_conv_{level}", **kw)(x))
        shuffled, kept = cfg.embed_dim // 4, cfg.embed_dim - 2 * (cfg.embed_dim // 4)
        last = len(feats) - 1
        for i in range(cfg.num_fuse):
            block = ConvNormReLU(cfg.embed_dim, cfg.norm_groups, cfg.norm_eps, name=f"fuse_{i}", **kw)
            mixed = []
            for level, x in enumerate(feats):
                size = x.shape[1:3]
                coarser, finer = feats[min(level + 1, last)], feats[max(level - 1, 0)]
                mixed.append(jnp.concatenate([
                    x[..., :kept],
                    bilinear_resize(coarser[..., kept + shuffled:], size),
                    bilinear_resize(finer[..., kept:kept + shuffled], size),
                ], axis=-1))  # fmt: skip
            feats = [block(x) for x in mixed]
        return feats


class RegionEncoder(nn.Module):
    """Groma's region encoder (module docstring): boxes on multi-level ViT features → tokens.

    Params: mlvl_fuse/…, level_conv_{l}, flatten_linear, pos_fc_1, pos_norm_1, pos_fc_2,
    pos_norm_2, out_proj.
    """

    config: RegionEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], boxes, mask=None):
        """One token per box.

        Args:
          levels: `num_levels` arrays float[B, h, w, D], DINOv2 hidden states (CLS and
            register tokens dropped, before the final LayerNorm) in `hidden_states[-3:]`
            order; all on the same h × w patch grid.
          boxes: float[B, R, 4], normalised x1 y1 x2 y2 in [0, 1]; R may be 0.
          mask: bool[B, R], False for padding boxes; None = all real.
        Returns:
          float[B, R, L]; zero rows for padding boxes.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = [jnp.asarray(x, self.dtype) for x in levels]
        if len(levels) != cfg.num_levels:
            raise ValueError(f"the region encoder takes {cfg.num_levels} feature levels, got {len(levels)}")
        b, h, w, d = levels[0].shape
        if any(x.shape != (b, h, w, d) for x in levels) or d != cfg.feature_dim:
            raise ValueError(
                f"feature levels must all be [B, h, w, {cfg.feature_dim}], got {[tuple(x.shape) for x in levels]}"
            )
        r = boxes.shape[1]
        if r == 0 and not self.is_initializing():
            return jnp.zeros((b, 0, cfg.llm_dim), self.dtype)
        mask = jnp.ones((b, r), bool) if mask is None else jnp.asarray(mask, bool)
        boxes = jnp.where(mask[..., None], jnp.asarray(boxes, jnp.float32), 0.0)
        seen = xyxy_to_cxcywh(boxes) if cfg.groma_compat else boxes  # the numbers the weights read as a box
        pixels = seen * jnp.asarray([w, h, w, h], jnp.float32) * cfg.patch_size

        resized = [
            bilinear_resize(x, (h * cfg.level_factor(level), w * cfg.level_factor(level)))
            for level, x in enumerate(levels)
        ]
        feats = MultiLevelFuse(cfg, name="mlvl_fuse", **kw)(resized)
        s = cfg.roi_size
        pooled = 0.0
        for level, x in enumerate(feats):
            rois = roi_align(x, pixels, s, spatial_scale=cfg.spatial_scale(level),
                             sampling_ratio=cfg.sampling_ratio, aligned=True, mask=mask)  # fmt: skip
            rois = rois.astype(self.dtype).reshape(b * r, s, s, cfg.embed_dim)
            pooled = pooled + conv(cfg.embed_dim, 3, name=f"level_conv_{level}", **kw)(rois)
        x = nn.relu(pooled).reshape(b, r, s * s * cfg.embed_dim)
        x = dense(cfg.region_dim, ("mlp", "embed"), name="flatten_linear", **kw)(x)

        pos = dense(cfg.pos_hidden_dim, (None, "mlp"), name="pos_fc_1", **kw)(seen.astype(self.dtype))
        pos = LayerNorm(cfg.norm_eps, axis_name="mlp", name="pos_norm_1", **kw)(nn.relu(pos))
        pos = dense(cfg.region_dim, ("mlp", "embed"), name="pos_fc_2", **kw)(pos)
        pos = LayerNorm(cfg.norm_eps, axis_name="embed", name="pos_norm_2", **kw)(nn.relu(pos))

        tokens = dense(cfg.llm_dim, ("embed", "mlp"), name="out_proj", **kw)(x + pos)
        return jnp.where(mask[..., None], tokens, 0).astype(self.dtype)


def example_inputs(config: RegionEncoderConfig, batch: int = 1, boxes: int = 2, grid: int = 2):
    """Zero features, whole-image boxes: `jax.eval_shape(RegionEncoder(cfg).init, rng, *example_inputs(cfg))`."""
    levels = tuple(jnp.zeros((batch, grid, grid, config.feature_dim), jnp.float32) for _ in range(config.num_levels))
    whole = jnp.tile(jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32), (batch, boxes, 1))
    return levels, whole, jnp.ones((batch, boxes), bool)
