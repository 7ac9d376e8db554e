"""What the learnable-region loss rewards: L_clip of planted masks, and of free logits optimised on it.

    .venv/bin/python benchmarks/region_landscape.py --checkpoint outputs/region_seed0/checkpoint planted
    .venv/bin/python benchmarks/region_landscape.py --checkpoint outputs/region_seed0/checkpoint free --init -1 \
        [--weights '{"lambda_structural": 10}'] [--straight-through]

A trained region checkpoint (its frozen generator and CLIP) scores ShapeEdit training scenes'
caption records (the loss's own batches) with the region predictor bypassed:
  planted  the loss's parts, averaged over 3 noise draws, with the mask set to the edit's exact
           mask, it dilated by 2 pixels, the background, every object, nothing and everything
  free     per-scene patch logits (the predictor's output grid) optimised with Adam on the loss
           directly, from --init: does the loss's gradient through the soft region find the
           exact mask when nothing has to be learnt across scenes? Prints the thresholded
           region's IoU with the exact mask and the mean probability inside / outside it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.ndimage import binary_dilation

from fireedit_jax.data import shapes
from fireedit_jax.data.shapes import ShapeEditSource, ShapesConfig
from fireedit_jax.pipeline import Editor
from fireedit_jax.train import inputs, losses
from fireedit_jax.train.flops import loss_inputs

OBJECT_CONTRAST = 60  # an object's pixels: channel range above this (the backgrounds are pale tints)


def setup(args):
    """(loss(mask_fn, key) → parts, scenes' exact masks bool[N, S, S], their object masks, the region model)."""
    editor = Editor.from_pretrained(args.checkpoint)
    config, model, params = editor.config, editor.model, editor.params
    config.train.region_weights = {**(config.train.get("region_weights") or {}), **json.loads(args.weights)}
    transform = inputs.make_transform(config, model, shapes.build_tokenizer())
    size = config.model.learnable_region.clip_vision.image_size
    records = inputs.ShapeEditRecords("shapes", view="captions", size=size)
    scenes = ShapeEditSource("train", 10_000, ShapesConfig(size=size))
    index = range(args.first, args.first + args.scenes)
    batch = inputs.model_batch(transform.collate([transform(records[i])[0] for i in index]), loss_inputs(config))
    exact = np.stack([scenes[i]["mask"] for i in index]) > 0
    objects = np.stack([np.ptp(scenes[i]["source"].astype(int), -1) > OBJECT_CONTRAST for i in index])
    region = model.region
    predicted_mask = region.pixel_mask
    loss_fn = losses.LOSSES["learnable_region"](model, config)

    def loss(mask_fn, key):
        """The loss's parts with the region's mask made by mask_fn(height, width) → float[B, H, W, 1]."""
        object.__setattr__(region, "pixel_mask", lambda logits, h, w: mask_fn(h, w))
        try:
            return loss_fn(params, batch, jax.random.split(key, args.scenes))[1]
        finally:
            object.__setattr__(region, "pixel_mask", predicted_mask)

    return loss, exact, objects, region, predicted_mask


def planted(args) -> None:
    loss, exact, objects, _, _ = setup(args)
    masks = {"exact": exact, "exact, dilated 2 px": np.stack([binary_dilation(m, iterations=2) for m in exact]),
             "background": ~objects, "every object": objects, "nothing": np.zeros_like(exact),
             "everything": np.ones_like(exact)}  # fmt: skip
    print(f"{args.scenes} training scenes, mean over 3 noise draws; L_clip = guidance + directional + structural (weighted)")
    evaluate = jax.jit(lambda mask, key: loss(lambda h, w: mask, key))  # one program for every mask
    for name, mask in masks.items():
        fixed = jnp.asarray(mask, jnp.float32)[..., None]
        parts = [evaluate(fixed, jax.random.key(seed)) for seed in range(3)]
        mean = {k: float(np.mean([p[k] for p in parts])) for k in ("clip", "clip_guidance", "directional", "structural")}
        print(f"  {name:20s} area {mask.mean():.3f}   " + "   ".join(f"{k} {v:.3f}" for k, v in mean.items()))


def free(args) -> None:
    loss, exact, _, region, predicted_mask = setup(args)

    def soft_mask(logits, h, w):
        soft = predicted_mask(logits, h, w)
        if args.straight_through:  # the thresholded region forward, the sigmoid's gradient backward
            return soft + jax.lax.stop_gradient((soft > region.threshold).astype(soft.dtype) - soft)
        return soft

    def objective(logits, key):
        parts = loss(lambda h, w: soft_mask(logits, h, w), key)
        return parts["clip"], parts

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    logits = jnp.full((args.scenes, region.grid**2), args.init)
    optimizer = optax.adam(args.learning_rate)
    state, start = optimizer.init(logits), time.time()
    for i in range(args.steps):
        (value, _), grads = step(logits, jax.random.key(i))
        updates, state = optimizer.update(grads, state)
        logits = optax.apply_updates(logits, updates)
        if i % 10 == 0 or i == args.steps - 1:
            probability = np.asarray(predicted_mask(logits, *exact.shape[1:]))[..., 0]
            hard = probability > region.threshold
            iou = np.mean((hard & exact).sum((1, 2)) / np.maximum((hard | exact).sum((1, 2)), 1))
            print(f"step {i:3d}  L_clip {float(value):.3f}  area {hard.mean():.3f}  IoU {iou:.3f}  "
                  f"p inside {probability[exact].mean():.3f}  outside {probability[~exact].mean():.3f}  "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an exported learnable-region checkpoint")
    parser.add_argument("mode", choices=["planted", "free"])
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--first", type=int, default=0, help="the first training scene")
    parser.add_argument("--weights", default="{}", help="train.region_weights overrides, JSON")
    parser.add_argument("--steps", type=int, default=50, help="free: Adam steps")
    parser.add_argument("--init", type=float, default=0.0, help="free: the logits' initial value")
    parser.add_argument("--learning-rate", type=float, default=0.2)
    parser.add_argument("--straight-through", action="store_true", help="free: hard mask forward")
    args = parser.parse_args()
    (planted if args.mode == "planted" else free)(args)


if __name__ == "__main__":
    main()
