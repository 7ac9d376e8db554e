"""Per-example transforms and the batch collation with static buckets.

An `EditRecord` becomes an example: both images (and the edit mask, when asked for) decoded
and cropped by the same window (boxes follow the crop), optionally flipped together (boxes
flipped, "left" and "right" swapped in the texts), texts tokenised. `EditTransform.collate` stacks examples
and pads the ragged parts, token ids and boxes, to the smallest of a static set of
lengths ("buckets") that fits the batch, so the train step sees few distinct shapes.

Boxes are normalised xyxy everywhere; a pixel i covers [i, i+1) and a box edge at x
lies at pixel coordinate x·W, the coordinates PIL's `resize(box=…)` uses too.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import struct
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fireedit_jax import storage
from fireedit_jax.data.records import LOSS_WEIGHTS, BadRecord, EditRecord, ImageData, Task
from fireedit_jax.data.region_targets import difference_mask
from fireedit_jax.data.vlm_inputs import DEFAULT_BOX_BUCKETS, VLMTemplate, bucket
from fireedit_jax.images import ImageError, mask_from_image, to_rgb

# What PIL raises on damaged files besides OSError (e.g. SyntaxError for a broken PNG chunk).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def decode_image(data: ImageData, what: str = "image", min_side: int | None = None) -> Image.Image:
    """Encoded bytes or a file path → RGB PIL image; BadRecord naming `what` if it cannot be read.

    min_side: a JPEG is decoded at a reduced scale (its DCT scaling, much faster) as long
    as both sides stay at least this long.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            opened = Image.open(io.BytesIO(data))
        elif isinstance(data, (str, os.PathLike)):
            opened = Image.open(io.BytesIO(storage.as_path(data).read_bytes()))  # local or gs://
        else:
            raise BadRecord(f"{what}: expected image bytes or a path, got {type(data).__name__}")
        with opened:
            if min_side:
                opened.draft("RGB", (min_side, min_side))  # a no-op for formats other than JPEG
            opened.load()
            return to_rgb(opened)
    except _DECODE_ERRORS as error:
        raise BadRecord(f"{what} cannot be decoded: {error}") from None


def decode_mask(data: ImageData, what: str = "mask") -> Image.Image:
    """Encoded bytes or a path of an edit mask (white or transparent where the edit is) → an "L"
    image, 255 inside; BadRecord naming `what` if it cannot be read or is not a mask."""
    try:
        opened = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
        with opened:
            opened.load()
            return Image.fromarray(mask_from_image(opened, what).astype(np.uint8) * 255, "L")
    except (*_DECODE_ERRORS, ImageError) as error:
        raise BadRecord(f"{what} cannot be used: {error}") from None


def crop_resize_mask(mask: Image.Image, window: np.ndarray, size: int) -> np.ndarray:
    """The window of an "L" mask resized to size×size (bilinear, then ≥ half) → uint8[size, size, 1] in {0, 1}."""
    box = tuple(float(v) for v in window * np.array(mask.size * 2))
    return (np.asarray(mask.resize((size, size), Image.BILINEAR, box=box)) >= 128).astype(np.uint8)[..., None]


def crop_window(
    width: int, height: int, rng: np.random.Generator | None = None, *, min_scale: float = 1.0
) -> np.ndarray:
    """A square window (normalised xyxy) inside a width×height image: the largest one,
    scaled by a random factor in [min_scale, 1] and placed at random when `rng` is
    given, centred otherwise."""
    side = min(width, height) * (rng.uniform(min_scale, 1.0) if rng is not None and min_scale < 1 else 1.0)
    free = np.array([width - side, height - side])
    x0, y0 = free * (rng.uniform(size=2) if rng is not None else 0.5)
    return np.array([x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height])


def crop_resize(image: Image.Image, window: np.ndarray, size: int) -> np.ndarray:
    """The window (normalised xyxy) of `image` resized to size×size (bicubic) → uint8[size, size, 3]."""
    box = tuple(float(v) for v in window * np.array(image.size * 2))
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


def crop_boxes(boxes: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Boxes (normalised on the image) → normalised on the window, clipped; boxes left empty are dropped."""
    origin, extent = window[:2], window[2:] - window[:2]
    moved = np.clip((boxes.reshape(-1, 2, 2) - origin) / extent, 0.0, 1.0).reshape(-1, 4)
    keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
    return moved[keep].astype(np.float32)


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes of a horizontally flipped image: x → 1 − x, with x0 and x1 exchanged."""
    return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=-1).astype(np.float32)


