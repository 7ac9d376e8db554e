"""Caption records from webdataset-style tar shards (`TarCaptionSource`), local or gs://."""

from __future__ import annotations

import json
import os
import tarfile
import warnings

import numpy as np

from fireedit_jax import storage
from fireedit_jax.data.records import EditRecord, SchemaError, Task

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
        self._shards = storage.data_files(paths, ".tar")
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
