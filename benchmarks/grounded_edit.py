"""What finding the region costs: the grounded edit against the plain edit, same checkpoint, one run.

    .venv/bin/python benchmarks/grounded_edit.py [--checkpoint outputs/demo/checkpoint] [--batch 16] [--steps 20]
    python benchmarks/grounded_edit.py --random configs/shapes_grounded.py   # no checkpoint (benchmarks/gpu.sh)

A checkpoint with a region head (the grounded demo's, `fireedit-jax demo`; or, with --random CONFIG,
that config's model with random weights: the same programs and the same cost, so a machine without
a trained checkpoint can time it) edits one batch of ShapeEdit test scenes three ways, in turn (so
load from other processes falls on all):
  plain      the whole image, no region (`--whole-image`)
  grounded   the region head's region (one pass of the region model), then the masked edit
  diffedit   DiffEdit's mask (2 × 10 extra UNet passes per image, diffusion/diffedit.py), then the
             masked edit
Each is the whole edit at --steps (region, encoding, denoising, decoding; every program compiled
before timing); prints the medians and the ratios against the plain edit. The Editor's compute
dtype is its default: float32 on the CPU, bfloat16 on an accelerator.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
from PIL import Image
from timing import interleaved

from fireedit_jax import demo
from fireedit_jax.pipeline import Editor


def random_checkpoint(config_file: str, directory: str) -> str:
    """`config_file`'s model with random weights (`EditModel.draw_params`: compiling the model's own init
    costs XLA:CPU about as much as all the edit programs here together), an inference checkpoint in
    `directory`."""
    from fireedit_jax import checkpoint
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train.inputs import make_tokenizer
    from fireedit_jax.train.run import load_config

    config = load_config(config_file)
    model = EditModel.from_config(config.model)
    params = model.draw_params()
    make_tokenizer(config.data.tokenizer).save_pretrained(os.path.join(directory, "tokenizer"))
    checkpoint.save(os.path.join(directory, "ckpt"), params, config, tokenizer_dir=os.path.join(directory, "tokenizer"))
    return os.path.join(directory, "ckpt")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/demo/checkpoint")
    parser.add_argument("--random", metavar="CONFIG", help="time this config's model with random weights instead")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if args.random:
        scratch = tempfile.mkdtemp()
        atexit.register(shutil.rmtree, scratch, True)
        args.checkpoint = random_checkpoint(args.random, scratch)
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
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # Editor.from_pretrained's default
    where = f"CPU ({os.cpu_count()} cores)" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    print(f"{args.random + ' (random weights)' if args.random else args.checkpoint}: {args.batch} scenes of "
          f"{pixels.shape[1]} px, {args.steps} steps, {dtype}, "
          f"{where}, median of {args.repeats} whole edits")  # fmt: skip
    for name, (wall, _, runs) in results.items():
        print(f"  {name:9s} {wall:7.3f} s   {wall / results['plain'][0]:.3f}× plain   "
              f"(runs {', '.join(f'{t:.3f}' for t in runs)})")  # fmt: skip
    print(f"  1-min load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
