"""Region proposals: boxes from the user or a data set, or from an offline detector.

Boxes are normalised x1 y1 x2 y2 in [0, 1] (fractions of the image's width and height)
everywhere. FireEdit takes at most 100 (L_r ≤ 100).

The offline proposer runs a transformers `DeformableDetrForObjectDetection` saved in a
local directory (e.g. a downloaded SenseTime/deformable-detr, with its
preprocessor_config.json), class-agnostic as Groma's proposer is used: score = the max
sigmoid over classes, keep score ≥ 0.15, NMS at IoU 0.6 (torchvision.ops.nms), the 100
best. Boxes are kept in descending score order (Groma shuffles them; we stay
deterministic). Groma's own proposer reads DINOv2 features and is not a transformers
model, hence a stand-alone detector here.

  fireedit-jax propose --detector DIR --images a.jpg b.png --out boxes.jsonl

writes one line per image: {"image": PATH, "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from typing import Sequence

import numpy as np

from fireedit_jax.images import ImageError, load_image

MAX_BOXES = 100
SCORE_THRESHOLD = 0.15
IOU_THRESHOLD = 0.6
_TOLERANCE = 1e-6  # coordinates this far past 0 or 1 are rounding, clipped rather than refused


class BoxError(ValueError):
    """A box that cannot be used; the message names it by index and values."""


class DetectorError(ValueError):
    """A detector directory that cannot be loaded; the message names it."""


# ---------------------------------------------------------------------------- user boxes


def validate_boxes(boxes, image_size: tuple[int, int] | None, *, max_boxes: int = MAX_BOXES,
                   source: str = "") -> np.ndarray:  # fmt: skip
    """Checks user or data-set boxes and returns them as float32[N, 4], N ≤ max_boxes.

    Args:
      boxes: [N, 4] normalised x1 y1 x2 y2 (a list or an array; N may be 0).
      image_size: (width, height) in pixels, to show boxes in pixels in messages; or None.
      source: names where the boxes come from (e.g. an image path) in messages.
    Raises:
      BoxError naming the first bad box (index and values): a wrong shape, a non-finite
      coordinate, a box outside the image, or one with zero area (x2 ≤ x1 or y2 ≤ y1).
    More than `max_boxes` boxes: the first `max_boxes` are kept, with a warning.
    """
    where = f" for {source}" if source else ""
    array = np.asarray(boxes if len(boxes) else np.zeros((0, 4)), np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise BoxError(f"boxes{where} must be a list of [x1, y1, x2, y2], got an array of shape {array.shape}")
    for index, box in enumerate(array):
        values = "[" + ", ".join(f"{v:.6g}" for v in box) + "]"
        if image_size is not None and np.all(np.isfinite(box)):
            w, h = image_size
            values += " (pixels [" + ", ".join(f"{v:.1f}" for v in box * [w, h, w, h]) + f"] in a {w}×{h} image)"
        if not np.all(np.isfinite(box)):
            raise BoxError(f"box {index}{where} {values} has a non-finite coordinate")
        if np.any(box < -_TOLERANCE) or np.any(box > 1 + _TOLERANCE):
            raise BoxError(
                f"box {index}{where} {values} lies outside the image: coordinates are normalised "
                "x1, y1, x2, y2 and must lie in [0, 1] (divide pixel coordinates by the width and height)"
            )
        if box[2] <= box[0] or box[3] <= box[1]:
            raise BoxError(f"box {index}{where} {values} has zero area: x2 must exceed x1 and y2 exceed y1")
    if len(array) > max_boxes:
        warnings.warn(f"{len(array)} boxes given{where}; keeping the first {max_boxes}", stacklevel=2)
        array = array[:max_boxes]
    return np.clip(array, 0.0, 1.0).astype(np.float32)


def pad_boxes(per_image: Sequence[np.ndarray], slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image float[N_i, 4] → (float32[B, slots, 4] zero-padded, bool[B, slots] mask of real boxes)."""
    boxes = np.zeros((len(per_image), slots, 4), np.float32)
    mask = np.zeros((len(per_image), slots), bool)
    for i, b in enumerate(per_image):
        if len(b) > slots:
            raise BoxError(f"image {i} has {len(b)} boxes, more than the {slots} slots")
        boxes[i, : len(b)] = b
        mask[i, : len(b)] = True
    return boxes, mask


# ---------------------------------------------------------------------------- detector


