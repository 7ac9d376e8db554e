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

Mask-guided editing (`mask_edit`, PromptEditDiff) trains on quads (source, mask, instruction,
target): the IP2P or FireEdit loss, by the model's conditioner, with the batch's `mask`
float[B, H, W, 1] (1 = edit) turned into the latent mask m (`EditModel.latent_mask`), read by the
mask encoder (grounding tokens, never dropped: the mask says where, not what) or, for an
inpainting UNet, into its mask ‖ masked-image channels; L_diff weighted per latent cell by
m + w_out·(1 − m) (w_out = train.mask_outside_weight): the denoising loss on the edit region
and, weighted down, the reconstruction of the rest, which masked sampling replaces anyway.

Learnt edit regions (Beyond Editing Pairs; `learnable_region`) train on caption records (source,
its caption c_src, an instruction, the target caption c_tgt: never a target image), the model's
`region` part (models/learnable_region.py) predicting where to edit, everything else frozen:
L = λ_sa·L_sa + λ_clip·L_clip (train/region_losses.py). L_clip judges the edited image I': the
model's own mask-guided edit under the *soft* predicted region (masked sampling blends with the
probabilities, the mask encoder reads them), `train.region_edit_steps` denoising steps of the
model's sampler, each rematerialised in the backward pass, so that the CLIP losses reach the
predictor through the blend. With λ_clip = 0 (the paper's "w/o L_clip") no edit is made.
`clip_contrastive` trains the region's CLIP towers on (image, caption) pairs (where no
pretrained CLIP exists, as on ShapeEdit): CLIP's symmetric InfoNCE at a fixed temperature.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.diffusion.edit_loop import edit_inputs, sample_edit
from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod
from fireedit_jax.models.fireedit import LATENT_FIELDS, EditModel, encode_latents
from fireedit_jax.models.region_predictor import box_pixels
from fireedit_jax.models.vae import sample_posterior, scale_latents
from fireedit_jax.models.vlm import vlm_loss
from fireedit_jax.train import region_losses, region_supervision

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def per_example(keys: jax.Array, n: int) -> list[jax.Array]:
    """key[B] → n independent key[B] streams."""
    split = jax.vmap(lambda k: jax.random.split(k, n))(keys)
    return [split[:, i] for i in range(n)]


def condition_dropout(key: jax.Array, cond: dict, image_latents: jax.Array | None, null_text: jax.Array, prob: float,
                      *, image: bool = True):  # fmt: skip
    """IP2P's dropout on a batch: (cond, image_latents) with some examples' conditions nulled.

    cond: {"text": float[B, L, D] (before TATI), optional "visual": float[B, V, D], optional
    "grounding" (never dropped)}; image_latents: float[B, h, w, C] or None; null_text: float[L, D];
    key: key[B]. image: False for a UNet guided by text alone (SD inpainting): only the text drops.
    """
    r = jax.vmap(jax.random.uniform)(key)
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob) & image
    out = dict(cond, text=jnp.where(drop_text[:, None, None], null_text.astype(cond["text"].dtype), cond["text"]))
    if "visual" in cond:
        out["visual"] = jnp.where(drop_image[:, None, None], 0.0, cond["visual"]).astype(cond["visual"].dtype)
    if image_latents is not None:
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
    cell_weights: jax.Array | None = None,
) -> jax.Array:
    """L_diff: the denoiser's mean squared error on one random timestep per example (float32 scalar).

    latents: scaled target latents float[B, h, w, C]; image_latents: the (possibly zeroed)
    image condition float[B, h, w, Cimg] or None (a UNet without one); cond: the (possibly
    nulled) conditions for `model.denoise`; weights: float[B] per-example weights of the mean
    (None: equal); cell_weights: float[B, h, w, 1] weights of each latent cell within an
    example's mean (None: equal).
    """
    k_time, k_noise = per_example(keys, 2)
    abar = jnp.asarray(alphas_cumprod(schedule))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(k_time)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
    a = jnp.sqrt(abar[t])[:, None, None, None]
    s = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
    noisy = a * latents + s * noise
    target = {"epsilon": noise, "v_prediction": a * noise - s * latents, "sample": latents}[schedule.prediction_type]
    sample = noisy if image_latents is None else jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=-1)
    pred = model.denoise(params, sample, t.astype(jnp.float32), cond)
    error = jnp.square(pred.astype(jnp.float32) - target)
    if cell_weights is None:
        return weighted_mean(jnp.mean(error, axis=(1, 2, 3)), weights)
    cell_weights = jnp.broadcast_to(cell_weights.astype(jnp.float32), error.shape)
    examples = jnp.sum(error * cell_weights, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(cell_weights, (1, 2, 3)), 1e-12)
    return weighted_mean(examples, weights)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """float[B] → Σ w·v / Σ w (0 when every weight is 0), the plain mean without weights."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(jnp.float32)
    return jnp.sum(jnp.where(weights > 0, values, 0.0) * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def uses_latent_cache(config) -> bool:
    """Whether the training data are latent caches (every config.data.sources entry of kind
    "latents", train/inputs.py): the batches then carry `LATENT_FIELDS` instead of pixels."""
    specs = (config.get("data") or {}).get("sources") or {}
    return bool(specs) and all(spec.get("kind") == "latents" for spec in specs.values())


def edit_latents(model: EditModel, params, batch, keys: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(scaled target latents float[B, h, w, C], a posterior sample; IP2P's image condition, the
    source's mode float[B, h, w, C], or None for a UNet without one) from the batch's pixels, or
    from its `LATENT_FIELDS` (a latent cache)."""
    cached = batch if LATENT_FIELDS[0] in batch else encode_latents(model, params, batch["source"], batch["target"])
    image_latents, target_mean, target_logvar = (cached[name] for name in LATENT_FIELDS)
    latents = scale_latents(jax.vmap(sample_posterior)(keys, target_mean, target_logvar), model.vae.config)
    return latents, image_latents if model.image_condition == "source" else None


