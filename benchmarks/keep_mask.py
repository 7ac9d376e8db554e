"""Where does a source-blend ShapeEdit checkpoint decide to edit? The keep mask, teacher-forced.

    .venv/bin/python benchmarks/keep_mask.py --checkpoint outputs/demo/checkpoint [--samples 64] [--no-instruction]

For the first --samples test scenes, the target latent is noised at each of --timesteps and
given to the denoiser with the source latent and the full condition, as in training. Per edit
kind it prints the mean keep mask m (x0 = m·source + (1 − m)·content, configs/shapes.py's
source_blend) on the latent cells the edit changes and on all other cells, and the content's
L1 to the target on the changed cells beside the source's. A keep near 1 on the changed cells
at large t means the model copies the source where it should edit: the sampler's first
steps, which fix the layout, see only noise there. --no-instruction: the null text in place
of the instruction (the guidance's image-only branch): how much of the mask the instruction sets.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax import demo
from fireedit_jax.data.shapes import KINDS
from fireedit_jax.diffusion.schedules import alphas_cumprod
from fireedit_jax.models.fireedit import blend_parts, encode_latents
from fireedit_jax.models.vae import scale_latents
from fireedit_jax.pipeline import Editor


def keep_on_edits(editor: Editor, samples: list[dict], timesteps, *, instruction: bool = True, seed: int = 0) -> dict:
    """{t: {kind: (edits, keep on changed cells, keep elsewhere, content L1 there, source L1 there)}}."""
    model, params = editor.model, editor.params
    pixels = lambda key: jnp.asarray(np.stack([s[key] for s in samples]), jnp.float32) / 127.5 - 1.0  # noqa: E731
    source_pixels = pixels("source")
    latents = encode_latents(model, params, source_pixels, pixels("target"))  # as training encodes them
    source = latents["source_latents"]  # the image condition, unscaled
    target = scale_latents(latents["target_latents_mean"], model.vae.config)
    boxes = [s["boxes"] for s in samples]
    cond, _ = model.condition(params, source_pixels, *editor.text_inputs([s["instruction"] for s in samples], boxes))
    if not instruction:
        image_only = model.branches(params, cond)[1]
        cond = {**image_only, "text": jnp.broadcast_to(image_only["text"], cond["text"].shape)}
    source_l1 = np.abs(np.asarray(scale_latents(source, model.vae.config) - target)).mean(-1)
    changed = source_l1 > 1e-3  # bool[B, h, w]
    kinds = np.array([s["kind"] for s in samples])
    abar = alphas_cumprod(editor.scheduler_config)
    parts = jax.jit(lambda x, t: blend_parts(model.unet_output(params, x, t, cond)))
    result = {}
    for t in timesteps:
        noise = jax.random.normal(jax.random.PRNGKey(seed + t), target.shape)
        noisy = np.sqrt(abar[t]) * target + np.sqrt(1.0 - abar[t]) * noise
        content, keep = parts(jnp.concatenate([noisy, source], -1), jnp.full(len(samples), float(t)))
        keep, content_l1 = np.asarray(keep).mean(-1), np.abs(np.asarray(content - target)).mean(-1)
        result[t] = {}
        for kind in KINDS:
            pick = kinds == kind
            on, off = changed & pick[:, None, None], ~changed & pick[:, None, None]
            if on.any():
                result[t][kind] = (int(pick.sum()), keep[on].mean(), keep[off].mean(), content_l1[on].mean(),
                                   source_l1[on].mean())  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a ShapeEdit FireEdit checkpoint with source_blend")
    parser.add_argument("--samples", type=int, default=64, help="test scenes")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 500, 900])
    parser.add_argument("--no-instruction", action="store_true", help="the null text in place of the instruction")
    args = parser.parse_args(argv)
    editor = Editor.from_pretrained(args.checkpoint)
    if not editor.model.source_blend:
        parser.error(f"{args.checkpoint} predicts x0 directly (model.source_blend off): it has no keep mask")
    samples = demo.test_samples(editor.config, args.samples)
    print(f"{'t':>4s} {'kind':7s} {'edits':>5s} {'keep on changed':>15s} {'keep elsewhere':>14s} "
          f"{'content L1':>10s} {'source L1':>9s}  (on the changed latent cells)")
    for t, rows in keep_on_edits(editor, samples, args.timesteps, instruction=not args.no_instruction).items():
        for kind, (edits, on, off, content, source) in rows.items():
            print(f"{t:4d} {kind:7s} {edits:5d} {on:15.3f} {off:14.3f} {content:10.3f} {source:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
