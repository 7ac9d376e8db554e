"""MagicBrush and Emu Edit benchmark runners: edit, score, resume, summarise.

    summary = run_magicbrush(editor, "data/MagicBrush/test", "runs/mb", scorer=scorer, turns="both")
    summary = run_emu(editor, "data/emu_edit_test_set", "runs/emu", scorer=scorer, split="test")

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
  output_caption. Metrics compare the output with the *input* image and the output
  caption (CLIP-out, reported as clip_t), CLIP-dir uses both captions.

Protocols (REFERENCES.md §8, MagicBrush's evaluation README):
  turns="single"  every turn edited from its ground-truth input: the "all_turn" mean
                  over every turn (MagicBrush's single-turn setting)
  turns="multi"   turn k edits our own output of turn k−1: the "final_turn" mean over
                  each session's last turn (MagicBrush's multi-turn setting)
  turns="both"    both; turn 1 is shared.
Outputs follow MagicBrush's naming, so its `image_eval.py --generated_path OUT/images`
runs on them too: OUT/images/<id>/<id>_1.png, <id>_inde_<k>.png, <id>_iter_<k>.png.
Emu Edit outputs: OUT/images/<idx>.png.

A sample whose image cannot be read is reported, skipped and counted in the summary (as
are the iterative turns that would continue it).

DIR and OUT may be local or gs:// (storage.py; OUT/results.jsonl in a bucket is uploaded
every 30 s and at the end, so an interrupted run redoes at most that much).

OUT/results.jsonl holds one line per finished (or failed) sample; a re-run skips the
finished ones, retries failed ones, and re-scores saved outputs when the metric encoders
changed. OUT/run.json records the settings; resuming with other edit settings or data is
an error (a fresh OUT is needed). Summaries: OUT/summary.json, OUT/summary.md and
OUT/grid.png (input · instruction · output · target, for a sample of edits).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from fireedit_jax import images, storage
from fireedit_jax.eval.batch_edit import (DatasetError, DeviceBatcher, EditJob, EditSettings, detector_proposer,
                                          progress_bar, report)
from fireedit_jax.eval.metrics import aggregate
from fireedit_jax.eval.scorer import ALL_METRICS, Scorer

MAGICBRUSH_SESSION_FIELDS = ("input", "output", "instruction")
MAGICBRUSH_PARQUET_FIELDS = ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")
EMU_FIELDS = ("instruction", "image", "task", "split", "idx", "hash", "input_caption", "output_caption")
TURNS = ("single", "multi", "both")


class RunSettingsError(ValueError):
    """An output directory holding results made with other edit settings or data."""


# ------------------------------------------------------------------ reading data sets

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


# ------------------------------------------------------------------ the shared runner


@dataclasses.dataclass
class _Spec:
    """One edit to make and score."""

    key: str
    output: str  # relative to the output directory
    instruction: str
    source: ImageLoader | None  # None: the output of `after`
    reference: ImageLoader  # what the output is compared with
    labels: dict  # copied into the record
    caption: str | None = None
    mask: ImageLoader | None = None  # the edit region (masked runs)
    source_caption: str | None = None
    after: str | None = None  # the spec whose output this one edits


class ResultLog:
    """OUT/results.jsonl (the last line per key wins) and OUT/run.json (settings and scorer)."""

    def __init__(self, out_dir: str, settings: dict, scorer_description: dict):
        self.out_dir, self.settings = out_dir, settings
        out = storage.check_writable(out_dir, "--out")
        self._run_path = out / "run.json"
        self.rescore = False
        if self._run_path.exists():
            previous = json.loads(self._run_path.read_text())
            then = previous["settings"]
            differences = [f"{name}: {then.get(name)!r} then, {settings.get(name)!r} now"
                           for name in {**then, **settings} if then.get(name) != settings.get(name)]
            if differences:
                raise RunSettingsError(f"{out_dir!r} holds results made with other settings ("
                                       + "; ".join(differences) + "): use a new output directory")
            self.rescore = previous.get("scorer") != scorer_description
        if not self.rescore:
            self.write_run(scorer_description)
        self.records: dict[str, dict] = {}
        results = out / "results.jsonl"
        for line in results.read_text().splitlines() if results.exists() else []:
            if line.strip():
                record = json.loads(line)
                self.records[record["key"]] = record
        self._results = storage.AppendFile(results)

    def write_run(self, scorer_description: dict) -> None:
        """Records the settings and the scorer (after a re-scoring has finished, so an interrupted one resumes)."""
        self._run_path.write_text(json.dumps({"settings": self.settings, "scorer": scorer_description}, indent=1))

    def done(self, key: str) -> bool:
        record = self.records.get(key)
        if record is None or "error" in record:
            return False
        return (storage.as_path(self.out_dir) / record["output"]).exists()

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        self._results.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Uploads what a bucket's results.jsonl has not got yet."""
        self._results.close()


