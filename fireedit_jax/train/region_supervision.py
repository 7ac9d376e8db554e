"""The region loss of grounded editing: a region head supervised by the region an edit pair changes.

Shapes: B batch, H×W pixels, n×n the head's cells (the patch grid × its sub-patch factor), R
proposal boxes.

The target is the record's edit mask, or the difference mask of its source and target
(data/region_targets.py), float[B, H, W, 1] in {0, 1}. Two terms, in float32:

  per cell      the target's share of each cell (area average) against sigmoid(logits): binary
                cross-entropy + soft Dice (1 − 2·Σ p·t / (Σ p + Σ t)), so small regions count
  per proposal  softmax cross-entropy over the boxes and "no box" (the head's box_logits
                [B, R + 1]): the label is the box whose IoU with the target's bounding box is
                largest if it reaches `min_iou`, else "no box" (an addition, the background);
                and the regressed box (the head's `box`, used where "no box" is picked) against
                the target's bounding box: L1 + generalised IoU loss (DETR's), on every example
                with a target (an edited object's box is its own anchor: four times the signal
                that additions alone give)

L = λ_cells·(BCE + Dice) + λ_boxes·CE + λ_L1·L1 + λ_GIoU·GIoU (all 1 by default; DETR's are 1, 5, 2). Examples without a target region (an empty
mask: no edit visible) train "no box" and an empty cell map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_IOU = 0.5


def cell_targets(mask: jax.Array, cells: int) -> jax.Array:
    """float[B, H, W, 1] (or [B, H, W]) → float32[B, cells²]: each cell's covered share, row-major.
    H and W must be multiples of `cells`."""
    mask = mask.reshape(mask.shape[:3]).astype(jnp.float32)
    b, h, w = mask.shape
    if h % cells or w % cells:
        raise ValueError(f"a {h}×{w} mask does not split into {cells}×{cells} cells")
    return mask.reshape(b, cells, h // cells, cells, w // cells).mean(axis=(2, 4)).reshape(b, cells * cells)


def bounding_boxes(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, H, W, 1] (or [B, H, W]) → (float32[B, 4] normalised xyxy of each mask's bounding box,
    bool[B] whether the mask marks anything; an empty mask's box is zeros)."""
    mask = mask.reshape(mask.shape[:3]) > 0
    rows, cols = jnp.any(mask, axis=2), jnp.any(mask, axis=1)

    def extent(line):  # bool[B, N] → (first, one past the last) True index, normalised
        n = line.shape[1]
        first = jnp.argmax(line, axis=1)
        last = n - jnp.argmax(line[:, ::-1], axis=1)
        return first / n, last / n

    x0, x1 = extent(cols)
    y0, y1 = extent(rows)
    present = jnp.any(rows, axis=1)
    boxes = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)
    return jnp.where(present[:, None], boxes, 0.0), present


def box_iou(boxes: jax.Array, box: jax.Array) -> jax.Array:
    """float[B, R, 4] and float[B, 4] normalised xyxy → float32[B, R]: each box's IoU with `box`."""
    boxes, box = boxes.astype(jnp.float32), box.astype(jnp.float32)[:, None]
    lo, hi = jnp.maximum(boxes[..., :2], box[..., :2]), jnp.minimum(boxes[..., 2:], box[..., 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0.0), axis=-1)
    area = lambda b: jnp.prod(jnp.clip(b[..., 2:] - b[..., :2], 0.0), axis=-1)  # noqa: E731
    return inter / jnp.maximum(area(boxes) + area(box) - inter, 1e-12)


def proposal_labels(boxes: jax.Array, box_mask: jax.Array, mask: jax.Array, min_iou: float = MIN_IOU) -> jax.Array:
    """int32[B]: the index of the proposal (float[B, R, 4], bool[B, R] real) that best matches the
    target mask's bounding box, if its IoU reaches `min_iou`; else R ("no box")."""
    target, present = bounding_boxes(mask)
    iou = jnp.where(box_mask, box_iou(boxes, target), -1.0)
    best = jnp.argmax(iou, axis=1) if boxes.shape[1] else jnp.zeros(boxes.shape[:1], jnp.int32)
    hit = present & (jnp.max(iou, axis=1, initial=-1.0) >= min_iou)
    return jnp.where(hit, best, boxes.shape[1]).astype(jnp.int32)


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """float[B, 4] pairs of normalised xyxy boxes → float32[B]: IoU − (hull − union) / hull, in [−1, 1]."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    area = lambda x: jnp.prod(jnp.clip(x[..., 2:] - x[..., :2], 0.0), axis=-1)  # noqa: E731
    inter = jnp.prod(jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0.0), -1)
    union = area(a) + area(b) - inter
    hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), axis=-1)
    return inter / jnp.maximum(union, 1e-12) - (hull - union) / jnp.maximum(hull, 1e-12)


def region_supervision(logits: jax.Array, mask: jax.Array, cells: int, *, box_logits: jax.Array | None = None,
                       box: jax.Array | None = None, boxes: jax.Array | None = None, box_mask: jax.Array | None = None,
                       weights: jax.Array | None = None, lambda_cells: float = 1.0, lambda_boxes: float = 1.0,
                       lambda_l1: float = 1.0, lambda_giou: float = 1.0, min_iou: float = MIN_IOU) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """The region loss (module docstring) and its parts.

    logits: float[B, cells²] (row-major); mask: float[B, H, W, 1] the target region; box_logits:
    float[B, R + 1] and box float[B, 4] (the regressed box) with boxes float[B, R, 4] and box_mask
    bool[B, R], or None (no proposals);
    weights: float[B] per-example weights (None: equal; 0 drops an example, e.g. one without a target).
    Returns (L, {"region_bce", "region_dice", "region_boxes", "region_box_accuracy", "region_box_l1",
    "region_giou"}) (float32 scalars; the box terms only with box_logits).
    """
    weights = jnp.ones(logits.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    mean = lambda v: jnp.sum(v * weights) / total  # noqa: E731
    target = cell_targets(mask, cells)
    logits = logits.astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=1)
    prob = jax.nn.sigmoid(logits)
    dice = 1.0 - (2.0 * jnp.sum(prob * target, 1) + 1.0) / (jnp.sum(prob, 1) + jnp.sum(target, 1) + 1.0)
    parts = {"region_bce": mean(bce), "region_dice": mean(dice)}
    loss = lambda_cells * (parts["region_bce"] + parts["region_dice"])
    if box_logits is not None:
        labels = proposal_labels(boxes, box_mask, mask, min_iou)
        log_probs = jax.nn.log_softmax(box_logits.astype(jnp.float32), axis=-1)
        parts["region_boxes"] = mean(-jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0])
        parts["region_box_accuracy"] = mean((jnp.argmax(box_logits, axis=-1) == labels).astype(jnp.float32))
        target, present = bounding_boxes(mask)
        regressed = weights * present.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(regressed), 1.0)
        parts["region_box_l1"] = jnp.sum(jnp.sum(jnp.abs(box - target), -1) * regressed) / count
        parts["region_giou"] = jnp.sum((1.0 - generalized_iou(box, target)) * regressed) / count
        loss = loss + lambda_boxes * parts["region_boxes"] + lambda_l1 * parts["region_box_l1"]
        loss = loss + lambda_giou * parts["region_giou"]
    return loss, parts