@functools.lru_cache(maxsize=2)
def load_detector(detector_dir: str):
    """(DeformableDetrForObjectDetection in eval mode, its image processor) from a local directory.

    Cached: batch editing proposes boxes once per batch with the same detector."""
    from transformers import AutoImageProcessor, DeformableDetrForObjectDetection, DeformableDetrImageProcessor

    if not os.path.isdir(detector_dir):
        raise DetectorError(f"detector directory {detector_dir!r} does not exist")
    if not os.path.exists(os.path.join(detector_dir, "config.json")):
        raise DetectorError(
            f"{detector_dir!r} holds no config.json: expected a DeformableDetrForObjectDetection "
            "saved with save_pretrained"
        )
    try:
        model = DeformableDetrForObjectDetection.from_pretrained(detector_dir, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as err:
        raise DetectorError(f"cannot load a Deformable DETR from {detector_dir!r}: {err}") from None
    if os.path.exists(os.path.join(detector_dir, "preprocessor_config.json")):
        processor = AutoImageProcessor.from_pretrained(detector_dir, local_files_only=True)
    else:
        warnings.warn(
            f"{detector_dir!r} has no preprocessor_config.json; using Deformable DETR's default preprocessing",
            stacklevel=2,
        )
        processor = DeformableDetrImageProcessor()
    return model, processor


def detect(
    detector_dir: str,
    images: Sequence,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
    max_boxes: int = MAX_BOXES,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-agnostic proposals per image: (boxes float32[N, 4] normalised xyxy, scores float32[N]).

    images: paths or PIL images, each run alone (no padding, so boxes are relative to it).
    Boxes are clipped to the image; those of zero area after clipping are dropped.
    """
    import torch
    import torchvision

    model, processor = load_detector(detector_dir)
    results = []
    for image in images:
        pil = load_image(image)
        inputs = processor(images=pil, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        scores = out.logits[0].float().sigmoid().max(-1).values
        cx, cy, w, h = out.pred_boxes[0].float().unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0.0, 1.0)
        keep = (scores >= score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[keep], scores[keep]
        keep = torchvision.ops.nms(boxes, scores, iou_threshold)[:max_boxes]  # sorted by score, descending
        results.append((boxes[keep].numpy().astype(np.float32), scores[keep].numpy().astype(np.float32)))
    return results


def propose(detector_dir: str, images: Sequence, **options) -> list[np.ndarray]:
    """Boxes only (float32[N_i, 4] normalised xyxy, N_i ≤ 100) per image; `options` as `detect`."""
    return [boxes for boxes, _ in detect(detector_dir, images, **options)]


# ---------------------------------------------------------------------------- files


def write_jsonl(path: str, image_paths: Sequence[str], boxes: Sequence[np.ndarray],
                scores: Sequence[np.ndarray] | None = None) -> None:  # fmt: skip
    """One line per image: {"image": path, "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}.

    Numbers are written in full (float32 values round-trip exactly): rounding could give a
    thin box zero width."""
    if len(image_paths) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"{len(image_paths)} image paths for {len(boxes)} box lists")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, (image, b) in enumerate(zip(image_paths, boxes)):
            record = {"image": os.fspath(image), "boxes": np.asarray(b, np.float64).reshape(-1, 4).tolist()}
            if scores is not None:
                record["scores"] = np.asarray(scores[i], np.float64).tolist()
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> dict[str, np.ndarray]:
    """{image path: float32[N, 4]} from a file `write_jsonl` (or a person) wrote; boxes validated."""
    out = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, boxes = record["image"], record["boxes"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                expected = '{"image": ..., "boxes": [...]}'
                raise BoxError(f"{path}:{number} is not a {expected} record ({err})") from None
            out[image] = validate_boxes(boxes, None, source=f"{image} ({path}:{number})")
    return out


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `propose` sub-command's arguments."""
    parser.add_argument("--detector", required=True, help="directory of a saved DeformableDetrForObjectDetection")
    parser.add_argument("--images", required=True, nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD)
    parser.add_argument("--iou-threshold", type=float, default=IOU_THRESHOLD)
    parser.add_argument("--max-boxes", type=int, default=MAX_BOXES)


def run(args: argparse.Namespace) -> int:
    """Runs the detector on `args.images`, writes `args.out`; a user error prints one line and returns 1."""
    try:
        results = detect(args.detector, args.images, score_threshold=args.score_threshold,
                         iou_threshold=args.iou_threshold, max_boxes=args.max_boxes)  # fmt: skip
    except (DetectorError, ImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_jsonl(args.out, args.images, [b for b, _ in results], [s for _, s in results])
    print(f"wrote {sum(len(b) for b, _ in results)} boxes for {len(results)} images to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`fireedit-jax propose --detector DIR --images A [B ...] --out boxes.jsonl`."""
    parser = argparse.ArgumentParser(prog="fireedit-jax propose", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