def _load_source(log: ResultLog, specs: dict[str, _Spec], spec: _Spec) -> Image.Image:
    """The image a spec edits: its input, or (iterative turns) our saved output of the turn before."""
    return spec.source() if spec.source else images.load_image(os.path.join(log.out_dir, specs[spec.after].output))


def _score(scorer: Scorer, specs: Sequence[_Spec], outputs, references, versus_source: bool) -> list[dict]:
    captions = [s.caption for s in specs]
    if versus_source:  # Emu Edit: the reference is the input; CLIP-dir from both captions
        return scorer.score(outputs, references, captions=captions, sources=references,
                            source_captions=[s.source_caption for s in specs])
    return scorer.score(outputs, references, captions=captions, oracle=True)


def _run_specs(editor, waves: Sequence[Sequence[_Spec]], log: ResultLog, scorer: Scorer, settings: EditSettings,
               batch_size: int | None, proposer: str | None, progress: bool, versus_source: bool,
               mask_edit: dict | None = None) -> dict:
    """Edits and scores every unfinished spec, wave after wave (a wave may edit the previous one's outputs)."""
    out_dir = log.out_dir
    by_key = {s.key: s for wave in waves for s in wave}
    if log.rescore:
        _rescore(log, [s for s in by_key.values() if log.done(s.key)], scorer, versus_source)
        log.write_run(scorer.describe())
    pending = [[s for s in wave if not log.done(s.key)] for wave in waves]
    total = sum(map(len, pending))
    stats = {"edits": 0, "errors": 0, "seconds": 0.0}
    if not total:
        return stats
    batcher = DeviceBatcher(editor, settings, batch_size, propose=detector_proposer(proposer), **(mask_edit or {}))
    start = time.perf_counter()
    with progress_bar(total, progress, "edit") as bar:

        def fail(spec: _Spec, message: str) -> None:
            report(f"skipped {spec.key}: {message}")
            log.add({"key": spec.key, **spec.labels, "output": spec.output, "error": message})
            stats["errors"] += 1
            bar.update(1)

        def jobs(wave):
            for spec in wave:
                if spec.after is not None and not log.done(spec.after):
                    fail(spec, f"the turn it continues ({spec.after}) has no output")
                    continue
                if mask_edit is not None and spec.mask is None:
                    fail(spec, "no mask in the data set for this edit")
                    continue
                try:
                    source = _load_source(log, by_key, spec)
                    reference = source if versus_source else spec.reference()
                    mask = images.load_mask(spec.mask(), source.size, f"{spec.key} mask") if mask_edit is not None else None
                except images.ImageError as err:
                    fail(spec, str(err))
                    continue
                yield EditJob(spec.key, source, spec.instruction, payload=(spec, reference), mask=mask)

        for wave in pending:
            for batch in batcher.run(jobs(wave)):
                specs = [job.payload[0] for job, _ in batch]
                outputs = [output for _, output in batch]
                for spec, output in zip(specs, outputs):
                    storage.save_image(output, os.path.join(out_dir, spec.output))
                scores = _score(scorer, specs, outputs, [job.payload[1] for job, _ in batch], versus_source)
                for spec, values in zip(specs, scores):
                    log.add({"key": spec.key, **spec.labels, "instruction": spec.instruction, "output": spec.output,
                             **values})
                stats["edits"] += len(batch)
                bar.update(len(batch))
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats


