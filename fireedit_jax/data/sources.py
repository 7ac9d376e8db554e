"""Random-access sources of `EditRecord`s (grain's `RandomAccessDataSource`: len and getitem).

Layouts read (field names as on the Hugging Face hub; image columns are the `datasets`
Image struct {bytes, path} or plain binary):
  InstructPix2Pix  timbrooks/instructpix2pix-clip-filtered  original_prompt, original_image,
                   edit_prompt, edited_prompt, edited_image
  MagicBrush       osunlp/MagicBrush  img_id, turn_index, source_img, mask_img, instruction, target_img
  UltraEdit        BleachNick/UltraEdit_*  source_image, edited_image, edit_prompt,
                   source_caption (+ mask_image, target_caption for the region-based set)
  folder + JSONL   root/metadata.jsonl, one `EditRecord` per line, image paths relative to root
  LLaVA-Instruct   llava_instruct_150k.json style: [{id, image, conversations: [{from, value}]}]
and (tfds_builder.py) an ArrayRecord data set built with our TFDS builder. The parquet
layouts are read by parquet_source.py, webdataset tars by tar_source.py; `open_source` opens
any of them by kind.

Caption records (Task.CAPTION: image, caption, instruction, target caption, never a target
image; the learnable-region method's data) come from three layouts:
  parquet          columns image, caption, instruction, target_caption (`CAPTIONS`)
  folder + JSONL   lines with "task": "caption" (`JsonlSource`)
  webdataset tars  *.tar shards, per sample key an image and a .json (`TarCaptionSource`)

Every path may be local or gs:// (storage.py): parquet and tar shards are read through file
objects with range requests, JSONL / JSON whole, images when decoded (transforms.decode_image).

A file with the wrong schema is refused up front with the missing fields named
(`SchemaError`). A record whose content is bad (a null image, a broken file) is left for the
pipeline to skip and count.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from fireedit_jax import storage
from fireedit_jax.data.parquet_source import CAPTIONS, INSTRUCTPIX2PIX, MAGICBRUSH, ULTRAEDIT, ParquetSource
from fireedit_jax.data.records import IMAGE_FIELDS, EditRecord, SchemaError, Task
from fireedit_jax.data.tar_source import TarCaptionSource

_JSONL_FIELDS = {f.name for f in dataclasses.fields(EditRecord)} - {"key"}
# What a JSONL line of each task needs besides source_image and instruction.
_TASK_FIELDS = {
    Task.EDIT: {"target_image"}, Task.VQA: {"answer"}, Task.SEGMENTATION: {"target_image"},
    Task.CAPTION: {"source_caption", "target_caption"},
}  # fmt: skip


class JsonlSource:
    """A folder of images with `metadata.jsonl`: one JSON object per line with the
    `EditRecord` fields, image paths relative to the folder, `task` one of "edit",
    "vqa", "segmentation", "caption" (default "edit"), `boxes` a list of normalised
    [x0, y0, x1, y1], `mask_image` (optional) the edit region (white, or transparent, where to edit):

        {"source_image": "images/0_src.png", "target_image": "images/0_tgt.png",
         "instruction": "make the left cup blue", "boxes": [[0.1, 0.2, 0.4, 0.6]],
         "mask_image": "images/0_mask.png"}

    A caption line (learnable regions: trained without edit pairs) has source_caption and
    target_caption and no target_image:

        {"task": "caption", "source_image": "images/1.jpg", "source_caption": "a cup on a table",
         "instruction": "make the cup blue", "target_caption": "a blue cup on a table"}

    Raises SchemaError naming the line and its missing, unknown or forbidden fields.
    """

    def __init__(self, root: str, *, metadata: str = "metadata.jsonl", name: str | None = None):
        self.root = os.fspath(storage.as_path(root))
        self.name = name or storage.as_path(root).name
        path = os.path.join(self.root, metadata)
        if not storage.as_path(path).exists():
            raise FileNotFoundError(f"{path!r} does not exist (a JSONL source needs {metadata} in its folder)")
        self._metadata = metadata
        self._lines = []
        for number, line in enumerate(storage.as_path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise SchemaError(f"{path}:{number}: not JSON ({error})") from None
            self._check(entry, f"{path}:{number}")
            self._lines.append((number, entry))

    @staticmethod
    def _check(entry, where: str) -> None:
        if not isinstance(entry, dict):
            raise SchemaError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        task = entry.get("task", "edit")
        if task.upper() not in Task.__members__:
            raise SchemaError(f"{where}: task {task!r} is not one of {', '.join(t.lower() for t in Task.__members__)}")
        task = Task[task.upper()]
        required = {"source_image", "instruction", *_TASK_FIELDS[task]}
        missing, unknown = sorted(required - entry.keys()), sorted(entry.keys() - _JSONL_FIELDS)
        problems = [f"missing field(s) {', '.join(missing)}"] if missing else []
        problems += [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        if task == Task.CAPTION and entry.get("target_image") is not None:
            problems.append("a caption line has no target_image (its method never reads one)")
        if problems:
            raise SchemaError(f"{where}: {'; '.join(problems)}")

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> EditRecord:
        number, entry = self._lines[index]
        values = dict(entry)
        for field in IMAGE_FIELDS:
            if values.get(field) is not None:
                values[field] = os.path.join(self.root, values[field])
        if values.get("boxes") is not None:
            values["boxes"] = np.asarray(values["boxes"], np.float32).reshape(-1, 4)
        values["task"] = Task[values.get("task", "edit").upper()]
        return EditRecord(key=f"{self._metadata}:{number}", **values)

    def __repr__(self) -> str:
        return f"JsonlSource({self.name!r}, {len(self)} records)"


class LlavaVQASource:
    """VQA records from a LLaVA-Instruct-style JSON list:

        [{"id": "000000033471", "image": "000000033471.jpg",
          "conversations": [{"from": "human", "value": "<image>\\nWhat is …?"},
                            {"from": "gpt", "value": "The …"}, …]}, …]

    One record per human → gpt turn (the question without the "<image>" marker, the
    answer). Entries without an image (text-only) are left out: `self.text_only` counts them.
    """

    def __init__(self, json_path: str, image_root: str, *, name: str = "llava_instruct"):
        self.name = name
        self.image_root = os.fspath(storage.as_path(image_root))
        self._file = os.path.basename(os.fspath(json_path))
        entries = json.loads(storage.as_path(json_path).read_text())
        if not isinstance(entries, list):
            raise SchemaError(f"{json_path}: expected a JSON list of conversations, got {type(entries).__name__}")
        self._turns = []  # (entry id, turn, image, question, answer)
        self.text_only = 0
        for position, entry in enumerate(entries):
            missing = sorted({"id", "conversations"} - set(entry))
            if missing:
                raise SchemaError(f"{json_path}: entry {position} lacks field(s) {', '.join(missing)}")
            if "image" not in entry:
                self.text_only += 1
                continue
            turns = entry["conversations"]
            for k in range(0, len(turns) - 1, 2):
                asked, answered = turns[k], turns[k + 1]
                if asked.get("from") != "human" or answered.get("from") != "gpt":
                    raise SchemaError(
                        f"{json_path}: entry {entry['id']!r} turn {k}: expected a human turn then a gpt turn"
                    )
                question = asked["value"].replace("<image>", "").strip()
                self._turns.append((str(entry["id"]), k // 2, entry["image"], question, answered["value"]))

    def __len__(self) -> int:
        return len(self._turns)

    def __getitem__(self, index: int) -> EditRecord:
        entry_id, turn, image, question, answer = self._turns[index]
        return EditRecord(
            key=f"{self._file}:{entry_id}:turn{turn}",
            source_image=os.path.join(self.image_root, image),
            instruction=question,
            answer=answer,
            task=Task.VQA,
        )

    def __repr__(self) -> str:
        return f"LlavaVQASource({self.name!r}, {len(self)} turns)"


SOURCE_KINDS = ("instructpix2pix", "magicbrush", "ultraedit", "captions", "jsonl", "wds", "llava", "tfds")
CAPTION_KINDS = ("captions", "wds")  # their records are all Task.CAPTION


def open_source(kind: str, path: str, *, split: str = "train", image_root: str | None = None,
                name: str | None = None):  # fmt: skip
    """A source named by kind, as command lines and configs give it.

    path: the parquet directory / glob / file (instructpix2pix, magicbrush, ultraedit, captions),
    the folder holding metadata.jsonl (jsonl), the tar shards' directory / glob / file (wds), the
    conversations JSON (llava, whose images lie under image_root), or a `build_triplets` data
    set directory (tfds, read at `split`). captions and wds yield caption records.
    """
    parquet = {"instructpix2pix": INSTRUCTPIX2PIX, "magicbrush": MAGICBRUSH, "ultraedit": ULTRAEDIT,
               "captions": CAPTIONS}  # fmt: skip
    if kind in parquet:
        return ParquetSource(path, parquet[kind], name=name)
    if kind == "jsonl":
        return JsonlSource(path, name=name)
    if kind == "wds":
        return TarCaptionSource(path, **({"name": name} if name else {}))
    if kind == "llava":
        if image_root is None:
            raise ValueError("a llava source needs the folder of its images (image_root)")
        return LlavaVQASource(path, image_root, **({"name": name} if name else {}))
    if kind == "tfds":
        from fireedit_jax.data.tfds_builder import TFDSSource

        return TFDSSource(path, split, name=name)
    raise ValueError(f"unknown source kind {kind!r}: expected one of {', '.join(SOURCE_KINDS)}")
