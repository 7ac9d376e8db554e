"""Pixel metrics for ShapeEdit (data/shapes.py): distances to the exact target and edit success.

On batches of numpy arrays: outputs and targets uint8[B, H, W, 3] (or float in [0, 1]);
`edits` one metadata dict per sample with at least kind, refer, box, colour, shape (the
samples of `ShapeEditSource` or lines of samples.jsonl serve as they are).

  l1, l2        mean |o − t| and (o − t)² over pixels and channels, images in [0, 1]
  l1_outside    l1 outside the edited box (add: the new object's box): preservation
  success       1.0 if the edit is visible in the OUTPUT's edited box, judged from pixels
                classified to the nearest palette colour, or to "background" where the
                box's surrounding ring colour is nearer or no palette colour is within
                COLOUR_TOLERANCE:
    colour   the requested colour covers ≥ MIN_COVER of the object's area and no other
             palette colour covers more of the box
    shape    the object's pixels (any palette colour) match the requested shape's mask
             best among all shapes, with IoU ≥ MIN_IOU
    remove   ≤ MAX_LEFT of the removed object's mask still has a palette colour, and the
             box is within MAX_BOX_L1 of the target there (no blot left in its place)
    add      pixels of the requested colour match the requested shape best, IoU ≥ MIN_IOU
  evidence      the number each test thresholds: colour cover, shape / add IoU, remove's
                left-over fraction
  kept          the fraction of the scene's other objects (every source object but the edited
                one) still there: ≥ MIN_KEPT of the object's mask has a palette colour (1.0
                when there are none). Success only looks inside the edited box, so a model
                that fades every object "removes" the referred one too: kept shows it
  specific      success with every other object kept (the edit, and only the edit)
and for a predicted edit region (bool[B, H, W]): `region_iou`, its IoU with the edit's box;
`bounding_box_iou`, its bounding box's IoU with the edit's box; `referred_object`, whether the
scene's object whose box it overlaps most is the edited one (colour, shape and remove edits).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fireedit_jax.data.shapes import COLOURS, PALETTE, SHAPES, shape_mask
from fireedit_jax.eval.metrics import aggregate

COLOUR_TOLERANCE = 100.0  # RGB distance (0-255) to a palette colour; any background is ≥ 125 away
MIN_COVER = 0.5
MIN_IOU = 0.5
MAX_LEFT = 0.1
MAX_BOX_L1 = 0.1
MIN_KEPT = 0.5
SUMMARY_METRICS = ("l1", "l2", "l1_outside", "success", "kept", "specific")

_PALETTE = np.asarray([PALETTE[c] for c in COLOURS], np.float32)


def to_unit(images) -> np.ndarray:
    """uint8 images → float32 in [0, 1]; float images pass through as float32."""
    images = np.asarray(images)
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def _pair(outputs, targets):
    outputs, targets = to_unit(outputs), to_unit(targets)
    if outputs.shape != targets.shape:
        raise ValueError(f"outputs {outputs.shape} and targets {targets.shape} differ in shape")
    return outputs, targets


def l1(outputs, targets) -> np.ndarray:
    """float[..., H, W, C] pairs → float[...]: mean absolute difference."""
    outputs, targets = _pair(outputs, targets)
    return np.mean(np.abs(outputs - targets), axis=(-3, -2, -1))


def l2(outputs, targets) -> np.ndarray:
    """As `l1`, the mean squared difference."""
    outputs, targets = _pair(outputs, targets)
    return np.mean(np.square(outputs - targets), axis=(-3, -2, -1))


def pixel_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """A normalised xyxy box → pixel (x0, y0, x1, y1), end exclusive, on an H × W image."""
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def box_masks(boxes, height: int, width: int) -> np.ndarray:
    """bool[B, H, W]: True inside each sample's box (float[B, 4] normalised xyxy)."""
    masks = np.zeros((len(boxes), height, width), bool)
    for mask, box in zip(masks, boxes):
        x0, y0, x1, y1 = pixel_box(box, height, width)
        mask[y0:y1, x0:x1] = True
    return masks


