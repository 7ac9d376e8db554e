"""What a benchmark run reports: the summary's means and breakdowns, summary.md, grid.png."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from fireedit_jax import storage
from fireedit_jax.eval.metrics import aggregate
from fireedit_jax.eval.scorer import ALL_METRICS


def metric_names(records: Sequence[dict]) -> list[str]:
    """The metrics (in ALL_METRICS order) that some record has a value for."""
    present = {k for r in records for k, v in r.items() if v is not None}
    return [m for m in ALL_METRICS if m in present]


def mean(records: Sequence[dict]) -> dict:
    """The records' count and mean of each metric they have."""
    return aggregate(records, metrics=metric_names(records))


def summarise(benchmark, run_settings, scorer, records, results, breakdowns, this_run, **extra) -> dict:
    """summary.json's content: settings, scorer, counts, results, breakdowns (`by`) and failed samples."""
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


def strict_json(value):
    """NaN (a metric with no values in a group) → null, so summary.json is standard JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