def with_mask(model: EditModel, params, batch, cond: dict, image_latents, outside_weight: float):
    """The mask's part of mask_edit (module docstring): (cond + grounding tokens, the UNet's image
    condition, float[B, h, w, 1] cell weights of L_diff)."""
    mask = model.latent_mask(batch["mask"])
    if model.mask_encoder is not None:
        cond = dict(cond, grounding=model.mask_encoder.apply({"params": params["mask_encoder"]}, mask))
    if model.image_condition != "source":
        image_latents = model.image_condition_latents(params, batch["source"], batch["mask"])
    return cond, image_latents, mask + outside_weight * (1.0 - mask)


def _check_image_condition(model: EditModel, masked: bool) -> None:
    if model.image_condition == "masked" and not masked:
        raise ValueError("an inpainting UNet (image_condition='masked') reads the edit mask: train it with "
                         "train.loss='mask_edit' on data with masks")  # fmt: skip


def make_ip2p_loss(model: EditModel, config, *, masked: bool = False) -> LossFn:
    """InstructPix2Pix fine-tuning (UNet on CLIP text states); `masked`: mask_edit's (module docstring).

    batch: {"source": float[B, H, W, 3] in [-1, 1], "target": float[B, H, W, 3] in [-1, 1],
            "input_ids": int32[B, L]} (H, W multiples of the VAE factor) (+ "mask" float[B, H, W, 1]
            when masked); or, from a latent cache (data/latent_cache.py), the `LATENT_FIELDS` in
            place of "source" and "target".
    """
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    prob = float(config.train.cond_dropout)
    outside = float(config.train.get("mask_outside_weight", 0.1))
    _check_image_condition(model, masked)

    def loss_fn(params, batch, keys):
        k_posterior, k_drop, k_diffusion = per_example(keys, 3)
        latents, image_latents = edit_latents(model, params, batch, k_posterior)
        cond, cell_weights = {"text": model.encode_text(params, batch["input_ids"])}, None
        if masked:
            cond, image_latents, cell_weights = with_mask(model, params, batch, cond, image_latents, outside)
        cond, image_latents = condition_dropout(k_drop, cond, image_latents, params["null_text"], prob,
                                                image=model.guidance == "dual")  # fmt: skip
        loss = diffusion_loss(model, params, latents, image_latents, cond, k_diffusion, schedule,
                              cell_weights=cell_weights)  # fmt: skip
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