def l1_outside(outputs, targets, boxes) -> np.ndarray:
    """float[B, H, W, C] pairs, float[B, 4] boxes → float[B]: mean |o − t| outside each box."""
    outputs, targets = _pair(outputs, targets)
    outside = ~box_masks(boxes, *outputs.shape[1:3])
    per_pixel = np.mean(np.abs(outputs - targets), axis=-1)
    return np.sum(per_pixel * outside, axis=(1, 2)) / np.maximum(outside.sum(axis=(1, 2)), 1)


def palette_labels(image, background) -> np.ndarray:
    """float[..., 3] in [0, 1] → int[...]: the nearest palette colour's index in COLOURS, or −1
    where the `background` colour (float[3] in [0, 1]) is nearer or no colour is within
    COLOUR_TOLERANCE. Nearest-wins keeps blurred edges on the side they are closer to."""
    pixels = to_unit(image)[..., None, :] * 255.0
    distance = np.linalg.norm(pixels - _PALETTE, axis=-1)
    nearest, closest = np.argmin(distance, axis=-1), np.min(distance, axis=-1)
    to_background = np.linalg.norm(pixels[..., 0, :] - np.asarray(background) * 255.0, axis=-1)
    return np.where((closest <= COLOUR_TOLERANCE) & (closest < to_background), nearest, -1)


def ring_colour(image, box) -> np.ndarray:
    """float[3]: the median colour of the one-pixel ring around a pixel box: background, since
    objects keep ≥ 2 pixels apart."""
    image = to_unit(image)
    x0, y0, x1, y1 = box
    ring = np.zeros(image.shape[:2], bool)
    ring[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
    ring[y0:y1, x0:x1] = False
    return np.median(image[ring], axis=0)


def _best_shape(pixels: np.ndarray, want: str) -> float:
    """IoU of `pixels` (bool[h, w]) with `want`'s mask if `want` beats every other shape, else 0."""
    ious = {}
    for shape in SHAPES:
        mask = shape_mask(shape, pixels.shape[1], pixels.shape[0])
        union = np.sum(mask | pixels)
        ious[shape] = np.sum(mask & pixels) / union if union else 0.0
    wins = all(ious[want] > iou for shape, iou in ious.items() if shape != want)
    return float(ious[want]) if wins else 0.0


def coloured_fraction(output, box, shape: str) -> float:
    """The fraction of `shape`'s mask in the normalised `box` of `output` classified to a palette colour."""
    x0, y0, x1, y1 = pixel_box(box, *output.shape[:2])
    labels = palette_labels(output[y0:y1, x0:x1], ring_colour(output, (x0, y0, x1, y1)))
    return float(np.mean(labels[shape_mask(shape, x1 - x0, y1 - y0)] >= 0))


def kept(output, edit: Mapping) -> float:
    """The fraction of the source's objects other than the edited one still present in `output`."""
    others = [o for i, o in enumerate(edit["objects"]) if i != edit["object"]]
    if not others:
        return 1.0
    return float(np.mean([coloured_fraction(output, o["box"], o["shape"]) >= MIN_KEPT for o in others]))


def judge(output, target, edit: Mapping) -> tuple[bool, float]:
    """(success, evidence) for one output uint8/float[H, W, 3] and its edit metadata."""
    x0, y0, x1, y1 = pixel_box(edit["box"], *output.shape[:2])
    if x1 <= x0 or y1 <= y0:
        return False, 0.0
    kind = edit["kind"]
    if kind == "remove":
        left = coloured_fraction(output, edit["box"], edit["shape"])
        box_l1 = float(l1(output[y0:y1, x0:x1], target[y0:y1, x0:x1]))
        return left <= MAX_LEFT and box_l1 <= MAX_BOX_L1, left
    labels = palette_labels(output[y0:y1, x0:x1], ring_colour(output, (x0, y0, x1, y1)))
    if kind == "colour":
        area = shape_mask(edit["shape"], x1 - x0, y1 - y0).sum()
        counts = np.bincount(labels[labels >= 0], minlength=len(COLOURS))
        want = COLOURS.index(edit["colour"])
        cover = counts[want] / area
        return bool(cover >= MIN_COVER and counts[want] == counts.max()), float(cover)
    if kind in ("shape", "add"):
        pixels = labels >= 0 if kind == "shape" else labels == COLOURS.index(edit["colour"])
        iou = _best_shape(pixels, edit["shape"])
        return iou >= MIN_IOU, iou
    raise ValueError(f"unknown edit kind {kind!r}")


def evaluate(outputs, targets, edits: Sequence[Mapping]) -> list[dict]:
    """Per-sample metrics of a batch: outputs, targets uint8/float[B, H, W, 3]; edits: B metadata dicts.

    Returns [{"kind", "refer", "l1", "l2", "l1_outside", "success", "evidence", "kept", "specific"}]
    (floats); edits also need "objects" and "object" (the ShapeEdit sample's) for kept.
    """
    outputs, targets = _pair(outputs, targets)
    if len(edits) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(edits)} edits")
    boxes = np.stack([np.asarray(e["box"], np.float32) for e in edits])
    distances = l1(outputs, targets), l2(outputs, targets), l1_outside(outputs, targets, boxes)
    records = []
    for i, edit in enumerate(edits):
        success, evidence = judge(outputs[i], targets[i], edit)
        others_kept = kept(outputs[i], edit)
        records.append({
            "kind": edit["kind"], "refer": edit["refer"],
            "l1": float(distances[0][i]), "l2": float(distances[1][i]), "l1_outside": float(distances[2][i]),
            "success": float(success), "evidence": evidence,
            "kept": others_kept, "specific": float(success and others_kept == 1.0),
        })  # fmt: skip
    return records


