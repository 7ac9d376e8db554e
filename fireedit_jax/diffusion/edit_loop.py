"""InstructPix2Pix dual classifier-free guidance: the whole denoising loop as one lax.scan.

Shape legend: B edits in the batch, S steps, h×w latent size, C latent channels,
Cimg image-latent channels, 3B the three guidance branches stacked on the batch axis.

Branch order follows diffusers' StableDiffusionInstructPix2PixPipeline:
  branch 0 "full"          text condition,      image condition
  branch 1 "image only"    null text,           image condition
  branch 2 "unconditional" null text,           zero image condition
and ε̃ = ε₂ + s_T·(ε₀ − ε₁) + s_I·(ε₁ − ε₂).

The loop is generic over the denoiser,
  denoise(params, latents_in: float[3B, h, w, C + Cimg], t: float[3B], cond) -> float[3B, h, w, C],
where latents_in = scaled noisy latents ‖ [image, image, 0] on channels and `cond` is
any pytree with leaves batched 3B (build it with `stack_branches`). Because `denoise`
receives t, a time-dependent conditioner runs inside it at every step, e.g. FireEdit:

    def denoise(params, latents_in, t, cond):
        e_t = tati.apply(params["tati"], cond["text"], t)       # time-aware text condition
        return unet.apply(params["unet"], latents_in, t, e_t, cond["visual"])

    cond = stack_branches({"text": e, "visual": v}, {"text": null_e, "visual": v},
                          {"text": null_e, "visual": jnp.zeros_like(v)})
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fireedit_jax.diffusion.samplers import Sampler

Denoiser = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def stack_branches(full, image_only, unconditional):
    """Stacks the three branch conditions on axis 0, in diffusers' order → leaves [3B, ...].

    Each argument is a pytree of the same structure; `full`'s leaves are [B, ...] and
    the others' leaves broadcast to them (so one null-text embedding [77, D] or
    [1, 77, D] serves the whole batch).
    """

    def stack(a, b, c):
        a = jnp.asarray(a)
        return jnp.concatenate([a] + [jnp.broadcast_to(x, a.shape).astype(a.dtype) for x in (b, c)])

    return jax.tree.map(stack, full, image_only, unconditional)


def dual_guidance(eps: jax.Array, text_scale, image_scale) -> jax.Array:
    """float[3B, ...] branch predictions → float[B, ...] guided prediction (diffusers' formula)."""
    eps_full, eps_image, eps_uncond = jnp.split(eps, 3)
    return eps_uncond + text_scale * (eps_full - eps_image) + image_scale * (eps_image - eps_uncond)


def sample_edit(
    denoise: Denoiser,
    params,
    sampler: Sampler,
    image_latents: jax.Array,
    cond,
    text_scale,
    image_scale,
    *,
    key: jax.Array | None = None,
    initial_noise: jax.Array | None = None,
    step_noise: jax.Array | None = None,
    on_step: Callable[[jax.Array, jax.Array], None] | None = None,
) -> jax.Array:
    """The pure, jittable loop: returns the denoised latents float32[B, h, w, C].

    image_latents: float[B, h, w, Cimg] VAE mode of the source image (not scaled).
    cond: pytree, leaves [3B, ...] (see `stack_branches`); passed to `denoise` unchanged.
    text_scale, image_scale: s_T, s_I, scalars (traced under jit).
    initial_noise: float[B, h, w, C] standard normal; the start is initial_noise ·
        init_noise_sigma, as in diffusers' prepare_latents. Drawn from `key` if None.
    step_noise: float[S, B, h, w, C] standard normal for the stochastic steps; drawn
        from `key` (one fold per step) if None and the sampler needs it.
    on_step: called at trace time inside the scan body with the traced step index and
        the new latents, e.g. to emit a `jax.debug.callback`.
    """
    image_latents = jnp.asarray(image_latents, jnp.float32)
    latent_shape = image_latents.shape if initial_noise is None else initial_noise.shape
    needs_key = initial_noise is None or (sampler.stochastic and step_noise is None)
    if needs_key and key is None:
        raise ValueError("pass `key`, or both `initial_noise` and (for a stochastic sampler) `step_noise`")
    init_key, step_key = jax.random.split(key) if needs_key else (None, None)
    if initial_noise is None:
        initial_noise = jax.random.normal(init_key, latent_shape, jnp.float32)
    latents = jnp.asarray(initial_noise, jnp.float32) * sampler.init_noise_sigma
    image_branches = stack_branches(image_latents, image_latents, jnp.zeros_like(image_latents))
    batch3 = image_branches.shape[0]

    def body(latents, inputs):
        i, noise = inputs
        model_in = sampler.scale_input(jnp.concatenate([latents] * 3), i)
        model_in = jnp.concatenate([model_in, image_branches], axis=-1)
        t = jnp.broadcast_to(sampler.timesteps[i], (batch3,))
        eps = dual_guidance(denoise(params, model_in, t, cond).astype(jnp.float32), text_scale, image_scale)
        if sampler.stochastic and noise is None:
            noise = jax.random.normal(jax.random.fold_in(step_key, i), latent_shape, jnp.float32)
        latents = sampler.step(eps, i, latents, noise)
        if on_step is not None:
            on_step(i, latents)
        return latents, None

    steps = jnp.arange(sampler.num_steps)
    noise_xs = None if step_noise is None or not sampler.stochastic else jnp.asarray(step_noise, jnp.float32)
    latents, _ = jax.lax.scan(body, latents, (steps, noise_xs))
    return latents


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

        edit(params, sampler, image_latents, cond, *, text_scale=7.5, image_scale=1.5,
             seed=0, initial_noise=None, step_noise=None, progress=None) -> float32[B, h, w, C]

    seed: int or a jax PRNG key. progress(step) is called on the host after each step
    (0-based index), e.g. `lambda i: bar.update(1)`; `edit` returns after all calls.
    Guidance scales, seed and progress change without recompiling; the compiled loop
    is reused while the shapes, S and the sampler's static fields stay the same.
    """

    @jax.jit
    def run(params, sampler, image_latents, cond, text_scale, image_scale, key, initial_noise, step_noise, call_id):
        def on_step(i, latents):
            # One element of the new latents makes the report wait for the step's compute.
            jax.debug.callback(_report_progress, call_id, i, latents[(0,) * latents.ndim])

        return sample_edit(
            denoise, params, sampler, image_latents, cond, text_scale, image_scale,
            key=key, initial_noise=initial_noise, step_noise=step_noise, on_step=on_step,
        )  # fmt: skip

    def edit(
        params,
        sampler: Sampler,
        image_latents,
        cond,
        *,
        text_scale: float = 7.5,
        image_scale: float = 1.5,
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
                params, sampler, image_latents, cond, text_scale, image_scale,
                key, initial_noise, step_noise, jnp.int32(call_id),
            )  # fmt: skip
            latents.block_until_ready()
            jax.effects_barrier()  # every progress call has run
        finally:
            _progress_callables.pop(call_id, None)
        return latents

    return edit
