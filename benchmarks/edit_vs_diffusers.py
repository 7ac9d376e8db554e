"""Seconds per InstructPix2Pix edit: our jitted loop vs diffusers' pipeline, same model, one run.

    .venv/bin/python benchmarks/edit_vs_diffusers.py [--size 256] [--steps 20] [--repeats 3]

Both sides run the same random SD1.5-shaped (quarter-width) IP2P model, converted from
the diffusers one, in float32 on the CPU: the whole edit (image encode, text encode,
3-branch guided denoising, decode). The two run in turn (so load from other processes
on a shared CPU falls on both); prints the median wall and CPU seconds after a warm-up,
their ratios, and our one-off compile time. torch gets as many threads as there are
cores, as XLA's CPU client does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.pipeline import Editor
from timing import interleaved, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    root = tempfile.mkdtemp()
    pipeline = reference.save_ip2p(f"{root}/diffusers", reference.IP2PSizes.sd15_shaped())
    convert_ip2p(f"{root}/diffusers", f"{root}/ckpt")
    editor = Editor.from_pretrained(f"{root}/ckpt")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    instruction = "make the left cup blue"
    pipeline.set_progress_bar_config(disable=True)

    def ours():
        editor.edit_arrays(
            np.asarray(image, np.float32)[None] / 127.5 - 1, [instruction], steps=args.steps
        ).block_until_ready()

    def theirs():
        with torch.no_grad():
            pipeline(instruction, image=image, num_inference_steps=args.steps, output_type="np")

    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    names = "ours (jitted lax.scan loop)", "diffusers pipeline"
    results = interleaved(dict(zip(names, (ours, theirs))), args.repeats, warmup=1)
    print(f"IP2P edit, {args.size}x{args.size}, {args.steps} steps, 3 guidance branches, float32, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores")  # fmt: skip
    report(results, *names)
    print(f"  our one-off compile time     {first - results[names[0]][0]:.1f} s (first call {first:.1f} s)")


if __name__ == "__main__":
    main()