_SIDES = re.compile(r"\b(left|right)(most|wards?|[- ]?hand(ed)?)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """The text for a mirrored image: "left" ↔ "right" (also leftmost, left-hand, …), case kept."""

    def swap(match: re.Match) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + (match.group(2) or "")

    return _SIDES.sub(swap, text)


@dataclasses.dataclass(frozen=True)
class TextField:
    """Tokenises the record's `source` text into batch entries `<name>_ids` / `<name>_mask`.

    tokenizer: a callable text → token ids, or a tokenizer object with `encode`
      (transformers or `tokenizers`), called with `add_special_tokens`.
    buckets: the allowed padded lengths; a text longer than the largest is truncated
      (and counted: the pipeline's metric `data/truncated/<name>`).
    keep_last: truncation keeps the final token (an end-of-text token, as CLIP needs).
    required: a record without the text is bad (skipped); otherwise a missing text
      (e.g. no answer on an edit sample) tokenises to nothing.
    """

    name: str
    tokenizer: Any
    buckets: tuple[int, ...]
    source: str = "instruction"
    pad_id: int = 0
    add_special_tokens: bool = False
    keep_last: bool = False
    required: bool = False

    def encode(self, text: str | None) -> tuple[np.ndarray, bool]:
        """int32[n] token ids (n ≤ max bucket) and whether they were truncated."""
        if text is None:
            if self.required:
                raise BadRecord(f"no {self.source} for the {self.name} tokens")
            return np.zeros((0,), np.int32), False
        if hasattr(self.tokenizer, "encode"):
            encoded = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)
            ids = getattr(encoded, "ids", encoded)  # a `tokenizers` Encoding, or a list
        else:
            ids = self.tokenizer(text)
        ids = np.asarray(ids, np.int32).reshape(-1)
        limit = max(self.buckets)
        if len(ids) <= limit:
            return ids, False
        return (np.concatenate([ids[: limit - 1], ids[-1:]]) if self.keep_last else ids[:limit]), True


def clip_text_field(tokenizer, *, name: str = "clip", source: str = "target_caption", length: int = 77) -> TextField:
    """Stage 1's target text: a caption tokenised for the CLIP text encoder (transformers
    CLIPTokenizer), <start> … <end> padded with its pad token to exactly `length`, as
    Stable Diffusion feeds it. A record without the caption is skipped."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    return TextField(name, tokenizer, (length,), source, pad, add_special_tokens=True, keep_last=True, required=True)


def vlm_text_fields(tokenizer, template: VLMTemplate, *, captions: bool = False) -> tuple[TextField, ...]:
    """The LLM texts `VLMTemplate.collate` reads: `instruction` (the edit instruction, or with
    `captions` the target caption: stage 1, records without one skipped) and `answer` (VQA),
    up to the template's max_instruction_tokens each."""
    length, pad = (template.max_instruction_tokens,), template.pad
    source = "target_caption" if captions else "instruction"
    return (TextField("instruction", tokenizer, length, source, pad, required=captions),
            TextField("answer", tokenizer, length, "answer", pad))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EditTransform:
    """Record → example, and examples → batch.

    The example has `target` for edits and segmentations, zeros for VQA, and none for a
    caption record (the learnable-region method never sees a target image), so caption
    examples batch only with caption examples.

    resolution: side of the square source / target images.
    vlm_resolution: if set, the example also has `vlm_source`, the same crop at this side.
    texts: the `TextField`s to tokenise.
    box_buckets: allowed padded box counts; a record with more boxes than the largest
      keeps the first ones (counted: `data/truncated/boxes`).
    random_crop / min_crop_scale / flip_probability: the augmentation when a random
      generator is given (training); without one, the centred full square, no flip.
    vlm: if set, the batch also has the VLM's sequence (`VLMTemplate.collate`; texts from
      `vlm_text_fields`).
    mask: the example also has `mask`, uint8[S, S, 1] in {0, 1} (1 = edit), from the record's
      mask_image; a record without one is bad (mask-guided editing trains on quads), unless
    difference_masks: a record without a mask gets its pair's difference mask instead, computed on
      the crop (data/region_targets.py; grounded editing learns where from any edit pair).
    """

    resolution: int = 256
    vlm_resolution: int | None = None
    texts: tuple[TextField, ...] = ()
    box_buckets: tuple[int, ...] = DEFAULT_BOX_BUCKETS
    random_crop: bool = True
    min_crop_scale: float = 1.0
    flip_probability: float = 0.5
    vlm: VLMTemplate | None = None
    mask: bool = False
    difference_masks: bool = False

    def __call__(self, record: EditRecord, rng: np.random.Generator | None = None) -> tuple[dict, tuple[str, ...]]:
        """Returns the example (numpy arrays, ragged `boxes` and `*_ids`) and the names
        of the fields that were truncated. Raises BadRecord when an image cannot be used."""
        # the smallest crop must still cover the output at full resolution
        min_side = math.ceil(max(self.resolution, self.vlm_resolution or 0) / self.min_crop_scale)
        source = decode_image(record.source_image, f"{record.key}: source image", min_side)
        target = None
        if record.task not in (Task.VQA, Task.CAPTION):
            target = decode_image(record.target_image, f"{record.key}: target image", min_side)
        window = crop_window(*source.size, rng if self.random_crop else None, min_scale=self.min_crop_scale)
        boxes = crop_boxes(record.boxes if record.boxes is not None else np.zeros((0, 4), np.float32), window)
        texts = {field.source: getattr(record, field.source) for field in self.texts}
        example = {"source": crop_resize(source, window, self.resolution)}
        if target is not None:
            example["target"] = crop_resize(target, window, self.resolution)
        elif record.task == Task.VQA:  # zeros, so VQA batches with edits; a caption example has no target at all
            example["target"] = np.zeros_like(example["source"])
        if self.vlm_resolution:
            example["vlm_source"] = crop_resize(source, window, self.vlm_resolution)
        if self.mask and record.mask_image is None:
            if not (self.difference_masks and target is not None):
                raise BadRecord(f"{record.key}: no mask image (mask-guided editing trains on source, mask, instruction, target)")
            example["mask"] = difference_mask(example["source"], example["target"]).astype(np.uint8)[..., None]
        elif self.mask:
            mask = decode_mask(record.mask_image, f"{record.key}: mask image")
            if mask.size != source.size:
                raise BadRecord(f"{record.key}: the mask is {mask.size[0]}×{mask.size[1]}, the source image "
                                f"{source.size[0]}×{source.size[1]}")  # fmt: skip
            example["mask"] = crop_resize_mask(mask, window, self.resolution)
        if rng is not None and rng.uniform() < self.flip_probability:
            for key in ("source", "target", "vlm_source", "mask"):
                if key in example:
                    example[key] = np.ascontiguousarray(example[key][:, ::-1])
            boxes = flip_boxes(boxes)
            texts = {key: swap_left_right(text) if text is not None else None for key, text in texts.items()}
        return self.finish(example, boxes, texts, record.task)

    def finish(self, example: dict, boxes: np.ndarray, texts: dict, task: Task) -> tuple[dict, tuple[str, ...]]:
        """Adds the boxes (cut to the largest bucket), the `texts` ({record field: text})
        tokenised, the task and its loss weights to `example`; returns it and the names of
        the truncated fields (shared with data/latent_cache.py's transform)."""
        truncated = []
        if len(boxes) > max(self.box_buckets):
            boxes, truncated = boxes[: max(self.box_buckets)], ["boxes"]
        example["boxes"] = boxes
        for field in self.texts:
            example[f"{field.name}_ids"], cut = field.encode(texts[field.source])
            truncated += [field.name] if cut else []
        vlm_weight, diffusion_weight = LOSS_WEIGHTS[task]
        example["task"] = np.int32(task)
        example["vlm_weight"] = np.float32(vlm_weight)
        example["diffusion_weight"] = np.float32(diffusion_weight)
        return example, tuple(truncated)

    def pad_values(self) -> dict[str, int]:
        """The value each padded batch entry is padded with (0 where not listed)."""
        values = {f"{field.name}_ids": field.pad_id for field in self.texts}
        return values | ({"vlm_input_ids": self.vlm.pad} if self.vlm is not None else {})

    def collate(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        """Stacks examples; `boxes` → float32[B, R, 4] + `box_mask` bool[B, R] and each
        `<name>_ids` → int32[B, T] + `<name>_mask` bool[B, T], R and T the smallest
        buckets that fit."""
        keys = examples[0].keys()
        for example in examples:
            if example.keys() != keys:
                tasks = sorted({Task(int(e["task"])).name.lower() for e in examples})
                raise ValueError(
                    f"a batch mixes examples with and without {', '.join(sorted(keys ^ example.keys()))} "
                    f"(tasks {', '.join(tasks)}): caption records have no target image, so caption sources "
                    "cannot share a training mixture with edit, segmentation or VQA sources"
                )
        batch = {}
        for key in examples[0]:
            rows = [example[key] for example in examples]
            if key == "boxes":
                count = bucket(max(map(len, rows)), self.box_buckets, "boxes")
                batch["boxes"], batch["box_mask"] = _pad_rows(rows, count, 0)
            elif key.endswith("_ids"):
                field = next(f for f in self.texts if f"{f.name}_ids" == key)
                length = bucket(max(map(len, rows)), field.buckets, "tokens")
                batch[key], batch[f"{field.name}_mask"] = _pad_rows(rows, length, field.pad_id)
            else:
                batch[key] = np.stack(rows)
        if self.vlm is not None:
            batch.update(self.vlm.collate(examples))
        return batch


def _pad_rows(rows: Sequence[np.ndarray], length: int, value) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows [n_i, …] → padded [B, length, …] and the bool[B, length] mask of real entries."""
    padded = np.full((len(rows), length) + rows[0].shape[1:], value, rows[0].dtype)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
        mask[i, : len(row)] = True
    return padded, mask

