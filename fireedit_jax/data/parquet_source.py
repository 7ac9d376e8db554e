"""Edit records from parquet files (the Hugging Face hub's layouts: sources.py lists them).

Image columns are the `datasets` Image struct {bytes, path} or plain binary. A file with the
wrong schema is refused up front with the missing columns named. Parquet is read a row group
at a time (a few cached per process); for shuffled reads of a large set, convert it once to
ArrayRecord (tfds_builder.py). Paths may be local or gs:// (read by range requests).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import os
import threading

from fireedit_jax import storage
from fireedit_jax.data.records import IMAGE_FIELDS, EditRecord, SchemaError, Task


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
        self._files = storage.data_files(paths, ".parquet")
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
        for field in IMAGE_FIELDS:
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
        for field in IMAGE_FIELDS:
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
