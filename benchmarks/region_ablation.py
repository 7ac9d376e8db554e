"""The paper's Table-4 ablation of learnt edit regions on ShapeEdit (Beyond Editing Pairs).

    .venv/bin/python benchmarks/region_ablation.py --generators outputs/ablation_mask/mask_seed{0,1}/checkpoint \
        --seeds 0 1 --out outputs/region_ablation

Rows (configs/shapes_region.py variants), each seed on its own mask-guided generator (an exported
`mask` checkpoint, e.g. the shapes_ablation.py row-seed of that seed) and its own CLIP stage,
shared by the rows of the seed:
  region   L_sa + L_clip (the method)
  structural  the same with L_clip's structural term weighted 10 (benchmarks/region_landscape.py)
  no_sa    without the semantic alignment loss
  no_clip  without the CLIP losses on the edited image (no edit is made while training)
Columns, per split (test, held-out; --samples scenes each): the predicted region's IoU with the
edit's box (all scenes, and the position/size references), the share of the image it covers, and
specific edit success of the mask-guided edit under the predicted region and under the exact mask.
A re-run reuses the row-seeds whose OUT/<row>_seed<seed>/scores.json exists and resumes training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fireedit_jax import demo
from shapes_ablation import mean_spread, write_table

ROWS = {"region": "L_sa + L_clip", "structural": "L_sa + L_clip, λ_structural 10", "no_sa": "w/o L_sa",
        "no_clip": "w/o L_clip"}  # fmt: skip
COLUMNS = {  # column: how a split's results give it
    "IoU": lambda r: r["iou"], "IoU pos/size": lambda r: r["iou_position_size"], "area": lambda r: r["region_area"],
    "specific (predicted)": lambda r: r["region_edit"]["overall"]["specific"],
    "specific (exact mask)": lambda r: r["exact_mask_edit"]["overall"]["specific"],
}  # fmt: skip


def run_one(variant: str, seed: int, generator: str, args) -> dict:
    from fireedit_jax.pipeline import Editor

    workdir = os.path.join(args.out, f"{variant}_seed{seed}")
    scores = os.path.join(workdir, "scores.json")
    if os.path.exists(scores):
        with open(scores) as f:
            return json.load(f)
    clip_run = os.path.join(args.out, f"clip_seed{seed}")
    if not os.path.isdir(clip_run):
        print(f"CLIP on ShapeEdit's scene captions, seed {seed}, in {clip_run}")
        from fireedit_jax.train.run import train_and_evaluate

        train_and_evaluate(demo.region_config("clip", seed, generator), clip_run, init=generator)
    checkpoint = demo.train_region_model(workdir, generator=generator, variant=variant, seed=seed, clip_run=clip_run)
    editor = Editor.from_pretrained(checkpoint)
    result = demo.evaluate_regions(editor, editor.config, args.samples, steps=args.edit_steps,
                                   batch_size=args.batch_size)  # fmt: skip
    with open(scores, "w") as f:
        json.dump(result, f, indent=1)
    return result


def markdown(results: dict, args) -> str:
    """One row per variant and split, mean ± half the range over seeds."""
    lines = [f"| row | split | {' | '.join(COLUMNS)} |", "|---|---|" + "---|" * len(COLUMNS)]
    for variant, runs in results.items():
        for split in demo.REGION_SPLITS:
            cells = [mean_spread([column(r[split]) for r in runs]) for column in COLUMNS.values()]
            lines.append(f"| {ROWS[variant]} | {split} | {' | '.join(cells)} |")
    lines.append(f"\nseeds {args.seeds}, {args.samples} scenes per split, {args.edit_steps} denoising steps.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", required=True, metavar="CKPT",
                        help="an exported mask-guided checkpoint per seed, in the order of --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["region", "no_sa", "no_clip"], choices=list(ROWS))
    parser.add_argument("--samples", type=int, default=64, help="scenes per split")
    parser.add_argument("--edit-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="scenes per edit batch")
    parser.add_argument("--out", default="outputs/region_ablation")
    args = parser.parse_args(argv)
    if len(args.generators) != len(args.seeds):
        parser.error(f"{len(args.seeds)} seeds need as many --generators, not {len(args.generators)}")
    demo.use_compilation_cache(args.out)
    results = {v: [run_one(v, seed, g, args) for seed, g in zip(args.seeds, args.generators)] for v in args.variants}
    write_table(args.out, markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
