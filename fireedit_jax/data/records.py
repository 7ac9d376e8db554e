"""The record every source yields: one edit triplet (or a VQA, segmentation-as-edit or caption sample).

Sources keep images encoded (file bytes, or a path to the file): decoding happens in
the transforms, inside grain's worker processes, where a record that fails is skipped
and counted instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Union

import numpy as np

# Encoded image file bytes (PNG, JPEG, …) or the path of an image file.
ImageData = Union[bytes, str]


class Task(enum.IntEnum):
    EDIT = 0
    VQA = 1  # an answer text instead of a target image: trains L_VLM only
    SEGMENTATION = 2  # segmentation as an edit: the target shows the region painted over
    # an image with its caption, an instruction and the target caption: no target image;
    # the learnable-region loss (trained from image-caption pairs, never from edit pairs)
    CAPTION = 3


# Per-sample loss weights (L_VLM, L_diff) by task: the batch carries them per example. A caption
# sample trains neither (the learnable-region loss is its own).
LOSS_WEIGHTS = {Task.EDIT: (1.0, 1.0), Task.VQA: (1.0, 0.0), Task.SEGMENTATION: (1.0, 1.0), Task.CAPTION: (0.0, 0.0)}


class BadRecord(ValueError):
    """A record that cannot be used (undecodable image, missing field); the pipeline skips and counts it."""


class SchemaError(ValueError):
    """A data file whose layout is not the one expected; the message names what is missing."""


IMAGE_FIELDS = ("source_image", "target_image", "mask_image")  # the `EditRecord` fields holding an image


@dataclasses.dataclass(frozen=True, eq=False)
class EditRecord:
    """One training sample, as read from a source (nothing decoded yet).

    key: where it came from, for messages ("train-00000.parquet#12", "metadata.jsonl:7").
    source_image / target_image: encoded images; target_image is None for VQA and CAPTION.
    instruction: the edit instruction (the question for VQA).
    answer: the VQA answer text (None otherwise).
    boxes: float32[N, 4] region boxes, normalised xyxy on the source image, or None.
    source_caption / target_caption: captions of the image before and after the edit where the
      data set has them (a CAPTION record needs both: the target caption stands in for the target).
    mask_image: the encoded edit mask (white or transparent where the edit is), or None.
    """

    key: str
    source_image: ImageData
    instruction: str
    target_image: ImageData | None = None
    answer: str | None = None
    boxes: np.ndarray | None = None
    source_caption: str | None = None
    target_caption: str | None = None
    task: Task = Task.EDIT
    mask_image: ImageData | None = None

    def __post_init__(self):
        object.__setattr__(self, "task", Task(self.task))
        if self.source_image is None:
            raise BadRecord(f"{self.key}: no source image")
        if self.instruction is None:
            raise BadRecord(f"{self.key}: no instruction")
        if self.task == Task.VQA and self.answer is None:
            raise BadRecord(f"{self.key}: a VQA record needs an answer")
        if self.task == Task.CAPTION:
            # an empty target caption is a scene left empty (ShapeEdit: its only object removed)
            missing = ["source_caption"] if not self.source_caption else []
            missing += ["target_caption"] if self.target_caption is None else []
            if missing:
                raise BadRecord(f"{self.key}: a caption record needs {' and '.join(missing)}")
            if self.target_image is not None:  # its method learns without edit pairs: it must never read one
                raise BadRecord(f"{self.key}: a caption record has no target image, but one was given")
        elif self.task != Task.VQA and self.target_image is None:
            raise BadRecord(f"{self.key}: a {self.task.name.lower()} record needs a target image")
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
            if not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2:] < boxes[:, :2]):
                raise BadRecord(f"{self.key}: boxes must be finite xyxy with x0 <= x1, y0 <= y1")
            object.__setattr__(self, "boxes", boxes)

    def __eq__(self, other) -> bool:
        if not isinstance(other, EditRecord):
            return NotImplemented
        names = [field.name for field in dataclasses.fields(self)]
        return all(_same(getattr(self, name), getattr(other, name)) for name in names)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b)
    return a == b
