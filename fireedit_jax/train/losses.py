"""Training losses: `make_*_loss(model, config)` → loss_fn(params, batch, keys) → (loss, parts).

Shapes: B batch, H×W pixels, h×w latents, C latent channels, L text tokens, D context width.

`keys` are one PRNG key per example (key[B]), so an example draws the same noise,
timestep and dropout whichever micro-batch or device it lands on: gradient accumulation
and sharding do not change the numbers. `parts` are float32 scalars reported as metrics.

IP2P's L_diff follows diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py:
target latents = a VAE posterior sample · scaling_factor; the image condition = the
source's posterior mode, unscaled (as `EditModel.encode_image`); z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
with t uniform in [0, T); the UNet sees z_t ‖ image latent on channels; MSE against ε (or v for v-prediction).
Condition dropout with one uniform draw r per example (IP2P's rule, DESIGN.md's null
conditions): r < 2p → the text condition becomes params["null_text"]; p ≤ r < 3p → the
image latent (and FireEdit's visual tokens) become zeros; so text-only, image-only and
both are dropped with probability p each.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod
from fireedit_jax.models.fireedit import EditModel, dataclass_from_dict
from fireedit_jax.models.vae import VAE, sample_posterior, scale_latents

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def per_example(keys: jax.Array, n: int) -> list[jax.Array]:
    """key[B] → n independent key[B] streams."""
    split = jax.vmap(lambda k: jax.random.split(k, n))(keys)
    return [split[:, i] for i in range(n)]


def condition_dropout(key: jax.Array, cond: dict, image_latents: jax.Array, null_text: jax.Array, prob: float):
    """IP2P's dropout on a batch: (cond, image_latents) with some examples' conditions nulled.

    cond: {"text": float[B, L, D] (before TATI), optional "visual": float[B, V, D]};
    image_latents: float[B, h, w, C]; null_text: float[L, D]; key: key[B].
    """
    r = jax.vmap(jax.random.uniform)(key)
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob)
    out = dict(cond, text=jnp.where(drop_text[:, None, None], null_text.astype(cond["text"].dtype), cond["text"]))
    if "visual" in cond:
        out["visual"] = jnp.where(drop_image[:, None, None], 0.0, cond["visual"]).astype(cond["visual"].dtype)
    image_latents = jnp.where(drop_image[:, None, None, None], 0.0, image_latents).astype(image_latents.dtype)
    return out, image_latents


def diffusion_loss(
    model: EditModel,
    params,
    latents: jax.Array,
    image_latents: jax.Array,
    cond: dict,
    keys: jax.Array,
    schedule: SchedulerConfig,
) -> jax.Array:
    """L_diff: the denoiser's mean squared error on one random timestep per example (float32 scalar).

    latents: scaled target latents float[B, h, w, C]; image_latents: the (possibly zeroed)
    image condition float[B, h, w, C]; cond: the (possibly nulled) conditions for `model.denoise`.
    """
    k_time, k_noise = per_example(keys, 2)
    abar = jnp.asarray(alphas_cumprod(schedule))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(k_time)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
    a = jnp.sqrt(abar[t])[:, None, None, None]
    s = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
    noisy = a * latents + s * noise
    target = noise if schedule.prediction_type == "epsilon" else a * noise - s * latents
    sample = jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=-1)
    pred = model.denoise(params, sample, t.astype(jnp.float32), cond)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


# The VAE posteriors the IP2P loss needs: the source's mode, unscaled (the image condition),
# and the target's mean and log-variance (a sample is drawn per step).
LATENT_FIELDS = ("source_latents", "target_latents_mean", "target_latents_logvar")


def encode_latents(model: EditModel, params, source: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Pixels float[B, H, W, 3] in [-1, 1] → the `LATENT_FIELDS`, each float32[B, h, w, C].

    One encoder pass over target ‖ source (half the compiled graph of two passes).
    """
    mean, logvar = model.vae.apply({"params": params["vae"]}, jnp.concatenate([target, source]), method=VAE.encode)
    (target_mean, source_mean), (target_logvar, _) = jnp.split(mean, 2), jnp.split(logvar, 2)
    return dict(zip(LATENT_FIELDS, (source_mean, target_mean, target_logvar)))


def make_ip2p_loss(model: EditModel, config) -> LossFn:
    """InstructPix2Pix fine-tuning (UNet on CLIP text states).

    batch: {"source": float[B, H, W, 3] in [-1, 1], "target": float[B, H, W, 3] in [-1, 1],
            "input_ids": int32[B, L]} (H, W multiples of the VAE factor); or, from a latent
            cache (data/latent_cache.py), the `LATENT_FIELDS` in place of "source" and "target".
    """
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    prob = float(config.train.cond_dropout)
    vae_config = model.vae.config

    def loss_fn(params, batch, keys):
        k_posterior, k_drop, k_diffusion = per_example(keys, 3)
        cached = batch if LATENT_FIELDS[0] in batch else encode_latents(model, params, batch["source"], batch["target"])
        image_latents, target_mean, target_logvar = (cached[name] for name in LATENT_FIELDS)
        latents = scale_latents(jax.vmap(sample_posterior)(k_posterior, target_mean, target_logvar), vae_config)
        cond = {"text": model.encode_text(params, batch["input_ids"])}
        cond, image_latents = condition_dropout(k_drop, cond, image_latents, params["null_text"], prob)
        loss = diffusion_loss(model, params, latents, image_latents, cond, k_diffusion, schedule)
        return loss, {"diffusion": loss}

    return loss_fn


LOSSES: dict[str, Callable[[EditModel, object], LossFn]] = {"ip2p": make_ip2p_loss}