def make_fireedit_loss(model: EditModel, config, *, masked: bool = False, grounded: bool = False) -> LossFn:
    """FireEdit's loss for `config.stage` (module docstring); the batch: FIREEDIT_INPUTS[stage]
    (+ "mask" when `masked`: mask_edit's). `grounded`: + λ_region · the region loss of FireEdit's own
    grounding (`EditModel.ground`) from the same VLM pass, against the batch's "region_target"."""
    if model.conditioner != "vlm":
        raise ValueError(f"the fireedit loss needs config.model.conditioner='vlm', not {model.conditioner!r}")
    if fireedit_stage(config) == 1:
        if masked:
            raise ValueError("FireEdit's stage 1 aligns the Q-Former on captions: it has no edits to mask")
        return _alignment_loss(model, bool(config.train.get("dropout", True)))
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    prob = float(config.train.cond_dropout)
    dropout = bool(config.train.get("dropout", True))
    vlm_weight = float(config.train.get("vlm_weight", 1.0))
    outside = float(config.train.get("mask_outside_weight", 0.1))
    _check_image_condition(model, masked)

    def loss_fn(params, batch, keys):
        k_posterior, k_drop, k_diffusion, k_dropout = per_example(keys, 4)
        latents, image_latents = edit_latents(model, params, batch, k_posterior)
        input_ids = batch["vlm_input_ids"]
        cond, vlm_out = model.condition(params, batch["source"], (input_ids, batch["vlm_attention_mask"]), batch["boxes"],
                                        batch["box_mask"], dropout_key=_dropout_key(k_dropout, dropout))  # fmt: skip
        l_vlm = vlm_loss(vlm_out.logits, input_ids, batch["vlm_target_mask"], batch["vlm_weight"])
        cell_weights = None
        if masked:
            cond, image_latents, cell_weights = with_mask(model, params, batch, cond, image_latents, outside)
        cond, image_latents = condition_dropout(k_drop, cond, image_latents, params["null_text"], prob,
                                                image=model.guidance == "dual")  # fmt: skip
        l_diff = diffusion_loss(model, params, latents, image_latents, cond, k_diffusion, schedule,
                                batch["diffusion_weight"], cell_weights)  # fmt: skip
        loss, parts = vlm_weight * l_vlm + l_diff, {"vlm": l_vlm, "diffusion": l_diff}
        if grounded:
            prediction = model.ground(params, vlm_out, input_ids, batch["boxes"], batch["box_mask"])
            l_region, region_parts = region_loss(prediction, batch["region_target"], batch)
            loss, parts = loss + region_weight * l_region, {**parts, **region_parts, "grounding": l_region}
        return loss, parts

    if grounded and model.grounding is None:
        raise ValueError("a grounded FireEdit loss trains FireEdit's grounding: config.model.grounding is needed")
    region_weight = float(config.train.get("region_weight", 1.0))
    region_loss = make_region_loss(config)
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


def make_mask_edit_loss(model: EditModel, config, *, grounded: bool = False) -> LossFn:
    """Mask-guided editing (module docstring): the IP2P loss for a clip_text model, FireEdit's for a VLM
    (`grounded`: with its grounding's region loss)."""
    if model.conditioner == "vlm":
        return make_fireedit_loss(model, config, masked=True, grounded=grounded)
    return make_ip2p_loss(model, config, masked=True)


def _region_model(model: EditModel, loss: str):
    if model.region is None:
        raise ValueError(f"train.loss={loss!r} trains the learnt edit region: config.model.learnable_region is needed")
    return model.region


REGION_LOSSES = ("clip_contrastive", "learnable_region")  # their batches: caption records (no target image)
# The batch entries of the learnable-region losses (data/transforms.py `region_text_fields`): the source
# pixels, its caption and the target caption as the region's CLIP ids, the instruction as its T5 ids
REGION_INPUTS = ("source", "caption_ids", "target_caption_ids", "region_ids", "region_mask")


def generator_inputs(conditioner: str) -> tuple[str, ...]:
    """The batch entries the mask-guided edit of the region loss conditions on: the text encoder's ids,
    or FireEdit's VLM sequence and boxes."""
    return ("input_ids",) if conditioner == "clip_text" else VLM_INPUTS[:2] + ("boxes", "box_mask")