def _rescore(log: ResultLog, specs: Sequence[_Spec], scorer: Scorer, versus_source: bool, chunk: int = 16) -> None:
    """The metric encoders changed: score the saved outputs again (no re-editing)."""
    for i in range(0, len(specs), chunk):
        part, outputs, references = [], [], []
        for spec in specs[i: i + chunk]:
            try:
                reference = spec.source() if versus_source else spec.reference()
            except images.ImageError:
                continue  # it failed before; the record keeps its old scores
            part.append(spec)
            outputs.append(images.load_image(os.path.join(log.out_dir, spec.output)))
            references.append(reference)
        if part:
            for spec, values in zip(part, _score(scorer, part, outputs, references, versus_source)):
                record = {k: v for k, v in log.records[spec.key].items() if k not in ALL_METRICS}
                log.add({**record, **values})


# ------------------------------------------------------------------ MagicBrush


def _magicbrush_output(session: str, turn: int, mode: str) -> str:
    name = f"{session}_1.png" if turn == 1 else f"{session}_{'inde' if mode == 'independent' else 'iter'}_{turn}.png"
    return os.path.join("images", session, name)


def _magicbrush_key(session: str, turn: int, mode: str) -> str:
    return f"{session}/1" if turn == 1 else f"{session}/{'inde' if mode == 'independent' else 'iter'}/{turn}"


def _magicbrush_spec(turn: MagicBrushTurn, mode: str) -> _Spec:
    iterative = mode == "iterative" and turn.turn > 1
    return _Spec(
        key=_magicbrush_key(turn.session, turn.turn, mode), output=_magicbrush_output(turn.session, turn.turn, mode),
        instruction=turn.instruction, source=None if iterative else turn.source, reference=turn.target,
        caption=turn.caption, after=_magicbrush_key(turn.session, turn.turn - 1, mode) if iterative else None,
        mask=turn.mask,
        labels={"benchmark": "magicbrush", "session": turn.session, "turn": turn.turn,
                "mode": "iterative" if iterative else "independent"},
    )  # fmt: skip


def run_magicbrush(editor, data_dir: str, out_dir: str, *, scorer: Scorer | None = None, split: str = "test",
                   turns: str = "single", limit: int | None = None, batch_size: int | None = None,
                   settings: EditSettings = EditSettings(), captions: str = "local", proposer: str | None = None,
                   grid_size: int = 8, masks: bool = False, mask_dilation: int = 0, mask_feather: float = 0.0,
                   progress: bool = True) -> dict:
    """Runs MagicBrush; returns the summary (also written to out_dir). See the module docstring.

    limit: the first N edit sessions (all their turns). captions: "local" or "global"
    descriptions for CLIP-T (release layout only). proposer: a Deformable DETR directory
    proposing FireEdit's regions on each edit's input (data/proposals.py); None: no regions.
    batch_size: edits per batch, rounded up to a multiple of the local devices (default:
    one per device). grid_size: rows of grid.png. masks: edit under each turn's annotated mask
    (masked sampling; grown by mask_dilation pixels and feathered over mask_feather at the working
    size, as `Editor.edit`); a turn without one is recorded as an error.
    """
    if turns not in TURNS:
        raise ValueError(f"turns={turns!r}: one of {', '.join(TURNS)}")
    if captions not in ("local", "global"):
        raise ValueError(f"captions={captions!r}: 'local' or 'global'")
    scorer = scorer or Scorer()
    sessions = load_magicbrush(data_dir, split=split, captions=captions)[:limit]
    independent = [_magicbrush_spec(t, "independent") for s in sessions for t in s
                   if turns != "multi" or t.turn == 1]
    iterative = []
    if turns != "single":
        depth = max((len(s) for s in sessions), default=0)
        iterative = [[_magicbrush_spec(s[k - 1], "iterative") for s in sessions if len(s) >= k]
                     for k in range(2, depth + 1)]
    run_settings = {"benchmark": "magicbrush", "data": os.fspath(storage.as_path(data_dir)), "split": split,
                    "captions": captions, **_common_settings(settings, proposer)}
    mask_edit = dict(mask_dilation=mask_dilation, mask_feather=mask_feather) if masks else None
    if masks:  # recorded only when used, so runs made before masks existed still resume
        run_settings.update(masks=True, **mask_edit)
    log = ResultLog(out_dir, run_settings, scorer.describe())
    try:
        this_run = _run_specs(editor, [independent, *iterative], log, scorer, settings, batch_size, proposer,
                              progress, versus_source=False, mask_edit=mask_edit)  # fmt: skip
    finally:
        log.close()

    specs = {s.key: s for wave in [independent, *iterative] for s in wave}
    records = [log.records[key] for key in specs if key in log.records]
    finished = [r for r in records if "error" not in r]
    results, by_turn = {}, {}
    if turns != "multi":
        results["all_turn"] = _mean([r for r in finished if r["mode"] == "independent"])
        by_turn["turn/independent"] = aggregate([r for r in finished if r["mode"] == "independent"], by="turn",
                                           metrics=_metric_names(finished))
    if turns != "single":
        last = {s[-1].session: _magicbrush_key(s[-1].session, s[-1].turn, "iterative") for s in sessions if s}
        results["final_turn"] = _mean([r for r in finished if last.get(r["session"]) == r["key"]])
        by_turn["turn/iterative"] = aggregate([r for r in finished if r["mode"] == "iterative" or r["turn"] == 1],
                                         by="turn", metrics=_metric_names(finished))
    has_captions = any(t.caption for s in sessions for t in s)
    summary = _summary("magicbrush", run_settings, scorer, records, results, by_turn, this_run,
                       sessions=len(sessions), captions=f"{captions}_descriptions.json" if has_captions else None)
    _write_outputs(out_dir, summary, _grid_rows(log, specs, finished, grid_size, versus_source=False))
    return summary


