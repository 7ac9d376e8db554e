"""Seconds per denoising step of a mask-guided edit against the plain edit, same checkpoint, one run.

    .venv/bin/python benchmarks/masked_edit.py [--size 256] [--steps 20] [--repeats 3]

The random SD1.5-shaped (quarter-width) InstructPix2Pix model, converted from diffusers, edits
one image in float32 on the CPU three ways, in turn (so load from other processes falls on all):
  plain          no mask
  masked         a box mask: masked sampling (the source outside the mask at every step)
  mask encoder   the same UNet with gated injection and a mask encoder (gates opened): the
                 mask's tokens enter every transformer block through a gated cross-attention
                 (injection_layer "cross", configs/shapes_mask.py's default)
  GLIGEN layer   the same through GLIGEN's gated self-attention + feed-forward ("self")
Each edit is timed at --steps and at 2 × --steps; the difference over --steps is the per-step time
(what encoding, conditioning and decoding cost once drops out). Prints the medians and the ratios
against the plain edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import flax
import jax
import numpy as np

from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.mask_encoder import MaskEncoderConfig
from fireedit_jax.pipeline import Editor
from timing import interleaved


def with_mask_encoder(editor: Editor, layer: str) -> Editor:
    """The editor's checkpoint with gated injection through `layer` and a mask encoder (fresh, gates at 0.5)."""
    config = editor.config.copy_and_resolve_references()
    config.model.unet.gated_injection, config.model.unet.injection_layer = True, layer
    config.model.mask_encoder = dataclasses.asdict(
        MaskEncoderConfig(channels=(32, 64, 128, 128), out_dim=config.model.unet.cross_attention_dim)
    )
    model = EditModel.from_config(config.model)
    fresh = flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0)))
    flat = {**flax.traverse_util.flatten_dict(fresh), **flax.traverse_util.flatten_dict(editor.params)}
    flat = {k: (v + 0.5 if k[-1].startswith("alpha") else v) for k, v in flat.items()}
    return Editor(model, flax.traverse_util.unflatten_dict(flat), config, editor.tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = tempfile.mkdtemp()
    reference.save_ip2p(f"{root}/diffusers", reference.IP2PSizes.sd15_shaped())
    convert_ip2p(f"{root}/diffusers", f"{root}/ckpt")
    plain = Editor.from_pretrained(f"{root}/ckpt")
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32)
    mask = np.zeros((1, args.size, args.size), np.float32)
    mask[:, args.size // 4 : args.size // 2, args.size // 8 : 3 * args.size // 4] = 1.0
    instruction = ["make the left cup blue"]

    def run(editor, masks, steps):
        return lambda: editor.edit_arrays(pixels, instruction, masks=masks, steps=steps).block_until_ready()

    contenders = {"plain": (plain, None), "masked": (plain, mask),
                  "mask encoder": (with_mask_encoder(plain, "cross"), mask),
                  "GLIGEN layer": (with_mask_encoder(plain, "self"), mask)}  # fmt: skip
    fns = {f"{name} {s}": run(editor, masks, s) for name, (editor, masks) in contenders.items()
           for s in (args.steps, 2 * args.steps)}  # fmt: skip
    results = interleaved(fns, args.repeats, warmup=1)
    print(f"SD1.5-shaped IP2P (quarter width), {args.size}×{args.size}, float32, CPU ({os.cpu_count()} cores), "
          f"median of {args.repeats}; per step = (t({2 * args.steps}) − t({args.steps})) / {args.steps}")  # fmt: skip
    per_step = {name: (results[f"{name} {2 * args.steps}"][0] - results[f"{name} {args.steps}"][0]) / args.steps
                for name in contenders}  # fmt: skip
    for name, seconds in per_step.items():
        print(f"  {name:14s} {seconds * 1e3:8.1f} ms per step   {seconds / per_step['plain']:.3f}× plain   "
              f"(whole edit at {args.steps} steps: {results[f'{name} {args.steps}'][0]:.2f} s)")
    print(f"  1-min load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