def region_iou(masks, edits: Sequence[Mapping]) -> np.ndarray:
    """Predicted edit regions bool[B, H, W] → float[B]: each one's IoU with its edit's box (the
    edited object's; add: the new object's), how well a learnt region finds where to edit."""
    masks = np.asarray(masks, bool)
    boxes = box_masks(np.stack([np.asarray(e["box"], np.float32) for e in edits]), *masks.shape[1:3])
    union = np.sum(masks | boxes, axis=(1, 2))
    return np.sum(masks & boxes, axis=(1, 2)) / np.maximum(union, 1)


def bounding_box_iou(masks, edits: Sequence[Mapping]) -> np.ndarray:
    """Predicted regions bool[B, H, W] → float[B]: the IoU of each region's bounding box with its edit's
    box (0 for an empty region)."""
    from fireedit_jax.models.region_predictor import bounding_box_mask

    return region_iou(np.asarray(bounding_box_mask(np.asarray(masks, np.float32))) > 0, edits)


def referred_object(masks, edits: Sequence[Mapping]) -> list[float | None]:
    """Per predicted region bool[H, W]: 1.0 if the source object whose box it overlaps most is the edited
    one (and it overlaps one), 0.0 if not; None for an addition (no source object is edited)."""
    hits = []
    for mask, edit in zip(np.asarray(masks, bool), edits):
        if edit["object"] < 0:
            hits.append(None)
            continue
        boxes = box_masks(np.asarray([o["box"] for o in edit["objects"]], np.float32), *mask.shape)
        overlap = np.sum(boxes & mask[None], axis=(1, 2))
        hits.append(float(overlap.max() > 0 and int(np.argmax(overlap)) == edit["object"]))
    return hits


def summarize(records: Sequence[Mapping]) -> dict:
    """{"overall": means, "kind": {kind: means (with evidence)}, "refer": {referring type: means}}."""
    return {
        "overall": aggregate(records, metrics=SUMMARY_METRICS),
        "kind": aggregate(records, by="kind", metrics=(*SUMMARY_METRICS, "evidence")),
        "refer": aggregate(records, by="refer", metrics=SUMMARY_METRICS),
    }
