"""The paper's Table 3 ablation on ShapeEdit, plus the InstructPix2Pix-style text-encoder baseline.

    .venv/bin/python benchmarks/shapes_ablation.py --seeds 0 1 --samples 128 --out outputs/ablation

Rows (configs/shapes.py variants), each trained from scratch with the same budget
(steps × batch) and seeds:
  none          the VLM without region tokens, TATI or HVCA
  +Region       region tokens of the exact object boxes
  +Region+TATI  and the timestep-aware text injection
  full          and HVCA (FireEdit)
  clip_text     the UNet on a tiny CLIP text encoder (no VLM)
and the mask-guided rows (configs/shapes_mask.py; trained with mask_edit, edited under each scene's
exact edit mask):
  mask          clip_text + the mask encoder through gated cross-attention (PromptEditDiff)
  mask_gligen   the same through GLIGEN's gated self-attention + feed-forward
  mask_blend    clip_text told where only by the loss weights and masked sampling (w/o mask encoder)
  mask_fireedit full (FireEdit) + the mask encoder
Each model edits the first --samples scenes of the test split and of the held-out split
(attribute combinations never produced in training). Columns: specific edit success
(eval/shapes_metrics.py: the edit is in the edited box and every other object is kept) on
the test split, on its position/size references (scenes with several similar objects) and
on the held-out split; on the test split, success judged in the box alone, the fraction
of other objects kept, and preservation L1 outside the edited box; mean ± half the range
over seeds. --kinds and --max-objects train and score every row on a sub-task instead (e.g.
`--kinds colour --max-objects 1`: how fast a row learns colour words alone).
Not run in CI: on the 2-core CPU one row-seed of the demo's 1,500 steps costs about 10 minutes. A re-run
reuses the row-seeds whose OUT/<row>_seed<seed>/scores.json exists (refusing one trained with another
budget, and one scored with other settings unless --rescore, which edits and scores its checkpoint
again) and resumes unfinished training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

from fireedit_jax import demo
from fireedit_jax.data.shapes import KINDS

ROWS = {"none": "none", "region": "+Region", "region_tati": "+Region+TATI", "full": "full (FireEdit)",
        "clip_text": "clip_text (IP2P-style)", "mask": "mask (PromptEditDiff)",
        "mask_gligen": "mask, GLIGEN's layer", "mask_blend": "mask w/o mask encoder",
        "mask_fireedit": "FireEdit + mask", "mask_diffedit": "mask, DiffEdit's mask",
        "grounded": "mask + region model (grounded)", "grounded_diffedit": "grounded's generator, DiffEdit's mask", "grounded_exact": "grounded, generator on exact masks"}  # fmt: skip
# rows edited under a region found without a head: the row whose checkpoint they edit with (not retrained)
TRAINED_AS = {"mask_diffedit": "mask", "grounded_diffedit": "grounded"}
COLUMNS = {  # column: how a row-seed's scores.json gives it
    "test": lambda r: r["test"], "position/size": lambda r: r["position/size"], "heldout": lambda r: r["heldout"],
    "box success (test)": lambda r: r["summaries"]["test"]["overall"]["success"],
    "others kept (test)": lambda r: r["summaries"]["test"]["overall"]["kept"],
    "l1_outside": lambda r: r["l1_outside"],
    # rows that find their own region: its bounding box's IoU with the edit's box, the share of colour,
    # shape and remove edits on the referred object, and the same generator under the exact masks
    "region IoU (test)": lambda r: r.get("region", {}).get("box_iou", float("nan")),
    "right object (test)": lambda r: r.get("region", {}).get("referred_object", float("nan")),
    "exact mask (test)": lambda r: r.get("exact_mask", float("nan")),
}  # fmt: skip


def position_size(records_summary: dict) -> float:
    """Specific success over the position and size references, weighted by their counts."""
    parts = [records_summary["refer"].get(k) for k in ("position", "size")]
    parts = [p for p in parts if p]
    total = sum(p["count"] for p in parts)
    return sum(p["specific"] * p["count"] for p in parts) / total if total else float("nan")


def run_one(variant: str, seed: int, args) -> dict:
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import train_and_evaluate

    workdir = os.path.join(args.out, f"{variant}_seed{seed}")
    budget = {k: getattr(args, k) for k in ("steps", "batch_size", "kinds", "max_objects")}  # what trained it
    settings = {k: getattr(args, k) for k in ("samples", "edit_steps", "guidance")}  # what scored it
    if os.path.exists(os.path.join(workdir, "scores.json")):
        with open(os.path.join(workdir, "scores.json")) as f:
            result = json.load(f)
        trained_with = {k: result.get(k) for k in budget}
        if trained_with != budget:
            raise SystemExit(f"{workdir} was trained with {trained_with}, not {budget}: pass another --out")
        scored_with = {k: result.get(k) for k in settings}
        if scored_with == settings and not args.rescore:
            return result
        if not args.rescore:
            raise SystemExit(f"{workdir} was scored with {scored_with}, not {settings}: pass --rescore or another --out")
        train_seconds = result["train_seconds"]
    elif variant in TRAINED_AS:
        train_seconds = run_one(TRAINED_AS[variant], seed, args)["train_seconds"]
    else:
        start = time.perf_counter()
        train_and_evaluate(row_config(variant, seed, args), os.path.join(workdir, "train"))
        train_seconds = round(time.perf_counter() - start, 1)
        ckpt_lib.export(os.path.join(workdir, "train"), os.path.join(workdir, "checkpoint"))
    checkpoint = os.path.join(args.out, f"{TRAINED_AS.get(variant, variant)}_seed{seed}", "checkpoint")
    result = {**score(checkpoint, f"{variant} seed {seed}", args, diffedit=variant in TRAINED_AS),
              **budget, **settings, "train_seconds": train_seconds}  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def row_config(variant: str, seed: int, args):
    """The demo's config and budget for the row-seed, on the --kinds / --max-objects sub-task if given
    (the training and the eval source: the checkpoint's config scores it on the same)."""
    config = demo.demo_config(args.steps, args.batch_size, variant, seed=seed)
    for source in (config.data.sources.shapes, config.data.eval):
        if args.kinds:
            source.kinds = tuple(args.kinds)
        if args.max_objects:
            source.max_objects, source.min_objects = args.max_objects, min(source.min_objects, args.max_objects)
    return config


def score(checkpoint: str, name: str, args, diffedit: bool = False) -> dict:
    """Edits the first --samples scenes of the test and held-out splits with the checkpoint: under the
    region its head predicts where it has one (then also under the exact masks, on the test split),
    under DiffEdit's masks (`diffedit`), or as the checkpoint edits by default."""
    from fireedit_jax.pipeline import Editor

    editor = Editor.from_pretrained(checkpoint)
    edit = dict(steps=args.edit_steps, batch_size=args.batch_size, guidance=tuple(args.guidance))
    scores, extra = {}, {}
    for split in ("test", "heldout"):
        samples = demo.test_samples(editor.config, args.samples, split)
        regions = None
        if diffedit:
            regions = np.stack(editor.diffedit_regions([Image.fromarray(s["source"]) for s in samples],
                                                       [s["instruction"] for s in samples]))  # fmt: skip
        elif editor.region_head:
            regions = demo.predicted_regions(editor, samples, args.batch_size)
        outputs = demo.edit_samples(editor, samples, **edit, masks=regions, desc=f"{name} {split}")
        scores[split] = demo.score(outputs, samples, regions)
        if split == "test" and regions is not None:
            extra["region"] = scores[split]["region"]
            exact = np.stack([s["mask"] for s in samples])
            outputs = demo.edit_samples(editor, samples, **edit, masks=exact, desc=f"{name} {split}, exact masks")
            extra["exact_mask"] = demo.score(outputs, samples)["overall"]["specific"]
    return {
        "test": scores["test"]["overall"]["specific"], "position/size": position_size(scores["test"]),
        "heldout": scores["heldout"]["overall"]["specific"], "l1_outside": scores["test"]["overall"]["l1_outside"],
        "summaries": scores, **extra,
    }  # fmt: skip


def mean_spread(values) -> str:
    """A table cell: the mean ± half the range over seeds; "–" where no seed has a value (no such scenes)."""
    values = np.array(values, float)
    return "–" if np.isnan(values).all() else f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def write_table(out: str, table: str) -> None:
    """Prints the table and writes it to OUT/table.md."""
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


def markdown(results: dict, args) -> str:
    """The table: one row per variant, mean ± half the range over seeds."""
    lines = [
        f"| row | {' | '.join(COLUMNS)} |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for variant, runs in results.items():
        cells = [mean_spread([column(r) for r in runs]) for column in COLUMNS.values()]
        lines.append(f"| {ROWS[variant]} | {' | '.join(cells)} |")
    lines.append(f"\n{args.steps} steps × batch {args.batch_size}, seeds {args.seeds}, {args.samples} scenes per split, "
                 f"{args.edit_steps} denoising steps, guidance s_I / s_T {args.guidance[0]} / {args.guidance[1]}"
                 + "".join(f", {k} {v}" for k, v in (("kinds", args.kinds), ("max objects", args.max_objects)) if v)
                 + ".")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=demo.STEPS, help=f"training steps per row-seed (the demo's {demo.STEPS})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=128, help="scenes per split")
    parser.add_argument("--edit-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs=2, default=list(demo.GUIDANCE), metavar=("S_I", "S_T"),
                        help=f"image and text guidance of the edits (the demo's {demo.GUIDANCE[0]} {demo.GUIDANCE[1]})")
    parser.add_argument("--variants", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="a sub-task: only these edit kinds (default all)")
    parser.add_argument("--max-objects", type=int,
                        help="a sub-task: at most this many objects per scene (default: configs/shapes.py's)")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--rescore", action="store_true",
                        help="edit and score the finished row-seeds again (other --samples / --edit-steps / --guidance, "
                             "or after a change to the metrics)")
    args = parser.parse_args(argv)
    demo.use_compilation_cache(args.out)
    results = {v: [run_one(v, seed, args) for seed in args.seeds] for v in args.variants}
    write_table(args.out, markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