# ------------------------------------------------------------------ Emu Edit


def run_emu(editor, data_dir: str, out_dir: str, *, scorer: Scorer | None = None, split: str = "test",
            limit: int | None = None, batch_size: int | None = None, settings: EditSettings = EditSettings(),
            proposer: str | None = None, grid_size: int = 8, progress: bool = True) -> dict:
    """Runs Emu Edit; returns the summary (also written to out_dir). limit: the first N rows; the rest
    as `run_magicbrush`."""
    scorer = scorer or Scorer()
    samples = load_emu(data_dir, split=split)[:limit]
    specs = [_Spec(key=f"{split}/{s.idx}", output=os.path.join("images", f"{s.idx}.png"), instruction=s.instruction,
                   source=s.image, reference=s.image, caption=s.output_caption, source_caption=s.input_caption,
                   labels={"benchmark": "emu_edit", "idx": s.idx, "task": s.task}) for s in samples]
    run_settings = {"benchmark": "emu_edit", "data": os.fspath(storage.as_path(data_dir)), "split": split,
                    **_common_settings(settings, proposer)}
    log = ResultLog(out_dir, run_settings, scorer.describe())
    try:
        this_run = _run_specs(editor, [specs], log, scorer, settings, batch_size, proposer, progress,
                              versus_source=True)  # fmt: skip
    finally:
        log.close()

    records = [log.records[s.key] for s in specs if s.key in log.records]
    finished = [r for r in records if "error" not in r]
    identical = sum(1 for s in samples if s.input_caption == s.output_caption)
    summary = _summary("emu_edit", run_settings, scorer, records, {"all": _mean(finished)},
                       {"task": aggregate(finished, by="task", metrics=_metric_names(finished))}, this_run,
                       identical_captions=identical)
    grid = _grid_rows(log, {s.key: s for s in specs}, finished, grid_size, versus_source=True)
    _write_outputs(out_dir, summary, grid)
    return summary


# ------------------------------------------------------------------ summaries


def _common_settings(settings: EditSettings, proposer: str | None) -> dict:
    return {**dataclasses.asdict(settings), "proposer": os.path.abspath(proposer) if proposer else None}


def _metric_names(records: Sequence[dict]) -> list[str]:
    present = {k for r in records for k, v in r.items() if v is not None}
    return [m for m in ALL_METRICS if m in present]


def _mean(records: Sequence[dict]) -> dict:
    return aggregate(records, metrics=_metric_names(records))


