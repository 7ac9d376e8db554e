"""Paths the library reads and writes, local or in cloud storage (gs://), as one type.

Every path is an `etils.epath.Path`, the type Orbax uses: local paths go through the OS,
gs:// ones through gcsfs (fsspec). Checkpoint arrays go through TensorStore's own GCS
client (Orbax writes them straight into the bucket), TensorBoard event files through
tensorboardX's own GCS writer (it uploads the whole event file at each flush, every
`flush_secs`). What cannot stream to or from a bucket goes through a local copy:
  ArrayRecord data sets   the C++ reader and writer open local files only: a data set in a
                          bucket is copied once per host into a local cache (`local_copy`;
                          $FIREEDIT_JAX_DATA_CACHE, default ~/.cache/fireedit_jax/remote);
                          one written for a bucket is built locally, then uploaded (`staged`).
                          A set larger than the VM's disk: mount the bucket with Cloud Storage
                          FUSE and give the mount's local path.
  tokenizer files         transformers loads and saves local directories only.
Objects in a bucket cannot be appended to: `AppendFile` (metrics.jsonl, results.jsonl)
rewrites the object from memory at most every `flush_seconds` and on close, as TensorFlow's
GCS file system and tensorboardX do.

Credentials are Google's Application Default Credentials: a TPU / GCE VM's service account,
or `gcloud auth application-default login` elsewhere. Nothing here stores any.

An emulator (tests/gcs_emulator.py): set STORAGE_EMULATOR_HOST=http://127.0.0.1:9023, the
google-cloud clients' convention, which gcsfs and google-cloud-storage (tensorboardX)
follow; importing fireedit_jax then also points TensorStore at it (`use_emulator`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from typing import Iterator, Sequence

import fsspec.config
from etils import epath

PathLike = str | os.PathLike


def use_emulator(url: str | None = None) -> None:
    """Points every client at a storage emulator at `url` (default: $STORAGE_EMULATOR_HOST, as
    importing fireedit_jax does): STORAGE_EMULATOR_HOST for gcsfs and google-cloud-storage,
    TENSORSTORE_GCS_HTTP_URL for TensorStore, gcsfs's bucket-layout lookup off. Call it before
    the first gs:// access (gcsfs reads its setting when imported)."""
    url = url or os.environ.get("STORAGE_EMULATOR_HOST")
    if url:
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


use_emulator()
# gcsfs caches directory listings for the life of the process by default: it would not see
# what other processes, or TensorStore in this one, write (e.g. a checkpoint's commit file)
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class StorageError(ValueError):
    """A path that cannot be read or written (no such bucket, no permission, unreachable)."""


