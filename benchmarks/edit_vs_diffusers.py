"""Seconds per InstructPix2Pix edit: our jitted loop vs diffusers' pipeline, same model, one run.

    .venv/bin/python benchmarks/edit_vs_diffusers.py [--size 256] [--steps 20] [--repeats 3]
    python benchmarks/edit_vs_diffusers.py --sizes sd15 --size 512 --steps 100   # on a GPU (benchmarks/gpu.sh)

Both sides run the same random IP2P model, converted from the diffusers one: the whole edit
(image encode, text encode, 3-branch guided denoising, decode). --sizes: sd15_shaped (SD1.5's
layout at a quarter of its width, the CPU row), sd15 (SD1.5's own sizes, 860M UNet), tiny
(the test model, for benchmarks/gpu.sh --small). On the CPU both run in float32; on a GPU
torch runs on CUDA in float16 and ours in the Editor's accelerator default, bfloat16 (the same
tensor-core rate on Hopper); --dtype / --torch-dtype change either. The two run in turn (so
load from other processes on a shared CPU falls on both); prints the median wall and CPU
seconds after a warm-up, their ratios, and our one-off compile time. On the CPU torch gets as
many threads as there are cores, as XLA's CPU client does.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from PIL import Image
from timing import interleaved, report

from fireedit_jax import checkpoint
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.pipeline import Editor, load_tokenizer

SIZES = {"sd15_shaped": reference.IP2PSizes.sd15_shaped, "sd15": reference.IP2PSizes.sd15, "tiny": reference.IP2PSizes}
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16),
          "float16": (jnp.float16, torch.float16)}  # fmt: skip


def load_editor(directory: str, dtype: str) -> Editor:
    """Editor.from_pretrained at any of DTYPES' compute dtypes (float16 too, for like-for-like runs)."""
    config = checkpoint.load_config(directory)
    model = EditModel.from_config(config.model, dtype=DTYPES[dtype][0])
    params = checkpoint.load_params(directory, jax.eval_shape(model.init, jax.random.key(0)))
    return Editor(model, params, config, load_tokenizer(checkpoint.tokenizer_dir(directory), model))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=SIZES, default="sd15_shaped")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch's device")
    parser.add_argument("--dtype", choices=DTYPES, help="ours (default: float32 on CPU, bfloat16 on accelerators)")
    parser.add_argument("--torch-dtype", choices=DTYPES, help="torch's (default: float32 on CPU, float16 on CUDA)")
    args = parser.parse_args(argv)
    ours_dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    torch_dtype = args.torch_dtype or ("float32" if args.device == "cpu" else "float16")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    root = tempfile.mkdtemp()  # two copies of the model (diffusers', ours): 7 GB at SD1.5's sizes
    atexit.register(shutil.rmtree, root, True)
    start = time.perf_counter()
    pipeline = reference.save_ip2p(f"{root}/diffusers", SIZES[args.sizes]())
    convert_ip2p(f"{root}/diffusers", f"{root}/ckpt")
    editor = load_editor(f"{root}/ckpt", ours_dtype)
    pipeline = pipeline.to(args.device, DTYPES[torch_dtype][1])
    pipeline.set_progress_bar_config(disable=True)
    setup = time.perf_counter() - start
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    instruction = "make the left cup blue"

    def ours():
        editor.edit_arrays(
            np.asarray(image, np.float32)[None] / 127.5 - 1, [instruction], steps=args.steps
        ).block_until_ready()

    def theirs():
        with torch.no_grad():  # output_type "np" copies the result to the host: the edit has finished
            pipeline(instruction, image=image, num_inference_steps=args.steps, output_type="np")

    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    names = "ours (jitted lax.scan loop)", "diffusers pipeline"
    results = interleaved(dict(zip(names, (ours, theirs))), args.repeats, warmup=1)
    unet = sum(p.numel() for p in pipeline.unet.parameters()) / 1e6
    where = (f"{jax.devices()[0].device_kind}" if jax.default_backend() != "cpu" else "CPU") + (
        f", torch on {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else
        f", {torch.get_num_threads()} torch threads on {os.cpu_count()} cores")  # fmt: skip
    print(f"IP2P edit, {args.sizes} sizes ({unet:.0f}M UNet), {args.size}x{args.size}, {args.steps} steps, "
          f"3 guidance branches, ours {ours_dtype} (jax {jax.__version__}), diffusers {torch_dtype} "
          f"(torch {torch.__version__}), {where}")  # fmt: skip
    report(results, *names)
    print(f"  our one-off compile time     {first - results[names[0]][0]:.1f} s (first call {first:.1f} s); "
          f"models made, converted and loaded in {setup:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
