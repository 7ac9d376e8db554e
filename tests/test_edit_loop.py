"""The jitted dual-guidance loop against a plain Python loop over diffusers' schedulers.

The reference loop repeats the lines of diffusers' StableDiffusionInstructPix2PixPipeline
(branch stacking, scale_model_input, channel concat, chunk(3) guidance, scheduler.step
with a generator) around a toy analytic denoiser written twice, in torch and in JAX.
Noise: the reference schedulers draw from a seeded torch generator; ours gets the same
numbers drawn from a twin generator and passed in as `initial_noise` / `step_noise`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from fireedit_jax.diffusion.edit_loop import make_edit_fn, sample_edit, stack_branches
from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig

B, H, W, C, L, D = 2, 4, 3, 4, 5, 6
STEPS = 8
IP2P = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

_rng = np.random.default_rng(0)
W_IN = (0.4 * _rng.standard_normal((2 * C, C))).astype(np.float32)
W_COND = (0.3 * _rng.standard_normal((D, C))).astype(np.float32)
TEXT = _rng.standard_normal((B, L, D)).astype(np.float32)
NULL_TEXT = _rng.standard_normal((L, D)).astype(np.float32)  # one "" embedding for the batch
IMAGE = _rng.standard_normal((B, H, W, C)).astype(np.float32)

TRACES = {"denoise": 0}


def toy_denoise(params, latents_in, t, cond):
    """ε = x + 0.2·tanh(x_in·W)·(1 + t/1000) + 0.1·mean_tokens(cond)·V, x the noisy latents.

    Mostly "the noise is the input", so latents keep realistic magnitudes under
    guidance; the small terms make it depend on the image channels (if any), t and the text.
    """
    TRACES["denoise"] += 1
    mixed = jnp.tanh(latents_in @ params["w_in"][: latents_in.shape[-1]]) * (1 + t / 1000)[:, None, None, None]
    text = (cond.mean(1) @ params["w_cond"])[:, None, None, :]
    return latents_in[..., :C] + 0.2 * mixed + 0.1 * text


def toy_denoise_torch(latents_in, t, cond):
    x = latents_in.permute(0, 2, 3, 1)
    t = t.float().expand(x.shape[0])
    mixed = torch.tanh(x @ torch.from_numpy(W_IN[: x.shape[-1]])) * (1 + t / 1000)[:, None, None, None]
    text = (cond.mean(1) @ torch.from_numpy(W_COND))[:, None, None, :]
    return (x[..., :C] + 0.2 * mixed + 0.1 * text).permute(0, 3, 1, 2)


PARAMS = {"w_in": jnp.asarray(W_IN), "w_cond": jnp.asarray(W_COND)}
COND = stack_branches(TEXT, NULL_TEXT, NULL_TEXT)


def reference_loop(scheduler, text_scale, image_scale, initial_noise, generator, eta=None):
    """diffusers' IP2P denoising loop; guidance only when s_T > 1 and s_I ≥ 1, as there."""
    guided = text_scale > 1.0 and image_scale >= 1.0
    image = torch.from_numpy(IMAGE).permute(0, 3, 1, 2)
    text, null = torch.from_numpy(TEXT), torch.from_numpy(NULL_TEXT).expand(B, L, D)
    prompt_embeds = torch.cat([text, null, null]) if guided else text
    image_latents = torch.cat([image, image, torch.zeros_like(image)]) if guided else image
    step_kwargs = {} if eta is None else {"eta": eta}
    latents = initial_noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 3) if guided else latents
        model_in = torch.cat([scheduler.scale_model_input(model_in, t), image_latents], dim=1)
        eps = toy_denoise_torch(model_in, t, prompt_embeds)
        if guided:
            eps_text, eps_image, eps_uncond = eps.chunk(3)
            eps = eps_uncond + text_scale * (eps_text - eps_image) + image_scale * (eps_image - eps_uncond)
        latents = scheduler.step(eps, t, latents, generator=generator, **step_kwargs).prev_sample
    return latents.permute(0, 2, 3, 1).numpy()


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _noise(seed):
    """The draws diffusers makes from torch.Generator(seed): initial latents, then one per step.

    Returns the initial draw (NCHW) and a fresh generator past it for the reference loop,
    and the same numbers NHWC for ours: initial [B, h, w, C], per step [S, B, h, w, C].
    """
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn((B, C, H, W), generator=g) for _ in range(STEPS + 1)]
    reference = torch.Generator().manual_seed(seed)
    initial = torch.randn((B, C, H, W), generator=reference)
    return initial, reference, _nhwc(draws[0]), np.stack([_nhwc(d) for d in draws[1:]])


