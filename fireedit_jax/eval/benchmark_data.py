"""MagicBrush and Emu Edit as the benchmark runners (eval/benchmarks.py) read them.

    sessions = load_magicbrush("data/MagicBrush/test", captions="local")  # [[MagicBrushTurn, ...], ...]
    samples = load_emu("data/emu_edit_test_set", split="test")            # [EmuSample, ...]

Data layouts read (a wrong one raises `DatasetError` naming the missing files or fields):

MagicBrush, the test release (the password-protected zip; also its dev release):
  DIR/edit_sessions.json   {"<id>": [{"input": "<id>-input.png", "mask": "<id>-mask1.png",
                                      "output": "<id>-output1.png", "instruction": "..."},
                                     {"input": "<id>-output1.png", "mask": "<id>-mask2.png",
                                      "output": "<id>-output2.png", "instruction": "..."}, ...]}
                           one list per edit session, in turn order; turn k's input is the
                           ground-truth output of turn k−1 ("mask": its edit region, read
                           with masks=True)
  DIR/images/<id>/         <id>-input.png, <id>-outputK.png, <id>-maskK.png
  DIR/local_descriptions.json, DIR/global_descriptions.json (optional)
                           {"<id>": {"<id>-outputK.png": caption, ...}} — captions for CLIP-T;
                           the paper used the local ones (MagicBrush issue #17), the
                           script's default is the global ones (`captions=`).
  DIR may also be the folder holding test/ (or the split's name).
  Sources: OSU-NLP-Group/MagicBrush `edit_cli_single_multi_turn.py` (reads
  `images/../edit_sessions.json`, dict of session id → list of {input, output,
  instruction}) and `evaluation/image_eval.py` (captions keyed [id][file]); issues #15
  (a sample entry with input/mask/output/instruction) and #24 (caption files).
MagicBrush on the Hugging Face hub (osunlp/MagicBrush; train and dev only):
  DIR/**/<split>-*.parquet with img_id, turn_index, source_img, mask_img, instruction,
  target_img; images are structs {bytes, path}. No captions (no CLIP-T).
Emu Edit (facebook/emu_edit_test_set; no target images):
  DIR/**/<split>-*.parquet with instruction, image, task, split, idx, hash, input_caption,
  output_caption (the runner compares an output with its *input* image).

Images are read when a sample's loader is called, not when the set is listed; DIR may be
local or gs:// (storage.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from fireedit_jax import images, storage
from fireedit_jax.eval.batch_edit import DatasetError

MAGICBRUSH_SESSION_FIELDS = ("input", "output", "instruction")
MAGICBRUSH_PARQUET_FIELDS = ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")
EMU_FIELDS = ("instruction", "image", "task", "split", "idx", "hash", "input_caption", "output_caption")

ImageLoader = Callable[[], Image.Image]


def decode_image(value, name: str, rgb: bool = True) -> Image.Image:
    """A parquet image cell ({bytes, path} struct or raw bytes) → RGB PIL (rgb=False: as stored,
    e.g. a mask's alpha); ImageError naming the cell."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise images.ImageError(f"{name} holds no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return images.to_rgb(opened.copy()) if rgb else opened.copy()
    except UnidentifiedImageError:
        raise images.ImageError(f"{name} is not a readable image (unknown format)") from None
    except OSError as err:
        raise images.ImageError(f"{name} is not a readable image ({err})") from None


def _file_loader(path: str, rgb: bool = True) -> ImageLoader:
    """Loads the file when called: RGB, or (rgb=False) as stored, e.g. a mask's alpha."""
    return (lambda: images.load_image(path)) if rgb else (lambda: images.open_image(path, "mask"))


class ParquetRows:
    """Rows of Hugging Face parquet files: plain fields read at once, image fields on demand.

    Every file's schema is checked first: a missing field raises `DatasetError` naming it.
    """

    def __init__(self, files: Sequence[str], fields: Sequence[str], image_fields: Sequence[str], what: str):
        import pyarrow.parquet as pq

        self._files = {path: pq.ParquetFile(storage.as_path(path).open("rb")) for path in files}
        self.rows: list[dict] = []
        for path, parquet in self._files.items():
            names = parquet.schema_arrow.names
            missing = [name for name in fields if name not in names]
            if missing:
                raise DatasetError(f"{path} lacks the field(s) {', '.join(missing)} of the {what} layout "
                                   f"(it has: {', '.join(names)})")
            plain = [name for name in fields if name not in image_fields]
            for group in range(parquet.num_row_groups):
                for offset, row in enumerate(parquet.read_row_group(group, columns=plain).to_pylist()):
                    row["_where"] = (path, group, offset, len(self.rows))
                    self.rows.append(row)
        self._groups: dict[tuple, list] = {}

    def loader(self, row: dict, field: str, rgb: bool = True) -> ImageLoader:
        return lambda: self.image(row, field, rgb)

    def image(self, row: dict, field: str, rgb: bool = True) -> Image.Image:
        path, group, offset, index = row["_where"]
        cache_key = (path, group, field)
        if cache_key not in self._groups:
            if len(self._groups) >= 4:  # a few row groups of image bytes at a time
                self._groups.pop(next(iter(self._groups)))
            self._groups[cache_key] = self._files[path].read_row_group(group, columns=[field]).column(field).to_pylist()
        return decode_image(self._groups[cache_key][offset], f"{os.path.basename(path)} row {index} {field!r}", rgb)


def _parquet_files(data_dir: str, split: str, what: str) -> list[str]:
    parquet = [os.fspath(p) for p in storage.files(data_dir, ".parquet")]
    files = [p for p in parquet if os.path.basename(p).startswith(f"{split}-")]
    if not files:
        root = os.fspath(storage.as_path(data_dir))
        others = [p[len(root) + 1 :] for p in parquet]
        found = f"; parquet files there: {', '.join(others[:8])}" if others else ""
        raise DatasetError(f"{data_dir!r}: no {split}-*.parquet files of the {what} layout{found}")
    return files


@dataclasses.dataclass
class MagicBrushTurn:
    """One MagicBrush edit: `source` is the ground-truth input of this turn, `target` its ground truth."""

    session: str
    turn: int  # 1-based
    instruction: str
    source: ImageLoader
    target: ImageLoader
    caption: str | None = None
    mask: ImageLoader | None = None  # the annotators' edit region, as stored (`images.mask_from_image` reads it)


def load_magicbrush(data_dir: str, *, split: str = "test", captions: str = "local") -> list[list[MagicBrushTurn]]:
    """Edit sessions (lists of turns, in order) from the release layout or the parquet one (module docstring)."""
    if not storage.as_path(data_dir).is_dir():
        raise DatasetError(f"MagicBrush directory {data_dir!r} does not exist")
    for root in (data_dir, os.path.join(data_dir, split)):
        if (storage.as_path(root) / "edit_sessions.json").exists():
            return _magicbrush_release(os.fspath(storage.as_path(root)), captions)
    if storage.files(data_dir, ".parquet"):
        return _magicbrush_parquet(data_dir, split)
    raise DatasetError(f"{data_dir!r} is neither MagicBrush's release layout (edit_sessions.json + images/) "
                       f"nor its parquet layout ({split}-*.parquet)")


def _magicbrush_release(root: str, captions: str) -> list[list[MagicBrushTurn]]:
    sessions = json.loads((storage.as_path(root) / "edit_sessions.json").read_text())
    if not isinstance(sessions, dict):
        raise DatasetError(f"{root}/edit_sessions.json must map session ids to lists of turns, "
                           f"got a {type(sessions).__name__}")
    image_dir = os.path.join(root, "images")
    if not storage.as_path(image_dir).is_dir():
        raise DatasetError(f"{root!r} has edit_sessions.json but no images/ folder")
    caption_file = storage.as_path(root) / f"{captions}_descriptions.json"
    descriptions = json.loads(caption_file.read_text()) if caption_file.exists() else {}
    problems, out = [], []
    for session, turns in sessions.items():
        entries = []
        for k, entry in enumerate(turns if isinstance(turns, list) else [None], 1):
            missing = [name for name in MAGICBRUSH_SESSION_FIELDS if not isinstance(entry, dict) or name not in entry]
            if missing:
                problems.append(f"session {session} turn {k} lacks {', '.join(missing)}")
                continue
            folder = os.path.join(image_dir, str(session))
            entries.append(MagicBrushTurn(
                session=str(session), turn=k, instruction=entry["instruction"],
                source=_file_loader(os.path.join(folder, entry["input"])),
                target=_file_loader(os.path.join(folder, entry["output"])),
                caption=descriptions.get(str(session), {}).get(entry["output"]),
                mask=_file_loader(os.path.join(folder, entry["mask"]), rgb=False) if entry.get("mask") else None,
            ))  # fmt: skip
        out.append(entries)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        fields = ", ".join(MAGICBRUSH_SESSION_FIELDS)
        raise DatasetError(f"{root}/edit_sessions.json: each turn needs the fields {fields}: "
                           + "; ".join(problems[:5]) + more)
    return out


def _magicbrush_parquet(data_dir: str, split: str) -> list[list[MagicBrushTurn]]:
    table = ParquetRows(_parquet_files(data_dir, split, "MagicBrush"), MAGICBRUSH_PARQUET_FIELDS,
                        ("source_img", "mask_img", "target_img"), "MagicBrush")
    sessions: dict[str, list[dict]] = {}
    for row in table.rows:
        sessions.setdefault(str(row["img_id"]), []).append(row)
    out = []
    for session, rows in sessions.items():
        rows.sort(key=lambda r: r["turn_index"])
        out.append([MagicBrushTurn(session=session, turn=k, instruction=row["instruction"],
                                   source=table.loader(row, "source_img"), target=table.loader(row, "target_img"),
                                   mask=table.loader(row, "mask_img", rgb=False))
                    for k, row in enumerate(rows, 1)])
    return out


@dataclasses.dataclass
class EmuSample:
    idx: str
    instruction: str
    task: str
    image: ImageLoader
    input_caption: str | None
    output_caption: str | None


def load_emu(data_dir: str, *, split: str = "test") -> list[EmuSample]:
    """Rows of facebook/emu_edit_test_set's parquet files for `split` (module docstring)."""
    if not storage.as_path(data_dir).is_dir():
        raise DatasetError(f"Emu Edit directory {data_dir!r} does not exist")
    table = ParquetRows(_parquet_files(data_dir, split, "Emu Edit"), EMU_FIELDS, ("image",), "Emu Edit")
    samples = [EmuSample(idx=str(row["idx"]), instruction=row["instruction"], task=str(row["task"]),
                         image=table.loader(row, "image"), input_caption=row["input_caption"],
                         output_caption=row["output_caption"]) for row in table.rows]
    seen: dict[str, int] = {}
    for sample in samples:
        seen[sample.idx] = seen.get(sample.idx, 0) + 1
    repeated = [idx for idx, count in seen.items() if count > 1]
    if repeated:
        raise DatasetError(f"{data_dir!r}: idx values repeat within split {split!r}: {', '.join(repeated[:10])}")
    return samples
