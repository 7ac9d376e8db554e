"""Does a FireEdit checkpoint's condition still depend on the instruction? A collapse check.

    .venv/bin/python benchmarks/condition_spread.py --checkpoint outputs/demo/checkpoint [--untrained]

One ShapeEdit test scene (32 px, as configs/shapes.py) and six instructions about its first
object (remove, delete, three colours, a shape). For each stage of the condition — the
VLM's [IMG] states e, the Q-Former output, TATI's output at t = 999 / 500 / 50 and HVCA's
visual tokens — prints the std across the instructions (mean over tokens and channels)
beside the std across tokens. A first number near 0 means the UNet is given the same
condition whatever the instruction says, and can learn no edit from it (configs/shapes.py
says how a tiny model trained from scratch got there). --untrained: the checkpoint
config's freshly initialised params instead of the trained ones.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from fireedit_jax import demo
from fireedit_jax.data.shapes import COLOURS, SHAPES
from fireedit_jax.pipeline import Editor


def instructions(obj: dict) -> list[str]:
    noun = f"{obj['colour']} {obj['shape']}"
    colours = [c for c in COLOURS if c != obj["colour"]][:3]
    shape = next(s for s in SHAPES if s != obj["shape"])
    return [f"remove the {noun}", f"delete the {noun}", *(f"make the {noun} {c}" for c in colours),
            f"turn the {noun} into a {shape}"]  # fmt: skip


def spreads(editor: Editor, scene: dict) -> dict[str, tuple[float, float]]:
    """{stage: (std across instructions, std across tokens)} for `scene`'s first object."""
    texts = instructions(scene["objects"][0])
    pixels = jnp.asarray(np.stack([scene["source"]] * len(texts)), jnp.float32) / 127.5 - 1.0
    text_inputs, boxes, box_mask = editor.text_inputs(texts, [scene["boxes"]] * len(texts))
    model, params = editor.model, editor.params
    cond, vlm_out = model.condition(params, pixels, text_inputs, boxes, box_mask)
    stages = {"[IMG] states e": vlm_out.e, "Q-Former": cond["text"]}
    if model.tati is not None:
        for t in (999.0, 500.0, 50.0):
            stages[f"TATI t={t:.0f}"] = model.tati.apply({"params": params["tati"]}, cond["text"], jnp.full(len(texts), t))
    if "visual" in cond:
        stages["HVCA visual"] = cond["visual"]
    return {name: (float(np.std(x, axis=0).mean()), float(np.std(x, axis=1).mean())) for name, x in stages.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a ShapeEdit FireEdit checkpoint (fireedit-jax demo's)")
    parser.add_argument("--untrained", action="store_true", help="the config's initial params instead")
    parser.add_argument("--scene", type=int, default=0, help="test-split index of the scene")
    args = parser.parse_args(argv)
    editor = Editor.from_pretrained(args.checkpoint)
    if editor.model.conditioner != "vlm":
        parser.error(f"{args.checkpoint} is a {editor.model.conditioner!r} model; this checks FireEdit's VLM condition")
    if args.untrained:
        editor.params = demo.untrained_params(editor.config)
    scene = demo.test_samples(editor.config, args.scene + 1)[args.scene]
    print(f"{'condition':16s} {'across instructions':>20s} {'across tokens':>14s}")
    for name, (across, tokens) in spreads(editor, scene).items():
        print(f"{name:16s} {across:20.4f} {tokens:14.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
