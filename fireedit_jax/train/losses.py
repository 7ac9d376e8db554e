"""Training losses: `make_*_loss(model, config)` → loss_fn(params, batch, keys) → (loss, parts).

Shapes: B batch, H×W pixels, h×w latents, C latent channels, L text tokens, D context width.

`keys` are one PRNG key per example (key[B]), so an example draws the same noise,
timestep and condition dropout whichever micro-batch or device it lands on: gradient
accumulation and sharding do not change the numbers (the networks' own dropout, FireEdit's
LoRA and Q-Former dropout with `train.dropout`, is drawn per micro-batch). `parts` are
float32 scalars reported as metrics.

IP2P's L_diff follows diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py:
target latents = a VAE posterior sample · scaling_factor; the image condition = the
source's posterior mode, unscaled (as `EditModel.encode_image`); z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
with t uniform in [0, T); the UNet sees z_t ‖ image latent on channels; MSE against ε (or v for v-prediction).
Condition dropout with one uniform draw r per example (IP2P's rule, DESIGN.md's null
conditions): r < 2p → the text condition becomes params["null_text"]; p ≤ r < 3p → the
image latent (and FireEdit's visual tokens) become zeros; so text-only, image-only and
both are dropped with probability p each.

FireEdit (`make_fireedit_loss`, by `config.stage`, default 3):
  stages 2, 3  L = w·L_VLM + L_diff (w = train.vlm_weight, the paper's 1; the ShapeEdit demo's
               0: see configs/shapes.py): L_VLM the VLM's next-token NLL of its reply (the [IMG]
               tokens, or a VQA answer), L_diff as IP2P's with the conditions of
               `EditModel.condition` (Q-Former → TATI, HVCA's visual tokens). Per-example
               weights from the record's task (data/records.py LOSS_WEIGHTS): a VQA
               sample has diffusion_weight 0 and trains L_VLM only.
  stage 1      L = L_VLM + L_align: the VLM reads a caption (no image), L_align the MSE
               between the Q-Former output and the frozen CLIP text encoder's last states
               of that caption (DESIGN.md; SmartEdit's alignment stage).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod
from fireedit_jax.models.fireedit import EditModel, dataclass_from_dict
from fireedit_jax.models.vae import VAE, sample_posterior, scale_latents
from fireedit_jax.models.vlm import vlm_loss

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
    weights: jax.Array | None = None,
) -> jax.Array:
    """L_diff: the denoiser's mean squared error on one random timestep per example (float32 scalar).

    latents: scaled target latents float[B, h, w, C]; image_latents: the (possibly zeroed)
    image condition float[B, h, w, C]; cond: the (possibly nulled) conditions for `model.denoise`;
    weights: float[B] per-example weights of the mean (None: equal).
    """
    k_time, k_noise = per_example(keys, 2)
    abar = jnp.asarray(alphas_cumprod(schedule))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(k_time)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
    a = jnp.sqrt(abar[t])[:, None, None, None]
    s = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
    noisy = a * latents + s * noise
    target = {"epsilon": noise, "v_prediction": a * noise - s * latents, "sample": latents}[schedule.prediction_type]
    sample = jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=-1)
    pred = model.denoise(params, sample, t.astype(jnp.float32), cond)
    return weighted_mean(jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3)), weights)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """float[B] → Σ w·v / Σ w (0 when every weight is 0), the plain mean without weights."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(jnp.float32)
    return jnp.sum(jnp.where(weights > 0, values, 0.0) * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


# The VAE posteriors the IP2P loss needs: the source's mode, unscaled (the image condition),
# and the target's mean and log-variance (a sample is drawn per step).
LATENT_FIELDS = ("source_latents", "target_latents_mean", "target_latents_logvar")


def uses_latent_cache(config) -> bool:
    """Whether the training data are latent caches (every config.data.sources entry of kind
    "latents", train/inputs.py): the batches then carry `LATENT_FIELDS` instead of pixels."""
    specs = (config.get("data") or {}).get("sources") or {}
    return bool(specs) and all(spec.get("kind") == "latents" for spec in specs.values())


def encode_latents(model: EditModel, params, source: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Pixels float[B, H, W, 3] in [-1, 1] → the `LATENT_FIELDS`, each float32[B, h, w, C].

    One encoder pass over target ‖ source (half the compiled graph of two passes).
    """
    mean, logvar = model.vae.apply({"params": params["vae"]}, jnp.concatenate([target, source]), method=VAE.encode)
    (target_mean, source_mean), (target_logvar, _) = jnp.split(mean, 2), jnp.split(logvar, 2)
    return dict(zip(LATENT_FIELDS, (source_mean, target_mean, target_logvar)))


def edit_latents(model: EditModel, params, batch, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scaled target latents float[B, h, w, C], a posterior sample; the image condition
    float[B, h, w, C]) from the batch's pixels, or from its `LATENT_FIELDS` (a latent cache)."""
    cached = batch if LATENT_FIELDS[0] in batch else encode_latents(model, params, batch["source"], batch["target"])
    image_latents, target_mean, target_logvar = (cached[name] for name in LATENT_FIELDS)
    latents = scale_latents(jax.vmap(sample_posterior)(keys, target_mean, target_logvar), model.vae.config)
    return latents, image_latents


def make_ip2p_loss(model: EditModel, config) -> LossFn:
    """InstructPix2Pix fine-tuning (UNet on CLIP text states).

    batch: {"source": float[B, H, W, 3] in [-1, 1], "target": float[B, H, W, 3] in [-1, 1],
            "input_ids": int32[B, L]} (H, W multiples of the VAE factor); or, from a latent
            cache (data/latent_cache.py), the `LATENT_FIELDS` in place of "source" and "target".
    """
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    prob = float(config.train.cond_dropout)

    def loss_fn(params, batch, keys):
        k_posterior, k_drop, k_diffusion = per_example(keys, 3)
        latents, image_latents = edit_latents(model, params, batch, k_posterior)
        cond = {"text": model.encode_text(params, batch["input_ids"])}
        cond, image_latents = condition_dropout(k_drop, cond, image_latents, params["null_text"], prob)
        loss = diffusion_loss(model, params, latents, image_latents, cond, k_diffusion, schedule)
        return loss, {"diffusion": loss}

    return loss_fn


# The batch entries FireEdit's loss reads, by stage (data/transforms.py builds them):
#   vlm_input_ids int32[B, T], vlm_attention_mask bool[B, T], vlm_target_mask bool[B, T]
#     (VLMTemplate: T a length bucket), vlm_weight float32[B]
#   stage 1: clip_ids int32[B, 77] (the caption for the CLIP text encoder)
#   stages 2, 3: source, target float[B, H, W, 3] in [-1, 1], boxes float32[B, R, 4],
#     box_mask bool[B, R] (R a box bucket), diffusion_weight float32[B]
VLM_INPUTS = ("vlm_input_ids", "vlm_attention_mask", "vlm_target_mask", "vlm_weight")
FIREEDIT_INPUTS = {
    1: VLM_INPUTS + ("clip_ids",),
    2: VLM_INPUTS + ("source", "target", "boxes", "box_mask", "diffusion_weight"),
    3: VLM_INPUTS + ("source", "target", "boxes", "box_mask", "diffusion_weight"),
}


def fireedit_stage(config) -> int:
    """config.stage (1, 2 or 3; 3 when the config has none)."""
    stage = int(config.get("stage", 3))
    if stage not in FIREEDIT_INPUTS:
        raise ValueError(f"config.stage={stage}: FireEdit trains in stages {sorted(FIREEDIT_INPUTS)}")
    return stage


def make_fireedit_loss(model: EditModel, config) -> LossFn:
    """FireEdit's loss for `config.stage` (module docstring); the batch: FIREEDIT_INPUTS[stage]."""
    if model.conditioner != "vlm":
        raise ValueError(f"the fireedit loss needs config.model.conditioner='vlm', not {model.conditioner!r}")
    if fireedit_stage(config) == 1:
        return _alignment_loss(model, bool(config.train.get("dropout", True)))
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    prob = float(config.train.cond_dropout)
    dropout = bool(config.train.get("dropout", True))
    vlm_weight = float(config.train.get("vlm_weight", 1.0))

    def loss_fn(params, batch, keys):
        k_posterior, k_drop, k_diffusion, k_dropout = per_example(keys, 4)
        latents, image_latents = edit_latents(model, params, batch, k_posterior)
        input_ids = batch["vlm_input_ids"]
        cond, vlm_out = model.condition(params, batch["source"], (input_ids, batch["vlm_attention_mask"]), batch["boxes"],
                                        batch["box_mask"], dropout_key=_dropout_key(k_dropout, dropout))  # fmt: skip
        l_vlm = vlm_loss(vlm_out.logits, input_ids, batch["vlm_target_mask"], batch["vlm_weight"])
        cond, image_latents = condition_dropout(k_drop, cond, image_latents, params["null_text"], prob)
        l_diff = diffusion_loss(model, params, latents, image_latents, cond, k_diffusion, schedule,
                                batch["diffusion_weight"])  # fmt: skip
        return vlm_weight * l_vlm + l_diff, {"vlm": l_vlm, "diffusion": l_diff}

    return loss_fn


def _dropout_key(keys: jax.Array, enabled: bool):
    """The networks' dropout key for a (micro-)batch, from its first example's key (None: off).

    Dropout masks are drawn for the whole batch from one key (flax's way), so unlike the
    other draws they depend on how the batch is split into micro-batches.
    """
    return keys[0] if enabled else None


def _alignment_loss(model: EditModel, dropout: bool) -> LossFn:
    """Stage 1: L_VLM + MSE(Q-Former(e), CLIP text states) on text-only VLM sequences."""
    if model.text_encoder is None:
        raise ValueError("FireEdit's stage 1 aligns the Q-Former with the CLIP text encoder: "
                         "config.model.text_encoder is needed (the IP2P checkpoint's text encoder)")  # fmt: skip

    def loss_fn(params, batch, keys):
        input_ids = batch["vlm_input_ids"]
        cond, vlm_out = model.condition(params, None, (input_ids, batch["vlm_attention_mask"]),
                                        dropout_key=_dropout_key(keys, dropout))  # fmt: skip
        target = model.encode_text(params, batch["clip_ids"])
        l_align = jnp.mean(jnp.square(cond["text"].astype(jnp.float32) - target.astype(jnp.float32)))
        l_vlm = vlm_loss(vlm_out.logits, input_ids, batch["vlm_target_mask"], batch["vlm_weight"])
        return l_vlm + l_align, {"vlm": l_vlm, "align": l_align}

    return loss_fn


LOSSES: dict[str, Callable[[EditModel, object], LossFn]] = {"ip2p": make_ip2p_loss, "fireedit": make_fireedit_loss}
