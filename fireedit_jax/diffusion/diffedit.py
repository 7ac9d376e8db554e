"""DiffEdit's mask (Couairon et al., ICLR 2023): where to edit, from the edit model's own predictions.

Shapes: B images, N noise draws per image, h×w latent size, C latent channels.

No training and no head: the source's latents are noised to the encode timestep (the
`strength` of the way down a DDIM schedule of `steps`, diffusers' `mask_encode_strength`), the
denoiser predicts twice, conditioned on the source and on the target (an instruction model: with
and without the instruction), and where the predictions differ the edit happens:

  map = mean over the N draws and C channels of |pred_target − pred_source|      [B, h, w]
  mask = clip(map, 0, ratio·mean(map)) / (ratio·mean(map)) > 0.5

as diffusers' `StableDiffusionDiffEditPipeline.generate_mask` computes it (with guidance_scale 1,
the instruction model's form; tested against it on a tiny Stable Diffusion). One departure: the
mean that sets the clamp is each image's own, where diffusers takes it over the whole batch, so that
an image's mask does not depend on the images it is batched with (the same for one image).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.diffusion.samplers import DEFAULT_SPACING, inference_timesteps
from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod

STRENGTH, STEPS, REPEATS, RATIO = 0.5, 50, 10, 3.0  # diffusers' defaults


def encode_timestep(schedule: SchedulerConfig, steps: int = STEPS, strength: float = STRENGTH) -> int:
    """The timestep the source is noised to: diffusers' `get_timesteps(steps, strength)[0][0]` of a DDIM
    schedule (the first of the last strength·steps timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"DiffEdit's strength must lie in (0, 1], got {strength}")
    spacing = schedule.timestep_spacing or DEFAULT_SPACING["ddim"]
    timesteps = inference_timesteps(schedule, steps, spacing, integer=True)  # numpy: no trace under jit
    start = max(steps - min(int(steps * strength), steps), 0)
    return int(timesteps[min(start, steps - 1)])


def noised(schedule: SchedulerConfig, latents: jax.Array, noise: jax.Array, t: int) -> jax.Array:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (diffusers' `add_noise`), in float32."""
    abar = np.float32(alphas_cumprod(schedule)[t])
    return np.sqrt(abar) * latents.astype(jnp.float32) + np.sqrt(np.float32(1.0) - abar) * noise.astype(jnp.float32)


def guidance_map_mask(pred_source: jax.Array, pred_target: jax.Array, repeats: int, ratio: float = RATIO) -> jax.Array:
    """Predictions float[B·N, h, w, C] (the N draws of an image adjacent) → the mask float32[B, h, w] in {0, 1}."""
    diff = jnp.abs(pred_target.astype(jnp.float32) - pred_source.astype(jnp.float32))
    guidance_map = diff.reshape(-1, repeats, *diff.shape[1:]).mean(axis=(1, 4))
    clamp = jnp.mean(guidance_map, axis=(1, 2), keepdims=True) * ratio
    scaled = jnp.clip(guidance_map, 0.0, clamp) / jnp.maximum(clamp, 1e-12)
    return (scaled > 0.5).astype(jnp.float32)


def diffedit_mask(predict: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], schedule: SchedulerConfig,
                  latents: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None,
                  steps: int = STEPS, strength: float = STRENGTH, repeats: int = REPEATS,
                  ratio: float = RATIO) -> jax.Array:  # fmt: skip
    """DiffEdit's mask float32[B, h, w] in {0, 1} (module docstring).

    predict(noisy float[B·N, h, w, C], t float[B·N]) → (pred_source, pred_target), the denoiser's
    outputs under the source and the target condition; latents: the sources' scaled latents
    float[B, h, w, C]; key: the N noise draws per image, or noise: float[B·N, h, w, C] (an image's
    draws adjacent).
    """
    t = encode_timestep(schedule, steps, strength)
    repeated = jnp.repeat(latents, repeats, axis=0)
    noise = jax.random.normal(key, repeated.shape, jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)
    pred_source, pred_target = predict(noised(schedule, repeated, noise, t), jnp.full((repeated.shape[0],), t, jnp.float32))
    return guidance_map_mask(pred_source, pred_target, repeats, ratio)


def edit_model_diffedit(model, params, schedule: SchedulerConfig, pixels: jax.Array, text_inputs: tuple,
                        key: jax.Array | None = None, **options) -> jax.Array:  # fmt: skip
    """DiffEdit's mask for an `EditModel` (float32[B, h, w]): its denoiser with and without the
    instruction, the image condition (IP2P: the source) in both; pixels float[B, H, W, 3] in [-1, 1];
    text_inputs as `EditModel.condition` reads them; options: `diffedit_mask`'s (noise, steps, …)."""
    from fireedit_jax.diffusion.edit_loop import stack_branches

    latents = model.encode_image(params, pixels) * model.vae.config.scaling_factor
    cond, _ = model.condition(params, pixels, *text_inputs)
    target, source = model.branches(params, cond)[:2]  # (full, image only) or (full, unconditional)
    image = model.image_condition_latents(params, pixels)
    repeats = options.get("repeats", REPEATS)

    def predict(noisy, t):
        n = noisy.shape[0]
        conds = jax.tree.map(lambda x: jnp.repeat(x, repeats, 0), stack_branches(target, source))
        both = jnp.concatenate([noisy, noisy])
        if image is not None:
            both = jnp.concatenate([both, jnp.concatenate([jnp.repeat(image, repeats, 0)] * 2)], axis=-1)
        out = model.denoise(params, both, jnp.concatenate([t, t]), conds)
        return out[n:], out[:n]

    return diffedit_mask(predict, schedule, latents, key, **options)
