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
and (tfds_builder.py) an ArrayRecord data set built with our TFDS builder.

Caption records (Task.CAPTION: image, caption, instruction, target caption, never a target
image; the learnable-region method's data) come from three layouts:
  parquet          columns image, caption, instruction, target_caption (`CAPTIONS`)
  folder + JSONL   lines with "task": "caption" (`JsonlSource`)
  webdataset tars  *.tar shards, per sample key an image and a .json (`TarCaptionSource`)

Every path may be local or gs:// (storage.py): parquet and tar shards are read through file
objects with range requests, JSONL / JSON whole, images when decoded (transforms.decode_image).

A file with the wrong schema is refused up front with the missing fields named. A
record whose content is bad (a null image, a broken file) is left for the pipeline to
skip and count. Parquet is read a row group at a time (a few cached per process);
for shuffled reads of a large set, convert it once to ArrayRecord (tfds_builder.py).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import glob
import json
import os
import tarfile
import threading
import warnings
from typing import Sequence

import numpy as np

from fireedit_jax import storage
from fireedit_jax.data.records import EditRecord, Task


class SchemaError(ValueError):
    """A data file whose layout is not the one expected; the message names what is missing."""


@dataclasses.dataclass(frozen=True)
class ParquetLayout:
    """Which parquet column holds each `EditRecord` field.

    columns: record field → column name; optional: the fields a file may lack; task: the
    records' task.
    """

    name: str
    columns: dict[str, str]
    optional: frozenset[str] = frozenset()
    task: Task = Task.EDIT


INSTRUCTPIX2PIX = ParquetLayout(
    "instructpix2pix",
    {
        "source_image": "original_image",
        "target_image": "edited_image",
        "instruction": "edit_prompt",
        "source_caption": "original_prompt",
        "target_caption": "edited_prompt",
    },
)
MAGICBRUSH = ParquetLayout(
    "magicbrush",
    {"source_image": "source_img", "target_image": "target_img", "instruction": "instruction", "mask_image": "mask_img"},
    optional=frozenset({"mask_image"}),
)
ULTRAEDIT = ParquetLayout(
    "ultraedit",
    {
        "source_image": "source_image",
        "target_image": "edited_image",
        "instruction": "edit_prompt",
        "source_caption": "source_caption",
        "target_caption": "target_caption",  # the region-based set only
        "mask_image": "mask_image",  # the region-based set only
    },
    optional=frozenset({"source_caption", "target_caption", "mask_image"}),
)
CAPTIONS = ParquetLayout(
    "captions",
    {"source_image": "image", "source_caption": "caption", "instruction": "instruction",
     "target_caption": "target_caption"},
    task=Task.CAPTION,
)  # fmt: skip
_IMAGE_FIELDS = ("source_image", "target_image", "mask_image")


def _data_files(paths: str | Sequence[str], suffix: str) -> list[str]:
    """A directory (its files ending in `suffix`, searched recursively), a glob pattern, a
    file, or a list of these → files."""
    found = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if glob.has_magic(path):
            found += map(os.fspath, storage.glob(path))
        elif storage.as_path(path).is_dir():
            found += map(os.fspath, storage.files(path, suffix))
        elif storage.as_path(path).exists():
            found.append(os.fspath(storage.as_path(path)))
        else:
            raise FileNotFoundError(f"{suffix[1:]} path {path!r} does not exist")
    if not found:
        raise FileNotFoundError(f"no {suffix[1:]} files in {paths!r}")
    return found


class ParquetSource:
    """Records from parquet files in a `ParquetLayout` (e.g. `INSTRUCTPIX2PIX`).

    Args:
      paths: a directory (all *.parquet below it, sorted), a glob, a file or a list.
      layout: the column names.
      name: the source's name in metrics and messages (default: the layout's).
      cached_row_groups: row groups kept decoded per process (sequential reads hit them;
        a small data set, e.g. MagicBrush, can be kept whole).
    Raises SchemaError naming the file and its missing columns.
    Reads are thread-safe (grain reads with a pool of threads).
    """

    def __init__(self, paths, layout: ParquetLayout, *, name: str | None = None, cached_row_groups: int = 4):
        self.name = name or layout.name
        self.layout = layout
        self._files = _data_files(paths, ".parquet")
        self._cache_size = cached_row_groups
        self._groups = []  # (file index, row group, first row of the group in its file)
        starts = []
        total = 0
        for i, path in enumerate(self._files):
            with _open_parquet(path) as parquet:
                present = self._check_schema(path, parquet.schema_arrow)
                first = 0
                for group in range(parquet.metadata.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    self._groups.append((i, group, first))
                    starts.append(total)
                    first += rows
                    total += rows
            if i == 0:
                self._fields = present
            elif present != self._fields:
                raise SchemaError(
                    f"{path}: has columns for {sorted(present)}, {self._files[0]} for {sorted(self._fields)}"
                )
        self._starts = starts
        self._length = total
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()

    def _check_schema(self, path: str, schema) -> dict[str, str]:
        """Record field → column for the columns present; SchemaError if required ones are missing."""
        import pyarrow as pa

        names = set(schema.names)
        required = {f: c for f, c in self.layout.columns.items() if f not in self.layout.optional}
        missing = sorted(c for c in required.values() if c not in names)
        if missing:
            raise SchemaError(
                f"{path} is not a {self.layout.name} parquet file: missing column(s) {', '.join(missing)} "
                f"(it has {', '.join(sorted(names))})"
            )
        for field in _IMAGE_FIELDS:
            if self.layout.columns.get(field) not in names:
                continue  # an optional mask column this file lacks
            kind = schema.field(self.layout.columns[field]).type
            image_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
            if not (image_struct or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                raise SchemaError(
                    f"{path}: column {self.layout.columns[field]!r} should hold images "
                    f"(struct {{bytes, path}} or binary), it holds {kind}"
                )
        return {f: c for f, c in self.layout.columns.items() if c in names}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> EditRecord:
        if not 0 <= index < self._length:
            raise IndexError(f"{self.name}: index {index} out of range [0, {self._length})")
        k = bisect.bisect_right(self._starts, index) - 1
        file_index, _, first = self._groups[k]
        table = self._row_group(k)
        row = index - self._starts[k]
        values = {field: table.column(column)[row].as_py() for field, column in self._fields.items()}
        path = self._files[file_index]
        for field in _IMAGE_FIELDS:
            if field in values:
                values[field] = _image_value(values[field], os.path.dirname(path))
        return EditRecord(key=f"{os.path.basename(path)}#{first + row}", task=self.layout.task, **values)

    def _row_group(self, k: int):
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        file_index, group, _ = self._groups[k]
        with _open_parquet(self._files[file_index]) as parquet:
            table = parquet.read_row_group(group, columns=list(self._fields.values()))
        with self._lock:
            self._cache[k] = table
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return table

    def __getstate__(self):
        # Sent to grain's worker processes: without the decoded row groups and the lock.
        return {key: value for key, value in self.__dict__.items() if key not in ("_cache", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache=collections.OrderedDict(), _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ParquetSource({self.name!r}, {len(self._files)} files, {self._length} rows)"


@contextlib.contextmanager
def _open_parquet(path: str):
    """A pyarrow ParquetFile reading `path` (local or gs://) through a file object: the footer
    and row groups come by range reads."""
    import pyarrow.parquet as pq

    with storage.as_path(path).open("rb") as file, pq.ParquetFile(file) as parquet:
        yield parquet


def _image_value(value, directory: str):
    """An image cell (the `datasets` struct {bytes, path}, or bytes) → bytes or a path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        return os.path.join(directory, value["path"]) if value.get("path") else None
    return value


def instructpix2pix_source(paths, **kwargs) -> ParquetSource:
    return ParquetSource(paths, INSTRUCTPIX2PIX, **kwargs)


def magicbrush_source(paths, **kwargs) -> ParquetSource:
    return ParquetSource(paths, MAGICBRUSH, **kwargs)


def ultraedit_source(paths, **kwargs) -> ParquetSource:
    return ParquetSource(paths, ULTRAEDIT, **kwargs)


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
        for field in _IMAGE_FIELDS:
            if values.get(field) is not None:
                values[field] = os.path.join(self.root, values[field])
        if values.get("boxes") is not None:
            values["boxes"] = np.asarray(values["boxes"], np.float32).reshape(-1, 4)
        values["task"] = Task[values.get("task", "edit").upper()]
        return EditRecord(key=f"{self._metadata}:{number}", **values)

    def __repr__(self) -> str:
        return f"JsonlSource({self.name!r}, {len(self)} records)"


_TAR_IMAGES = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has
_TAR_TEXTS = {"caption": "source_caption", "instruction": "instruction", "target_caption": "target_caption"}


class TarCaptionSource:
    """Caption records from webdataset-style tar shards (e.g. img2dataset's, with instructions
    and target captions added to each sample's .json).

    A shard's members are grouped into samples by key, webdataset's convention: the member's
    path up to the first dot of its file name ("00/0123.jpg" and "00/0123.json" are sample
    "00/0123"). A sample has an image (.jpg, .jpeg, .png or .webp: the first of these) and a
    .json with "caption", "instruction" and "target_caption" (a .txt member is the caption
    where the json has none); other members are ignored:

        0123.jpg  0123.json  {"caption": "a cup on a table", "instruction": "make the cup blue",
                              "target_caption": "a blue cup on a table"}

    Args:
      paths: a directory (all *.tar below it, sorted), a glob, a shard or a list; local or gs://.
      name: the source's name in metrics and messages.

    Each shard is read once here, in one sequential pass (its member headers, its .json and
    .txt members); a record's members are then read by offset. A sample without an image or without the three texts is
    left out and counted (`incomplete`, with a warning naming the first ones): at LAION scale
    a few broken samples should not stop a run. A shard without one complete sample is in
    another layout: SchemaError naming the shard, its first key and what that sample lacks.
    Every read opens its own file object: thread-safe, and nothing open to pickle for grain's
    worker processes.
    """

    def __init__(self, paths, *, name: str = "wds"):
        self.name = name
        self._shards = _data_files(paths, ".tar")
        self.incomplete = 0
        shard_of, spans, keys, reported = [], [], [], []
        for i, shard in enumerate(self._shards):
            complete, first_problem = 0, None
            with storage.as_path(shard).open("rb") as file:
                samples = _tar_samples(file, shard)
            for key, members in samples.items():
                image = next((members[e][:2] for e in _TAR_IMAGES if e in members), None)
                try:
                    if image is None:
                        raise SchemaError(f"no image (.{', .'.join(_TAR_IMAGES)})")
                    _tar_texts(*(members[e][2] if e in members else None for e in ("json", "txt")))
                except SchemaError as problem:
                    self.incomplete += 1
                    first_problem = first_problem or f"sample {key}: {problem}"
                    if len(reported) < 3:
                        reported.append(f"{os.path.basename(shard)}#{key}: {problem}")
                    continue
                complete += 1
                shard_of.append(i)
                spans.append([image, members["json"][:2], members["txt"][:2] if "txt" in members else (-1, 0)])
                keys.append(key.encode())
            if not complete:  # another layout, not a few broken samples
                texts, found = ", ".join(_TAR_TEXTS), first_problem or "no files"
                raise SchemaError(f"{shard} has no sample with an image and the texts {texts} ({found})")
        # arrays, not lists of tuples: millions of samples stay small and quick to pickle to workers
        self._shard_of = np.asarray(shard_of, np.int32)
        self._spans = np.asarray(spans, np.int64)  # [N, (image, json, txt), (offset, size)]; no txt: offset -1
        self._keys = np.asarray(keys)
        if self.incomplete:
            more = "; …" if self.incomplete > len(reported) else ""
            warnings.warn(f"{self.name}: left out {self.incomplete} of {self.incomplete + len(keys)} samples lacking "
                          f"an image or a text: {'; '.join(reported)}{more}")  # fmt: skip

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> EditRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        shard = self._shards[self._shard_of[index]]
        image, meta, txt = self._spans[index].tolist()
        with storage.as_path(shard).open("rb") as file:
            source_image, meta = _read(file, *image), _read(file, *meta)
            caption = _read(file, *txt) if txt[0] >= 0 else None
        texts = _tar_texts(meta, caption)
        key = f"{os.path.basename(shard)}#{self._keys[index].decode()}"
        return EditRecord(key=key, source_image=source_image, task=Task.CAPTION, **texts)

    def __repr__(self) -> str:
        return f"TarCaptionSource({self.name!r}, {len(self._shards)} shards, {len(self)} samples)"


def _tar_samples(file, shard: str) -> dict[str, dict[str, tuple[int, int, bytes | None]]]:
    """{sample key: {extension, lower case: (offset, size, data)}} of a tar's files; the data of
    .json and .txt members only, read as the scan passes them (a shard in a bucket is read once,
    front to back, not sought back and forth)."""
    samples = {}
    try:
        with tarfile.open(fileobj=file, mode="r:") as archive:
            for member in archive:
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if member.isfile() and dot:
                    key, extension = f"{directory}/{stem}" if directory else stem, extension.lower()
                    data = archive.extractfile(member).read() if extension in ("json", "txt") else None
                    samples.setdefault(key, {})[extension] = (member.offset_data, member.size, data)
    except tarfile.TarError as error:
        raise SchemaError(f"{shard} cannot be read as an uncompressed tar file ({error})") from None
    return samples


def _tar_texts(meta: bytes | None, caption: bytes | None) -> dict[str, str]:
    """A sample's texts as record fields, from its .json (and its .txt: the caption where the
    json has none); SchemaError saying what is missing."""
    if meta is None:
        raise SchemaError("no .json")
    try:
        values = json.loads(meta)
    except ValueError as error:
        raise SchemaError(f"its .json is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise SchemaError(f"its .json holds a {type(values).__name__}, not an object")
    if not values.get("caption") and caption is not None:
        values["caption"] = caption.decode("utf-8", "replace").strip()
    missing = [name for name in _TAR_TEXTS if not isinstance(values.get(name), str) or not values[name].strip()]
    if missing:
        raise SchemaError(f"no {', '.join(missing)}")
    return {field: values[name] for name, field in _TAR_TEXTS.items()}


def _read(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    return file.read(size)


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