def _summary(benchmark, run_settings, scorer, records, results, breakdowns, this_run, **extra) -> dict:
    errors = [{"key": r["key"], "error": r["error"]} for r in records if "error" in r]
    return {
        "benchmark": benchmark,
        "settings": run_settings,
        "scorer": scorer.describe(),
        "counts": {"samples": len(records), "finished": len(records) - len(errors), "errors": len(errors)},
        "results": results,
        "by": breakdowns,
        "errors": errors,
        "this_run": this_run,
        **extra,
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(title: str, rows: dict[str, dict]) -> list[str]:
    metrics = [m for m in ALL_METRICS if any(m in row for row in rows.values())]
    lines = [f"### {title}", "", "| | count | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['count']} | " + " | ".join(_fmt(row.get(m, math.nan)) for m in metrics) + " |")
    return lines + [""]


def markdown(summary: dict) -> str:
    """The summary as Markdown: results per protocol, then per turn / task, then the scorer and errors."""
    s = summary
    lines = [f"# {s['benchmark']}", ""]
    lines += [f"{s['counts']['finished']} of {s['counts']['samples']} samples scored, {s['counts']['errors']} failed; "
              f"{s['settings']['steps']} steps, s_I {s['settings']['image_guidance']}, "
              f"s_T {s['settings']['text_guidance']}, seed {s['settings']['seed']}.", ""]
    lines += _table("Results", s["results"])
    for by, rows in s["by"].items():
        lines += _table(f"By {by}", {str(k): v for k, v in rows.items()})
    lines += ["### Metrics", ""]
    if "captions" in s:
        lines.append(f"- CLIP-T captions: {s['captions'] or 'none in the data (no CLIP-T)'}")
    lines += [f"- {name}: {description}" for name, description in s["scorer"]["models"].items()]
    lines += [f"- {metric} not computed: {why}" for metric, why in s["scorer"]["skipped"].items()]
    if s["benchmark"] == "emu_edit":
        lines += ["- clip_t is Emu Edit's CLIP-out (output caption); l1, clip_i and dino compare with the input image",
                  f"- {s['identical_captions']} samples have identical input and output captions (their clip_dir is 0)"]
    if s["errors"]:
        lines += ["", "### Failed samples", ""] + [f"- {e['key']}: {e['error']}" for e in s["errors"]]
    return "\n".join(lines) + "\n"


def _grid_rows(log, specs, finished, grid_size, versus_source):
    """Up to grid_size finished edits, evenly spread: (input, "key: instruction", output, target or None)."""
    if not finished or grid_size <= 0:
        return []
    picks = [finished[i] for i in np.unique(np.linspace(0, len(finished) - 1, grid_size).round().astype(int))]
    rows = []
    for record in picks:
        spec = specs[record["key"]]
        try:
            source = _load_source(log, specs, spec)
            target = None if versus_source else spec.reference()
            output = images.load_image(os.path.join(log.out_dir, spec.output))
        except images.ImageError:
            continue
        rows.append((source, f"{record['key']}: {spec.instruction}", output, target))
    return rows


def write_grid(path: str, rows, cell: int = 256) -> None:
    """A PNG: one row per edit, columns input · instruction · output · target."""
    font = ImageFont.load_default()
    header = 24
    grid = Image.new("RGB", (4 * cell, header + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("input", "instruction", "output", "target")):
        draw.text((c * cell + 8, 6), title, fill="black", font=font)
    for r, (source, instruction, output, target) in enumerate(rows):
        top = header + r * cell
        for c, image in ((0, source), (2, output), (3, target)):
            if image is None:
                draw.text((c * cell + 8, top + cell // 2), "(no target)", fill="gray", font=font)
                continue
            scale = cell / max(image.size)  # fit the cell, small images enlarged
            thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
            grid.paste(thumb, (c * cell + (cell - thumb.width) // 2, top + (cell - thumb.height) // 2))
        draw.multiline_text((cell + 8, top + 8), _wrap(instruction, draw, font, cell - 16), fill="black", font=font)
    storage.save_image(grid, path)


def _wrap(text: str, draw, font, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return "\n".join(lines + [line])


def _strict_json(value):
    """NaN (a metric with no values in a group) → null, so summary.json is standard JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_outputs(out_dir: str, summary: dict, grid_rows) -> None:
    out = storage.as_path(out_dir)
    (out / "summary.json").write_text(json.dumps(_strict_json(summary), indent=1, default=str, allow_nan=False))
    (out / "summary.md").write_text(markdown(summary))
    if grid_rows:
        write_grid(os.path.join(out_dir, "grid.png"), grid_rows)