def make_clip_contrastive_loss(model: EditModel, config) -> LossFn:
    """The region's CLIP towers on (source, caption) pairs (module docstring); batch: "source", "caption_ids"."""
    region = _region_model(model, "clip_contrastive")
    temperature = float(config.train.get("clip_temperature", 0.07))

    def loss_fn(params, batch, keys):
        images, _ = region.image_features(params["region"], batch["source"])
        loss = region_losses.contrastive(images, region.text_embeds(params["region"], batch["caption_ids"]), temperature)
        return loss, {"contrastive": loss}

    return loss_fn


def make_learnable_region_loss(model: EditModel, config) -> LossFn:
    """Beyond Editing Pairs (module docstring); batch: REGION_INPUTS + `generator_inputs(conditioner)`."""
    region = _region_model(model, "learnable_region")
    train = config.train
    weights = dict(train.get("region_weights") or {})
    lambda_clip = float(weights.get("lambda_clip", 1.0))
    schedule = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
    sampler = make_sampler(config.model.sampler, schedule, int(train.get("region_edit_steps", 4)))
    image_scale, text_scale = (float(s) for s in train.get("region_guidance", (1.0, 3.0)))
    denoise = jax.checkpoint(model.denoise)  # every step's activations are recomputed in the backward pass

    def text_inputs(batch):
        if model.conditioner == "clip_text":
            return (batch["input_ids"],)
        return (batch["vlm_input_ids"], batch["vlm_attention_mask"]), batch["boxes"], batch["box_mask"]

    def edit(params, pixels, batch, soft, keys):
        """The model's mask-guided edit of `pixels` under the soft region float[B, H, W, 1]."""
        image_latents, cond, blend = edit_inputs(model, params, pixels, text_inputs(batch), soft, grounding=soft)
        latent_shape = blend[1].shape
        k_initial, k_steps = per_example(keys, 2)
        initial = jax.vmap(lambda k: jax.random.normal(k, latent_shape[1:]))(k_initial)
        steps = jax.vmap(lambda k: jax.random.normal(k, (sampler.num_steps, *latent_shape[1:])))(k_steps)
        latents = sample_edit(denoise, params, sampler, image_latents, cond, text_scale, image_scale,
                              guidance=model.guidance, blend=blend, initial_noise=initial,
                              step_noise=jnp.swapaxes(steps, 0, 1))  # fmt: skip
        return model.decode(params, latents)

    def loss_fn(params, batch, keys):
        rp, pixels = params["region"], batch["source"]
        image_source, patches = jax.lax.stop_gradient(region.image_features(rp, pixels))  # frozen CLIP
        text_source = jax.lax.stop_gradient(region.text_embeds(rp, batch["caption_ids"]))
        text_target = jax.lax.stop_gradient(region.text_embeds(rp, batch["target_caption_ids"]))
        prediction = region.predict(rp, patches, batch["region_ids"], batch["region_mask"])
        area = jnp.mean(jax.nn.sigmoid(prediction.logits))  # reported: the share of the image the region covers
        if lambda_clip == 0.0:
            l_sa = region_losses.semantic_alignment(prediction.fused_embedding, prediction.image_embedding,
                                                    text_target, text_source)  # fmt: skip
            return float(weights.get("lambda_sa", 1.0)) * l_sa, {"semantic_alignment": l_sa, "region_area": area}
        soft = region.pixel_mask(prediction.logits, *pixels.shape[1:3])
        edited = edit(params, pixels, batch, soft, keys)
        image_edit, patches_edit = region.image_features(rp, edited)
        loss, parts = region_losses.region_loss_parts(
            g_fused=prediction.fused_embedding, g_image=prediction.image_embedding, text_source=text_source,
            text_target=text_target, image_source=image_source, image_edit=image_edit, patches_source=patches,
            patches_edit=patches_edit, **weights,
        )  # fmt: skip
        return loss, {**parts, "region_area": area}

    return loss_fn


GENERATOR_MASKS = ("exact", "box")


def grounding_inputs(config) -> tuple[str, ...]:
    """The batch entries the grounded loss's region heads read besides the generator's: the target
    region ("mask": the record's edit mask, or the pair's difference mask) and the proposals; the
    region model also the source and the instruction as its T5 ids."""
    own = ("source", "region_ids", "region_mask") if config.model.get("learnable_region") is not None else ()
    return (*own, "mask", "boxes", "box_mask")


