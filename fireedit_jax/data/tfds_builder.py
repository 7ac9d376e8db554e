"""Edit triplets as a TFDS ArrayRecord data set, built and read without TensorFlow.

Any source (parquet, JSONL, LLaVA, …) can be written once into ArrayRecord files, which
grain reads with cheap random access (shuffled reads of parquet decode whole row groups):

    path = build_triplets("/data/tfds", {"train": instructpix2pix_source("/data/ip2p")})
    source = TFDSSource(path, "train")

Images are stored as their encoded bytes in a plain `Tensor(dtype=object)` feature
(TFDS's `Image` feature needs TensorFlow to encode) and decoded by our transforms.
Absent optional values are stored empty: "" for a text, b"" for the target image,
`has_boxes` False for boxes. TFDS shuffles examples when it writes them, so read
order is not write order; each record keeps its `key`.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from fireedit_jax import storage
from fireedit_jax.data.records import EditRecord, Task

TEXT_FIELDS = ("key", "instruction", "answer", "source_caption", "target_caption")


def text_features() -> dict:
    return {name: tfds.features.Text() for name in TEXT_FIELDS}


def encode_texts(record) -> dict:
    """A record's texts as stored ("" for None)."""
    return {name: getattr(record, name) or "" for name in TEXT_FIELDS}


def decode_texts(example) -> dict:
    """Stored texts back to str (None for "")."""
    return {name: example[name].decode("utf-8") or None for name in TEXT_FIELDS}


def split_source(builder, directory: str, split: str):
    """The random-access data source of `split` of the data set `builder` read from `directory`."""
    if split not in builder.info.splits:
        raise KeyError(f"{directory!r} has no split {split!r} (it has {', '.join(builder.info.splits)})")
    return builder.as_data_source(split)


class EditTriplets(tfds.core.GeneratorBasedBuilder):
    """FireEdit edit triplets (source, target, instruction, boxes, captions, task)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, splits: Mapping[str, Sequence[EditRecord]] | None = None, **kwargs):
        self._records = splits
        super().__init__(**kwargs)

    def _info(self):
        features = text_features()
        features.update(
            source_image=tfds.features.Tensor(shape=(), dtype=np.object_),
            target_image=tfds.features.Tensor(shape=(), dtype=np.object_),
            boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            has_boxes=tfds.features.Tensor(shape=(), dtype=np.bool_),
            task=tfds.features.Tensor(shape=(), dtype=np.int32),
        )
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(records) for split, records in self._records.items()}

    def _generate_examples(self, records):
        for index in range(len(records)):
            yield index, _encode(records[index])


def image_bytes(image) -> bytes:
    """An `ImageData` (file bytes, or a local or gs:// path) → the file's bytes."""
    if isinstance(image, (str, os.PathLike)):
        return storage.as_path(image).read_bytes()
    return bytes(image)


def _encode(record: EditRecord) -> dict:
    example = encode_texts(record)
    example.update(
        source_image=image_bytes(record.source_image),
        target_image=image_bytes(record.target_image) if record.target_image is not None else b"",
        boxes=record.boxes if record.boxes is not None else np.zeros((0, 4), np.float32),
        has_boxes=record.boxes is not None,
        task=int(record.task),
    )
    return example


def build_triplets(data_dir: str, splits: Mapping[str, Sequence[EditRecord]]) -> str:
    """Writes each split's records (any sequence of EditRecords, e.g. a source) as
    ArrayRecord files under `data_dir` (local, or gs://: built locally, then uploaded);
    returns the data set's directory for `TFDSSource`. Image paths are read and stored as
    bytes, so the result stands alone."""
    with storage.staged(data_dir) as local:
        EditTriplets(splits=splits, data_dir=local, file_format="array_record").download_and_prepare()
    return os.fspath(storage.as_path(data_dir) / EditTriplets.name / str(EditTriplets.VERSION))


class TFDSSource:
    """Records from a data set written by `build_triplets` (random access through ArrayRecord;
    one in a bucket is read from a local copy, storage.local_copy)."""

    def __init__(self, directory: str, split: str = "train", *, name: str | None = None):
        self.name = name or f"tfds_{split}"
        local = storage.local_copy(directory, cache=True)
        self._data = split_source(tfds.builder_from_directory(local), directory, split)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> EditRecord:
        example = self._data[index]
        texts = decode_texts(example)
        return EditRecord(
            source_image=example["source_image"],
            target_image=example["target_image"] or None,
            boxes=example["boxes"] if example["has_boxes"] else None,
            task=Task(int(example["task"])),
            **texts,
        )

    def __repr__(self) -> str:
        return f"TFDSSource({self.name!r}, {len(self)} records)"