@pytest.fixture(scope="module")
def edit():
    return make_edit_fn(toy_denoise)


CASES = {
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, None),  # IP2P's scheduler, linspace spacing
    "ddim_eta": (DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}, 0.6),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scales", [(7.5, 1.5), (1.0, 1.0)])
def test_loop_matches_diffusers(edit, highest_precision, name, scales):
    """Guided; and with s_T = s_I = 1 equal to diffusers' unguided path (the conditional branch alone)."""
    cls, kw, eta = CASES[name]
    scheduler = cls(**IP2P, **kw)
    scheduler.set_timesteps(STEPS)
    sampler = make_sampler(name.split("_eta")[0], SchedulerConfig.from_diffusers({**IP2P, **kw}), STEPS, eta=eta or 0.0)
    initial_ref, generator, initial, step_noise = _noise(seed=5)
    want = reference_loop(scheduler, *scales, initial_ref, generator, eta=eta)
    got = edit(PARAMS, sampler, IMAGE, COND, text_scale=scales[0], image_scale=scales[1],
               initial_noise=initial, step_noise=step_noise)  # fmt: skip
    assert got.shape == (B, H, W, C)
    print(f"{name} {scales}: max |latent| {np.abs(want).max():.3f}, max error {np.abs(np.asarray(got) - want).max():.2e}")
    assert np.abs(np.asarray(got) - want).max() <= 1e-5
    assert np.abs(want).max() > 0.1


def test_no_retrace_and_progress(edit):
    sampler = make_sampler("euler_ancestral", SchedulerConfig(), STEPS)
    seen_a, seen_b = [], []
    first = edit(PARAMS, sampler, IMAGE, COND, text_scale=7.5, image_scale=1.5, seed=1, progress=seen_a.append)
    traces = TRACES["denoise"]
    # New scales (an int among them), a new seed and a new progress callable: no retrace.
    second = edit(PARAMS, sampler, IMAGE, COND, text_scale=3, image_scale=1.2, seed=2, progress=seen_b.append)
    assert TRACES["denoise"] == traces
    assert seen_a == list(range(STEPS)) and seen_b == list(range(STEPS))
    assert np.abs(np.asarray(first - second)).max() > 1e-2
    # Same seed → same edit; noise is drawn inside the loop when not given.
    again = edit(PARAMS, sampler, IMAGE, COND, text_scale=7.5, image_scale=1.5, seed=1)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    assert TRACES["denoise"] == traces


def test_guidance_scales_act_on_their_branches():
    """s_T scales (full − image-only), s_I scales (image-only − unconditional): with a
    denoiser that ignores the image, s_I has no effect and s_T does; ignoring text, the reverse."""
    sampler = make_sampler("ddim", SchedulerConfig(), 4)
    def text_only(params, x, t, cond):
        return jnp.broadcast_to(cond.mean((1, 2))[:, None, None, None], x[..., :C].shape)

    def image_only(params, x, t, cond):
        return jnp.tanh(x[..., C:])

    key = jax.random.key(0)
    outs = {}
    for name, denoise in (("text", text_only), ("image", image_only)):
        for scales in ((3.0, 1.0), (3.0, 2.0), (5.0, 1.0)):
            outs[name, scales] = np.asarray(sample_edit(denoise, None, sampler, IMAGE, COND, *scales, key=key))
    np.testing.assert_allclose(outs["text", (3.0, 1.0)], outs["text", (3.0, 2.0)], atol=1e-6)
    assert np.abs(outs["text", (3.0, 1.0)] - outs["text", (5.0, 1.0)]).max() > 1e-2
    np.testing.assert_allclose(outs["image", (3.0, 1.0)], outs["image", (5.0, 1.0)], atol=1e-6)
    assert np.abs(outs["image", (3.0, 1.0)] - outs["image", (3.0, 2.0)]).max() > 1e-2