def generator_masks(mask: jax.Array, keys: jax.Array, form: str, grow: int) -> jax.Array:
    """The masks the grounded loss's generator trains under, from the target regions float[B, H, W, 1]:
    "exact" the regions themselves; "box" their bounding boxes, each side grown by 0…`grow` pixels
    drawn per example: what a region head's box (a proposal, or a regressed one) hands the edit."""
    if form == "exact":
        return mask
    if form != "box":
        raise ValueError(f"train.generator_mask={form!r}; choose one of {', '.join(GENERATOR_MASKS)}")
    b, h, w, _ = mask.shape
    boxes, present = region_supervision.bounding_boxes(mask)
    pixels = jnp.asarray([w, h, w, h], jnp.float32)
    extra = jax.vmap(lambda k: jax.random.randint(k, (4,), 0, grow + 1))(keys).astype(jnp.float32)
    grown = jnp.clip(boxes + jnp.asarray([-1.0, -1.0, 1.0, 1.0]) * extra / pixels, 0.0, 1.0)
    return (box_pixels(grown, h, w) * present[:, None, None])[..., None]


def make_region_loss(config):
    """(prediction, target regions float[B, H, W, 1], batch) → the region loss and its parts
    (train/region_supervision.py; its term weights from train.region_loss_weights)."""
    terms = dict(config.train.get("region_loss_weights") or {})

    def region_loss(prediction, target, batch):
        cells = math.isqrt(prediction.logits.shape[-1])
        return region_supervision.region_supervision(
            prediction.logits, target, cells, box_logits=prediction.box_logits, box=prediction.box,
            boxes=batch["boxes"], box_mask=batch["box_mask"], **terms,
        )  # fmt: skip

    return region_loss


def make_grounded_loss(model: EditModel, config) -> LossFn:
    """Grounded editing on edit pairs (records with a mask, or any pair: its difference mask).

    L = w_gen·L_mask_edit + λ_region·L_region: the mask-guided generator's loss (mask_edit's, for its
    conditioner) under `generator_masks` (train.generator_mask, train.generator_mask_grow), and the
    region loss (train/region_supervision.py) of the model's region heads on the target regions: the
    region model (`learnable_region`, its own encoders) and FireEdit's grounding (`grounding`, from the
    generator's own VLM pass). train.generator_weight 0 trains the region model alone (beside a
    frozen or absent generator). Batch: the generator loss's entries + `grounding_inputs(config)`.
    """
    train = config.train
    if model.region is None and model.grounding is None:
        raise ValueError("train.loss='grounded' trains a region head: config.model.learnable_region (the region "
                         "model) or config.model.grounding (FireEdit's) is needed")  # fmt: skip
    generator_weight, region_weight = float(train.get("generator_weight", 1.0)), float(train.get("region_weight", 1.0))
    if not generator_weight and model.region is None:
        raise ValueError("FireEdit's grounding trains in the generator's VLM pass: train.generator_weight must be > 0")
    form, grow = str(train.get("generator_mask", "box")), int(train.get("generator_mask_grow", 1))
    generator = make_mask_edit_loss(model, config, grounded=model.grounding is not None) if generator_weight else None
    region, region_loss = model.region, make_region_loss(config)

    def loss_fn(params, batch, keys):
        k_generator, k_mask = per_example(keys, 2)
        loss, parts = 0.0, {}
        if generator is not None:
            masks = generator_masks(batch["mask"], k_mask, form, grow)
            generator_loss, parts = generator(params, dict(batch, mask=masks, region_target=batch["mask"]), k_generator)
            loss = generator_weight * generator_loss
        if region is not None:
            _, patches = region.image_features(params["region"], batch["source"])
            prediction = region.predict(params["region"], patches, batch["region_ids"], batch["region_mask"],
                                        batch["boxes"], batch["box_mask"])  # fmt: skip
            l_region, region_parts = region_loss(prediction, batch["mask"], batch)
            loss, parts = loss + region_weight * l_region, {**parts, **region_parts, "region": l_region}
        return loss, parts

    return loss_fn


LOSSES: dict[str, Callable[[EditModel, object], LossFn]] = {
    "ip2p": make_ip2p_loss, "fireedit": make_fireedit_loss, "mask_edit": make_mask_edit_loss,
    "clip_contrastive": make_clip_contrastive_loss, "learnable_region": make_learnable_region_loss,
    "grounded": make_grounded_loss,
}  # fmt: skip