def is_remote(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path; local paths made absolute (gs:// ones are already)."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def _hint(path: epath.Path) -> str:
    if not is_remote(path):
        return ""
    return (" Check the bucket's name, that this machine can reach it, and its credentials (Application Default "
            "Credentials: the VM's service account, or `gcloud auth application-default login`) and permissions.")


def check_writable(directory: PathLike, what: str) -> epath.Path:
    """Writes and deletes a tiny object in `directory` (created if local); StorageError naming
    it when that fails. A run calls this first, so a wrong bucket stops it before compiling."""
    directory = as_path(directory)
    probe = directory / f".write-probe-{os.getpid()}-{time.time_ns()}"
    try:
        if not is_remote(directory):  # in a bucket, directories are key prefixes, made by writing
            directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as error:  # noqa: BLE001 - auth, HTTP and OS errors alike become one message
        raise StorageError(f"{what} {directory} is not writable ({_describe(error)}).{_hint(directory)}") from error
    return directory


def check_readable(path: PathLike, what: str) -> epath.Path:
    """StorageError naming `path` when it does not exist or cannot be listed."""
    path = as_path(path)
    try:
        found = path.exists()
    except Exception as error:  # noqa: BLE001
        raise StorageError(f"{what} {path} cannot be read ({_describe(error)}).{_hint(path)}") from error
    if not found:
        raise StorageError(f"{what} {path} does not exist.{_hint(path)}")
    return path


def _describe(error: Exception) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def files(directory: PathLike, suffix: str = "") -> list[epath.Path]:
    """The files below `directory` (recursively) whose names end with `suffix`, sorted.
    (epath's `**` glob is refused on GCS; `walk` lists a prefix in a few requests.)"""
    directory = as_path(directory)
    found = []
    for root, _, names in directory.walk():
        root = epath.Path(root)
        if is_remote(directory) and not is_remote(root):  # gcsfs walks without the gs:// scheme
            root = epath.Path(f"{os.fspath(directory).split('://')[0]}://{root}")
        found += [root / name for name in names if name.endswith(suffix)]
    return sorted(found, key=os.fspath)


def glob(pattern: PathLike) -> list[epath.Path]:
    """Files matching a glob pattern (`**` for any depth), sorted."""
    pattern = os.fspath(pattern)
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = "/".join(parts[:fixed]) or "/"
    rest = "/".join(parts[fixed:])
    # fnmatch's "*" crosses "/", so "**/" is matched as "any prefix, possibly none"
    compiled = re.compile(fnmatch.translate(rest.replace("**/", "\0")).replace("\0", "(?:.*/)?"))
    base = as_path(base)
    return [p for p in files(base) if compiled.fullmatch(os.fspath(p)[len(os.fspath(base)) + 1 :])]


def data_files(paths: PathLike | Sequence[PathLike], suffix: str) -> list[str]:
    """A directory (its files ending in `suffix`, searched recursively), a glob pattern, a
    file, or a list of these → files (a data set's parquet files or tar shards)."""
    found = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if any(c in path for c in "*?["):  # glob.has_magic
            found += map(os.fspath, glob(path))
        elif as_path(path).is_dir():
            found += map(os.fspath, files(path, suffix))
        elif as_path(path).exists():
            found.append(os.fspath(as_path(path)))
        else:
            raise FileNotFoundError(f"{suffix[1:]} path {path!r} does not exist")
    if not found:
        raise FileNotFoundError(f"no {suffix[1:]} files in {paths!r}")
    return found


def copy_tree(source: PathLike, target: PathLike) -> None:
    """Copies every file below `source` to the same place below `target` (either may be remote)."""
    source, target = as_path(source), as_path(target)
    for file in files(source):
        destination = target / os.fspath(file)[len(os.fspath(source)) + 1 :]
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(file.read_bytes())


def remove_tree(path: PathLike) -> None:
    path = as_path(path)
    if path.exists():
        path.rmtree()


@contextlib.contextmanager
def staged(target: PathLike) -> Iterator[str]:
    """A local directory to write `target`'s files into: `target` itself when local, else a
    temporary one uploaded to `target` when the block ends without an error."""
    if not is_remote(target):
        yield os.fspath(as_path(target))
        return
    with tempfile.TemporaryDirectory(prefix="fireedit-staged-") as local:
        yield local
        copy_tree(local, target)


def local_copy(path: PathLike, *, cache: bool = False) -> str:
    """A local directory with the files of `path`: `path` itself when local; else a copy, in a
    fresh temporary directory, or with `cache` in $FIREEDIT_JAX_DATA_CACHE (default
    ~/.cache/fireedit_jax/remote), reused while the remote files keep their names, sizes and
    modification times."""
    if not is_remote(path):
        return os.fspath(as_path(path))
    path = check_readable(path, "directory")
    remote = files(path)
    if not cache:
        local = tempfile.mkdtemp(prefix="fireedit-copy-")
        copy_tree(path, local)
        return local
    listing = [(os.fspath(f)[len(os.fspath(path)) + 1 :], f.stat().length, f.stat().mtime) for f in remote]
    key = hashlib.sha256(json.dumps([os.fspath(path), listing]).encode()).hexdigest()[:20]
    root = os.environ.get("FIREEDIT_JAX_DATA_CACHE", os.path.expanduser("~/.cache/fireedit_jax/remote"))
    local = os.path.join(root, key)
    if not os.path.exists(os.path.join(local, ".complete")):
        shutil.rmtree(local, ignore_errors=True)
        copy_tree(path, local)
        with open(os.path.join(local, ".complete"), "w") as marker:
            marker.write(os.fspath(path))
    return local


def save_image(image, path: PathLike) -> None:
    """A PIL image → `path` (its format from the suffix), parents created."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=_FORMATS.get(path.suffix.lower(), image.format or "PNG"))
    path.write_bytes(buffer.getvalue())


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


class AppendFile:
    """A text file written by appending lines: a local file is opened for appending and
    flushed at every write; an object in a bucket (which cannot be appended to) is read once,
    kept in memory and rewritten whole when `flush_seconds` have passed since the last upload,
    on `flush()` and on `close()` (what a crash loses since then, a resumed run writes again)."""

    def __init__(self, path: PathLike, *, flush_seconds: float = 30.0):
        self.path = as_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_remote(self.path)
        self._flush_seconds = flush_seconds
        if self._remote:
            self._text = io.StringIO()
            self._text.write(self.path.read_text() if self.path.exists() else "")
            self._dirty, self._uploaded = False, time.monotonic()
        else:
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if not self._remote:
            self._file.write(text)
            self._file.flush()
            return
        self._text.write(text)
        self._dirty = True
        if time.monotonic() - self._uploaded >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            self.path.write_text(self._text.getvalue())
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()