def test_stack_branches_pytree_and_broadcast():
    v = np.ones((B, 3, D), np.float32)
    cond = stack_branches({"text": TEXT, "visual": v}, {"text": NULL_TEXT, "visual": v},
                          {"text": NULL_TEXT[None], "visual": 0.0})  # fmt: skip
    assert cond["text"].shape == (3 * B, L, D) and cond["visual"].shape == (3 * B, 3, D)
    np.testing.assert_array_equal(cond["text"][B:2 * B], np.broadcast_to(NULL_TEXT, (B, L, D)))
    np.testing.assert_array_equal(cond["visual"][:2 * B], 1.0)
    np.testing.assert_array_equal(cond["visual"][2 * B:], 0.0)


def test_sample_edit_needs_noise_or_key():
    sampler = make_sampler("euler_ancestral", SchedulerConfig(), STEPS)
    with pytest.raises(ValueError, match="pass `key`"):
        sample_edit(toy_denoise, PARAMS, sampler, IMAGE, COND, 7.5, 1.5, initial_noise=np.zeros((B, H, W, C)))


# ------------------------------------------------------------------ masked sampling and text guidance

MASK = (np.random.default_rng(1).uniform(size=(B, H, W, 1)) > 0.5).astype(np.float32)
SOURCE = np.random.default_rng(2).standard_normal((B, H, W, C)).astype(np.float32)  # scaled source latents
TEXT_COND = stack_branches(TEXT, NULL_TEXT, NULL_TEXT)[: 2 * B]  # (full, unconditional)


def reference_inpaint_loop(scheduler, text_scale, initial_noise, generator, image_channels, eta=None):
    """diffusers' StableDiffusionInpaintPipeline loop (its `(uncond, text)` order, chunk(2)): with no
    image channels (a 4-channel UNet), the latents outside the mask are replaced after every step by
    the source noised to the next timestep; with image channels (9-channel UNet), they are concatenated."""
    if hasattr(scheduler, "set_begin_index"):  # as its get_timesteps does at strength 1
        scheduler.set_begin_index(0)
    text, null = torch.from_numpy(TEXT), torch.from_numpy(NULL_TEXT).expand(B, L, D)
    prompt_embeds = torch.cat([null, text])
    mask = torch.from_numpy(MASK).permute(0, 3, 1, 2)
    source = torch.from_numpy(SOURCE).permute(0, 3, 1, 2)
    noise = initial_noise
    latents = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        if image_channels is not None:
            model_in = torch.cat([model_in, torch.cat([image_channels] * 2)], dim=1)
        eps_uncond, eps_text = toy_denoise_torch(model_in, t, prompt_embeds).chunk(2)
        eps = eps_uncond + text_scale * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents, generator=generator, **({} if eta is None else {"eta": eta})).prev_sample
        if image_channels is None:
            proper = source
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(source, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - mask) * proper + mask * latents
    return latents.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["blend", "channels"])
def test_masked_loop_matches_diffusers_inpainting(edit, highest_precision, name, layout):
    """Text guidance with masked sampling (4-channel UNet) or with the mask and masked latents as
    image channels (9-channel UNet, here toy-sized: C + C image channels), against diffusers' loop."""
    cls, kw, eta = CASES[name]
    scheduler = cls(**IP2P, **kw)
    scheduler.set_timesteps(STEPS)
    sampler = make_sampler(name.split("_eta")[0], SchedulerConfig.from_diffusers({**IP2P, **kw}), STEPS, eta=eta or 0.0)
    initial_ref, generator, initial, step_noise = _noise(seed=7)
    channels = torch.from_numpy(IMAGE).permute(0, 3, 1, 2) if layout == "channels" else None
    want = reference_inpaint_loop(scheduler, 5.0, initial_ref, generator, channels, eta=eta)
    got = edit(PARAMS, sampler, IMAGE if layout == "channels" else None, TEXT_COND, text_scale=5.0, guidance="text",
               blend=(MASK, SOURCE) if layout == "blend" else None, latent_shape=(B, H, W, C),
               initial_noise=initial, step_noise=step_noise)  # fmt: skip
    err = np.abs(np.asarray(got) - want).max()
    print(f"{name} {layout}: max error {err:.2e}")
    assert err <= 1e-5
    if layout == "blend":  # after the last step the outside is the clean source exactly
        outside = MASK[..., 0] == 0
        np.testing.assert_allclose(np.asarray(got)[outside], SOURCE[outside], atol=1e-6)
