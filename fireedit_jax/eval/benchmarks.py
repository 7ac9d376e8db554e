"""MagicBrush and Emu Edit benchmark runners: edit, score, resume, summarise.

    summary = run_magicbrush(editor, "data/MagicBrush/test", "runs/mb", scorer=scorer, turns="both")
    summary = run_emu(editor, "data/emu_edit_test_set", "runs/emu", scorer=scorer, split="test")

The data sets' layouts: eval/benchmark_data.py (a wrong one raises `DatasetError` naming the
missing files or fields). Emu Edit has no target images: metrics compare the output with the
*input* image and the output caption (CLIP-out, reported as clip_t), CLIP-dir uses both captions.

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
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fireedit_jax import images, storage
from fireedit_jax.eval.batch_edit import DeviceBatcher, EditJob, EditSettings, detector_proposer, progress_bar, report
from fireedit_jax.eval.benchmark_data import ImageLoader, MagicBrushTurn, load_emu, load_magicbrush
from fireedit_jax.eval.metrics import aggregate
from fireedit_jax.eval.report import markdown, mean, metric_names, strict_json, summarise, write_grid
from fireedit_jax.eval.result_log import ResultLog
from fireedit_jax.eval.scorer import ALL_METRICS, Scorer

TURNS = ("single", "multi", "both")


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
        results["all_turn"] = mean([r for r in finished if r["mode"] == "independent"])
        by_turn["turn/independent"] = aggregate([r for r in finished if r["mode"] == "independent"], by="turn",
                                           metrics=metric_names(finished))
    if turns != "single":
        last = {s[-1].session: _magicbrush_key(s[-1].session, s[-1].turn, "iterative") for s in sessions if s}
        results["final_turn"] = mean([r for r in finished if last.get(r["session"]) == r["key"]])
        by_turn["turn/iterative"] = aggregate([r for r in finished if r["mode"] == "iterative" or r["turn"] == 1],
                                         by="turn", metrics=metric_names(finished))
    has_captions = any(t.caption for s in sessions for t in s)
    summary = summarise("magicbrush", run_settings, scorer, records, results, by_turn, this_run,
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
    summary = summarise("emu_edit", run_settings, scorer, records, {"all": mean(finished)},
                       {"task": aggregate(finished, by="task", metrics=metric_names(finished))}, this_run,
                       identical_captions=identical)
    grid = _grid_rows(log, {s.key: s for s in specs}, finished, grid_size, versus_source=True)
    _write_outputs(out_dir, summary, grid)
    return summary


# ------------------------------------------------------------------ settings and outputs


def _common_settings(settings: EditSettings, proposer: str | None) -> dict:
    return {**dataclasses.asdict(settings), "proposer": os.path.abspath(proposer) if proposer else None}


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


def _write_outputs(out_dir: str, summary: dict, grid_rows) -> None:
    out = storage.as_path(out_dir)
    (out / "summary.json").write_text(json.dumps(strict_json(summary), indent=1, default=str, allow_nan=False))
    (out / "summary.md").write_text(markdown(summary))
    if grid_rows:
        write_grid(os.path.join(out_dir, "grid.png"), grid_rows)

