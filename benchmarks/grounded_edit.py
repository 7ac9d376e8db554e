"""What finding the region costs: the grounded edit against the plain edit, same checkpoint, one run.

    .venv/bin/python benchmarks/grounded_edit.py [--checkpoint outputs/demo/checkpoint] [--batch 16] [--steps 20]

A checkpoint with a region head (the grounded demo's, `fireedit-jax demo`) edits one batch of
ShapeEdit test scenes three ways, in turn (so load from other processes falls on all):
  plain      the whole image, no region (`--whole-image`)
  grounded   the region head's region (one pass of the region model), then the masked edit
  diffedit   DiffEdit's mask (2 × 10 extra UNet passes per image, diffusion/diffedit.py), then the
             masked edit
Each is the whole edit at --steps (region, encoding, denoising, decoding; every program compiled
before timing); prints the medians and the ratios against the plain edit.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from timing import interleaved

from fireedit_jax import demo
from fireedit_jax.pipeline import Editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/demo/checkpoint")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    editor = Editor.from_pretrained(args.checkpoint)
    if not editor.region_head:
        raise SystemExit(f"{args.checkpoint} has no region head: give a grounded checkpoint (`fireedit-jax demo`)")
    samples = demo.test_samples(editor.config, args.batch)
    pixels, instructions = demo.source_pixels(samples), [s["instruction"] for s in samples]
    scenes = [Image.fromarray(s["source"]) for s in samples]
    edit = dict(steps=args.steps, image_guidance=demo.GUIDANCE[0], text_guidance=demo.GUIDANCE[1])

    def plain():
        editor.edit_arrays(pixels, instructions, **edit).block_until_ready()

    def grounded():
        regions = editor.region_mask_arrays(pixels, instructions, demo.sample_boxes(samples))
        editor.edit_arrays(pixels, instructions, masks=regions.astype(np.float32), **edit).block_until_ready()

    def diffedit():
        regions = np.stack(editor.diffedit_regions(scenes, instructions))
        editor.edit_arrays(pixels, instructions, masks=regions.astype(np.float32), **edit).block_until_ready()

    results = interleaved({"plain": plain, "grounded": grounded, "diffedit": diffedit}, args.repeats, warmup=1)
    print(f"{args.checkpoint}: {args.batch} scenes of {pixels.shape[1]} px, {args.steps} steps, float32, CPU "
          f"({os.cpu_count()} cores), median of {args.repeats} whole edits")  # fmt: skip
    for name, (wall, _, runs) in results.items():
        print(f"  {name:9s} {wall:7.3f} s   {wall / results['plain'][0]:.3f}× plain   "
              f"(runs {', '.join(f'{t:.3f}' for t in runs)})")  # fmt: skip
    print(f"  1-min load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
