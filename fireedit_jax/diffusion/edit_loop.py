"""Classifier-free guided denoising, the whole loop as one lax.scan, with optional masked sampling.

Shape legend: B edits in the batch, S steps, h×w latent size, C latent channels,
Cimg image-condition channels, nB the guidance branches stacked on the batch axis.

Two guidance modes. "dual" (InstructPix2Pix), three branches in the order of diffusers'
StableDiffusionInstructPix2PixPipeline:
  branch 0 "full"          text condition,      image condition
  branch 1 "image only"    null text,           image condition
  branch 2 "unconditional" null text,           zero image condition
and ε̃ = ε₂ + s_T·(ε₀ − ε₁) + s_I·(ε₁ − ε₂). "text" (Stable Diffusion, SD inpainting): two
branches, full and unconditional (null text), both with the image condition, and
ε̃ = ε₁ + s_T·(ε₀ − ε₁) (s_I unused).

The loop is generic over the denoiser,
  denoise(params, latents_in: float[nB, h, w, C + Cimg], t: float[nB], cond) -> float[nB, h, w, C],
where latents_in = scaled noisy latents ‖ the image condition of each branch on channels and
`cond` is any pytree with leaves batched nB (build it with `stack_branches`). Because `denoise`
receives t, a time-dependent conditioner runs inside it at every step, e.g. FireEdit:

    def denoise(params, latents_in, t, cond):
        e_t = tati.apply(params["tati"], cond["text"], t)       # time-aware text condition
        return unet.apply(params["unet"], latents_in, t, e_t, cond["visual"])

    cond = stack_branches({"text": e, "visual": v}, {"text": null_e, "visual": v},
                          {"text": null_e, "visual": jnp.zeros_like(v)})

Masked sampling (`blend`: a mask m and the source's scaled latents z): after every step the
latents outside the mask become the source noised to the next step's level, those inside are
kept, x ← m·x + (1 − m)·renoise(z, ε₀, i), ε₀ the initial noise, clean after the last step —
diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet, and Blended Latent Diffusion.
A soft m (feathered edges) blends in between.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fireedit_jax.diffusion.samplers import Sampler

Denoiser = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def stack_branches(full, *others):
    """Stacks the branch conditions on axis 0 → leaves [nB, ...]: dual guidance (full, image-only,
    unconditional), text guidance (full, unconditional).

    Each argument is a pytree of the same structure; `full`'s leaves are [B, ...] and
    the others' leaves broadcast to them (so one null-text embedding [77, D] or
    [1, 77, D] serves the whole batch).
    """

    def stack(a, *rest):
        a = jnp.asarray(a)
        return jnp.concatenate([a] + [jnp.broadcast_to(x, a.shape).astype(a.dtype) for x in rest])

    return jax.tree.map(stack, full, *others)


GUIDANCE_BRANCHES = {"dual": 3, "text": 2}


def dual_guidance(eps: jax.Array, text_scale, image_scale) -> jax.Array:
    """float[3B, ...] branch predictions → float[B, ...] guided prediction (diffusers' formula)."""
    eps_full, eps_image, eps_uncond = jnp.split(eps, 3)
    return eps_uncond + text_scale * (eps_full - eps_image) + image_scale * (eps_image - eps_uncond)


def text_guidance(eps: jax.Array, text_scale) -> jax.Array:
    """float[2B, ...] (full, unconditional) → float[B, ...]: ε_u + s_T·(ε_f − ε_u)."""
    eps_full, eps_uncond = jnp.split(eps, 2)
    return eps_uncond + text_scale * (eps_full - eps_uncond)


def branch_images(image_latents: jax.Array | None, guidance: str) -> jax.Array | None:
    """The image condition of each branch, float[nB, h, w, Cimg]: dual [x, x, 0], text [x, x]
    (Cimg = 0 when `image_latents` is None)."""
    if image_latents is None:
        return None
    if guidance == "dual":
        return stack_branches(image_latents, image_latents, jnp.zeros_like(image_latents))
    return stack_branches(image_latents, image_latents)


def sample_edit(
    denoise: Denoiser,
    params,
    sampler: Sampler,
    image_latents: jax.Array | None,
    cond,
    text_scale,
    image_scale,
    *,
    guidance: str = "dual",
    blend: tuple[jax.Array, jax.Array] | None = None,
    latent_shape: tuple[int, ...] | None = None,
    key: jax.Array | None = None,
    initial_noise: jax.Array | None = None,
    step_noise: jax.Array | None = None,
    on_step: Callable[[jax.Array, jax.Array], None] | None = None,
) -> jax.Array:
    """The pure, jittable loop: returns the denoised latents float32[B, h, w, C].

    image_latents: float[B, h, w, Cimg], the conditional branch's image condition (IP2P: the VAE
        mode of the source, unscaled; SD inpainting: mask ‖ masked-image latents), or None (none).
    cond: pytree, leaves [nB, ...] (see `stack_branches`); passed to `denoise` unchanged.
    text_scale, image_scale: s_T, s_I, scalars (traced under jit).
    guidance: "dual" (3 branches) or "text" (2 branches); see the module docstring.
    blend: (mask float[B, h, w, 1] in [0, 1], 1 = edit; source latents float[B, h, w, C], scaled)
        for masked sampling, or None.
    latent_shape: (B, h, w, C), needed only when no other argument gives it (text guidance without
        initial_noise or blend).
    initial_noise: float[B, h, w, C] standard normal; the start is initial_noise ·
        init_noise_sigma, as in diffusers' prepare_latents. Drawn from `key` if None.
    step_noise: float[S, B, h, w, C] standard normal for the stochastic steps; drawn
        from `key` (one fold per step) if None and the sampler needs it.
    on_step: called at trace time inside the scan body with the traced step index and
        the new latents, e.g. to emit a `jax.debug.callback`.
    """
    if guidance not in GUIDANCE_BRANCHES:
        raise ValueError(f"guidance={guidance!r}; choose one of {', '.join(GUIDANCE_BRANCHES)}")
    # The latents' shape: the noise's, the blend source's, or IP2P's image latent's (same channels).
    known = (initial_noise, None if blend is None else blend[1], image_latents if guidance == "dual" else None)
    latent_shape = next((x.shape for x in known if x is not None), latent_shape)
    if latent_shape is None:
        raise ValueError("pass `latent_shape` (B, h, w, C), or `initial_noise`")
    needs_key = initial_noise is None or (sampler.stochastic and step_noise is None)
    if needs_key and key is None:
        raise ValueError("pass `key`, or both `initial_noise` and (for a stochastic sampler) `step_noise`")
    init_key, step_key = jax.random.split(key) if needs_key else (None, None)
    if initial_noise is None:
        initial_noise = jax.random.normal(init_key, latent_shape, jnp.float32)
    initial_noise = jnp.asarray(initial_noise, jnp.float32)
    latents = initial_noise * sampler.init_noise_sigma
    branches = GUIDANCE_BRANCHES[guidance]
    images = None if image_latents is None else jnp.asarray(image_latents, jnp.float32)
    images = branch_images(images, guidance)
    if blend is not None:
        mask, source = (jnp.asarray(x, jnp.float32) for x in blend)

    def body(latents, inputs):
        i, noise = inputs
        model_in = sampler.scale_input(jnp.concatenate([latents] * branches), i)
        if images is not None:
            model_in = jnp.concatenate([model_in, images], axis=-1)
        t = jnp.broadcast_to(sampler.timesteps[i], (branches * latent_shape[0],))
        eps = denoise(params, model_in, t, cond).astype(jnp.float32)
        eps = dual_guidance(eps, text_scale, image_scale) if guidance == "dual" else text_guidance(eps, text_scale)
        if sampler.stochastic and noise is None:
            noise = jax.random.normal(jax.random.fold_in(step_key, i), latent_shape, jnp.float32)
        latents = sampler.step(eps, i, latents, noise)
        if blend is not None:
            latents = mask * latents + (1.0 - mask) * sampler.renoise(source, initial_noise, i)
        if on_step is not None:
            on_step(i, latents)
        return latents, None

    steps = jnp.arange(sampler.num_steps)
    noise_xs = None if step_noise is None or not sampler.stochastic else jnp.asarray(step_noise, jnp.float32)
    latents, _ = jax.lax.scan(body, latents, (steps, noise_xs))
    return latents


def edit_inputs(model, params, pixels: jax.Array, text_inputs: tuple, masks: jax.Array | None = None,
                grounding: jax.Array | None = None):  # fmt: skip
    """What `sample_edit` reads for an `EditModel` edit: (image_latents, the stacked branch conditions,
    blend or None).

    pixels: float[B, H, W, 3] in [-1, 1]; text_inputs: `EditModel.condition`'s (text_inputs, boxes,
    box_mask) or (text_inputs,). masks: float[B, H, W, 1] in [0, 1], 1 = edit, or None: masked
    sampling blends with it. grounding: what the mask encoder and an inpainting UNet read, float[B,
    H, W, 1]; default every pixel where masks > 0 (a feathered edge counts as inside). An inpainting
    UNet reads the masked source instead of being blended (diffusers' rule).
    """
    blend, latent_grounding = None, None
    if masks is not None:
        grounding = (masks > 0).astype(jnp.float32) if grounding is None else grounding
        latent_grounding = model.latent_mask(grounding)
        if model.image_condition != "masked":
            source = model.encode_image(params, pixels) * model.vae.config.scaling_factor
            blend = (model.latent_mask(masks), source)
    image_latents = model.image_condition_latents(params, pixels, grounding)
    cond, _ = model.condition(params, pixels, *text_inputs, mask=latent_grounding)
    return image_latents, stack_branches(*model.branches(params, cond)), blend


# Progress callables are looked up by an id that travels into the compiled loop as a
# traced integer, so a new callable (a new progress bar per edit) never retraces.
_progress_callables: dict[int, Callable[[int], Any]] = {}
_progress_ids = itertools.count()
_progress_lock = threading.Lock()


def _report_progress(call_id, step, _step_done) -> None:
    callback = _progress_callables.get(int(call_id))
    if callback is not None:
        callback(int(step))


def make_edit_fn(denoise: Denoiser) -> Callable[..., jax.Array]:
    """Compiles the loop for one denoiser; returns `edit`:

        edit(params, sampler, image_latents, cond, *, text_scale=7.5, image_scale=1.5, guidance="dual",
             blend=None, latent_shape=None, seed=0, initial_noise=None, step_noise=None, progress=None)
        -> float32[B, h, w, C]

    seed: int or a jax PRNG key. progress(step) is called on the host after each step
    (0-based index), e.g. `lambda i: bar.update(1)`; `edit` returns after all calls.
    Guidance scales, the blend's mask, seed and progress change without recompiling; the compiled
    loop is reused while the shapes, S, the guidance mode, blend or not and the sampler's static
    fields stay the same.
    """

    @functools.partial(jax.jit, static_argnames=("guidance", "latent_shape"))
    def run(params, sampler, image_latents, cond, text_scale, image_scale, key, initial_noise, step_noise, blend,
            call_id, *, guidance, latent_shape):  # fmt: skip
        def on_step(i, latents):
            # One element of the new latents makes the report wait for the step's compute.
            jax.debug.callback(_report_progress, call_id, i, latents[(0,) * latents.ndim])

        return sample_edit(
            denoise, params, sampler, image_latents, cond, text_scale, image_scale, guidance=guidance, blend=blend,
            latent_shape=latent_shape, key=key, initial_noise=initial_noise, step_noise=step_noise, on_step=on_step,
        )  # fmt: skip

    def edit(
        params,
        sampler: Sampler,
        image_latents,
        cond,
        *,
        text_scale: float = 7.5,
        image_scale: float = 1.5,
        guidance: str = "dual",
        blend=None,
        latent_shape: tuple[int, ...] | None = None,
        seed: int | jax.Array = 0,
        initial_noise=None,
        step_noise=None,
        progress: Callable[[int], Any] | None = None,
    ) -> jax.Array:
        key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
        # float32 arrays, so that 7 and 7.5 (weakly typed int / float) share one compilation
        text_scale, image_scale = jnp.float32(text_scale), jnp.float32(image_scale)
        with _progress_lock:
            call_id = next(_progress_ids) % (2**31)
            if progress is not None:
                _progress_callables[call_id] = progress
        try:
            latents = run(
                params, sampler, image_latents, cond, text_scale, image_scale, key, initial_noise, step_noise, blend,
                jnp.int32(call_id), guidance=guidance, latent_shape=None if latent_shape is None else tuple(latent_shape),
            )  # fmt: skip
            latents.block_until_ready()
            jax.effects_barrier()  # every progress call has run
        finally:
            _progress_callables.pop(call_id, None)
        return latents

    return edit
