"""Schedules and samplers against diffusers' DDIMScheduler / EulerAncestralDiscreteScheduler.

Each test runs a whole trajectory: both sides get the same model outputs and noise at
every step and each keeps its own state, so differences would accumulate. The model
output is that of a denoiser aiming at a fixed x0 plus a random error, so the latents
keep realistic magnitudes (random outputs alone drive them to ~50, where float32
rounding alone is ~4e-6 per step).
Euler-ancestral noise: diffusers draws it inside `step` with `torch.randn(shape,
generator=g)`; we give it a seeded generator and draw our copy from a twin generator
with the same seed, so both see the same numbers without patching diffusers.
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod, betas

SHAPE = (2, 4, 5, 3)  # NCHW for diffusers; ours runs NHWC
SPACINGS = ("leading", "trailing", "linspace")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

# One compilation per sampler structure; the Sampler is a pytree argument.
_step = jax.jit(lambda sampler, out, i, x, noise: sampler.step(out, i, x, noise))
_scale = jax.jit(lambda sampler, x, i: sampler.scale_input(x, i))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _config(**kw):
    return SchedulerConfig.from_diffusers({**SD, **kw})


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_schedule_bitwise(schedule):
    ref = DDIMScheduler(**{**SD, "beta_schedule": schedule})
    config = _config(beta_schedule=schedule)
    np.testing.assert_array_equal(betas(config), ref.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod(config), ref.alphas_cumprod.numpy())


def _model_output(x_ddpm, alpha_bar, prediction_type, x0, generator):
    """ε, v or x0 of a denoiser that predicts x0 (in DDPM space: x = √ᾱ·x0 + √(1−ᾱ)·ε), plus an error."""
    eps = (x_ddpm - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5 + 0.3 * torch.randn(SHAPE, generator=generator)
    if prediction_type == "sample":
        return (x_ddpm - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    return eps if prediction_type == "epsilon" else alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


def _run_ddim(ref, sampler, eta, x0_scale):
    g = torch.Generator().manual_seed(1)
    x_ref = torch.randn(SHAPE, generator=g)
    x0 = x0_scale * torch.randn(SHAPE, generator=g)
    x = _nhwc(x_ref)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out = _model_output(x_ref, ref.alphas_cumprod[t], ref.config.prediction_type, x0, g)
        noise = torch.randn(SHAPE, generator=g)
        x_ref = ref.step(out, t, x_ref, eta=eta, variance_noise=noise).prev_sample
        x = np.asarray(_step(sampler, _nhwc(out), i, x, _nhwc(noise)))
        worst = max(worst, np.abs(x - _nhwc(x_ref)).max())
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "set_alpha_to_one, eta, prediction_type, clip",
    [(False, 0.0, "epsilon", False), (True, 0.0, "epsilon", False), (False, 0.7, "epsilon", False),
     (True, 1.0, "v_prediction", False), (False, 0.0, "epsilon", True), (False, 0.0, "sample", True)],
)  # fmt: skip
def test_ddim_matches_diffusers(spacing, set_alpha_to_one, eta, prediction_type, clip):
    kw = dict(timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type,
              clip_sample=clip)  # fmt: skip
    num_steps = 7
    ref = DDIMScheduler(**SD, **kw)
    ref.set_timesteps(num_steps)
    sampler = make_sampler("ddim", _config(**kw), num_steps, eta=eta)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())
    assert ref.timesteps.dtype == torch.int64 and sampler.stochastic == (eta > 0)
    assert float(sampler.init_noise_sigma) == ref.init_noise_sigma
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_scale(sampler, x, 3)), x)
    # A target x0 well outside [-1, 1] exercises clipping.
    assert _run_ddim(ref, sampler, eta, x0_scale=3.0 if clip else 1.0) <= 1e-5


def test_ddim_eta_noise_matters():
    """The eta > 0 comparison above is meaningful: other noise gives other latents."""
    sampler = make_sampler("ddim", _config(), 7, eta=1.0)
    rng = np.random.default_rng(0)
    out, x, n1, n2 = (rng.standard_normal((1, 4, 4, 3)).astype(np.float32) for _ in range(4))
    assert np.abs(np.asarray(_step(sampler, out, 2, x, n1) - _step(sampler, out, 2, x, n2))).max() > 1e-2


def test_euler_ancestral_sample_prediction_is_the_implied_epsilon_step():
    """diffusers' Euler-ancestral has no x0 ("sample") prediction: ours must step as the ε it implies."""
    rng = np.random.default_rng(4)
    x, x0, noise = (rng.standard_normal((1, 4, 4, 3)).astype(np.float32) for _ in range(3))
    for i in (0, 4, 8):
        eps_sampler = make_sampler("euler_ancestral", _config(), 9)
        sigma = float(eps_sampler.coefficients["sigma"][i])
        eps = (x - x0) / sigma  # the ε whose x0 = x − σ·ε is x0
        sample_sampler = make_sampler("euler_ancestral", _config(prediction_type="sample"), 9)
        np.testing.assert_allclose(np.asarray(_step(sample_sampler, x0, i, x, noise)),
                                   np.asarray(_step(eps_sampler, eps, i, x, noise)), rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers(spacing, prediction_type):
    kw = dict(timestep_spacing=spacing, prediction_type=prediction_type)
    num_steps = 9
    ref = EulerAncestralDiscreteScheduler(**SD, **kw)
    ref.set_timesteps(num_steps)
    sampler = make_sampler("euler_ancestral", _config(**kw), num_steps)
    assert ref.timesteps.dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())
    # sigmas to float32 rounding: torch's vectorised pow(0.5) and numpy's sqrt may differ by an ulp per CPU
    np.testing.assert_allclose(np.asarray(sampler.coefficients["sigma"]), ref.sigmas.numpy()[:-1], rtol=3e-7)
    assert float(sampler.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=3e-7)

    data = torch.Generator().manual_seed(2)
    ref_noise, our_noise = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ref = torch.randn(SHAPE, generator=data) * ref.init_noise_sigma
    x0 = torch.randn(SHAPE, generator=data)
    x = _nhwc(x_ref)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        scaled_ref = ref.scale_model_input(x_ref, t)  # = √ᾱ·x, the DDPM-space latents
        worst = max(worst, np.abs(np.asarray(_scale(sampler, x, i)) - _nhwc(scaled_ref)).max())
        out = _model_output(scaled_ref, 1 / (ref.sigmas[i] ** 2 + 1), prediction_type, x0, data)
        x_ref = ref.step(out, t, x_ref, generator=ref_noise).prev_sample
        noise = torch.randn(SHAPE, generator=our_noise)
        x = np.asarray(_step(sampler, _nhwc(out), i, x, _nhwc(noise)))
        worst = max(worst, np.abs(x - _nhwc(x_ref)).max())
    assert worst <= 1e-5
    assert np.abs(x).max() > 0.1  # a real trajectory, not everything collapsing to 0


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_many_step_counts(spacing):
    for num_steps in (1, 3, 20, 50, 100, 999):
        for ref_cls, name in ((DDIMScheduler, "ddim"), (EulerAncestralDiscreteScheduler, "euler_ancestral")):
            ref = ref_cls(**SD, timestep_spacing=spacing)
            ref.set_timesteps(num_steps)
            ours = make_sampler(name, _config(timestep_spacing=spacing), num_steps)
            np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy(), err_msg=f"{name} {num_steps}")


def test_from_diffusers_reads_files_like_diffusers():
    ip2p = {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.15.0.dev0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "trained_betas": None}
    sd15_pndm = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}  # fmt: skip
    for file in (ip2p, sd15_pndm, {}):
        config = SchedulerConfig.from_diffusers(file)
        for ref_cls, name in ((DDIMScheduler, "ddim"), (EulerAncestralDiscreteScheduler, "euler_ancestral")):
            ref = ref_cls.from_config(file)
            ref.set_timesteps(10)
            ours = make_sampler(name, config, 10)
            np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
            np.testing.assert_array_equal(alphas_cumprod(config), ref.alphas_cumprod.numpy())
            if name == "ddim":
                assert config.clip_sample == ref.config.clip_sample
                assert config.set_alpha_to_one == ref.config.set_alpha_to_one
    # IP2P's file has no timestep_spacing (so each sampler's diffusers default applies),
    # nor DDIM's clip_sample / set_alpha_to_one (diffusers' defaults True, unlike SD's files).
    ip2p_config = SchedulerConfig.from_diffusers(ip2p)
    assert ip2p_config.timestep_spacing is None and ip2p_config.steps_offset == 1
    assert ip2p_config.clip_sample and ip2p_config.set_alpha_to_one


@pytest.mark.parametrize(
    "bad, named",
    [({"thresholding": True}, "thresholding=True"), ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
     ({"trained_betas": [0.1] * 1000}, "trained_betas"), ({"use_karras_sigmas": True}, "use_karras_sigmas"),
     ({"solver_order": 2}, "solver_order=2 (unknown key)")],
)  # fmt: skip
def test_from_diffusers_rejects_behaviour_changes(bad, named):
    with pytest.raises(ValueError, match="do not implement") as err:
        SchedulerConfig.from_diffusers({**SD, **bad})
    assert named in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [("beta_schedule", "squaredcos_cap_v2"), ("prediction_type", "x0"), ("timestep_spacing", "karras")],
)
def test_config_rejects_unsupported_values(field, value):
    with pytest.raises(ValueError, match=f"{field}='{value}' is not supported"):
        SchedulerConfig.from_diffusers({**SD, field: value})


def test_make_sampler_errors():
    config = SchedulerConfig()
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        make_sampler("dpm", config, 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("ddim", config, 1001)
    with pytest.raises(ValueError, match="only DDIM"):
        make_sampler("euler_ancestral", config, 10, eta=0.5)
    sampler = make_sampler("EulerAncestralDiscreteScheduler", config, 10)
    with pytest.raises(ValueError, match="stochastic"):
        sampler.step(np.zeros((1, 2, 2, 4), np.float32), 0, np.zeros((1, 2, 2, 4), np.float32))


def test_saved_defaults_do_not_carry_over_between_schedulers():
    """A saved Euler config lists its default spacing in `_use_default_values`; DDIM must not inherit it."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    saved = dict(EulerAncestralDiscreteScheduler(steps_offset=1).config)
    assert "timestep_spacing" in saved["_use_default_values"]
    theirs = DDIMScheduler.from_config(saved)
    theirs.set_timesteps(5)
    ours = make_sampler("ddim", SchedulerConfig.from_diffusers(saved), 5)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), theirs.timesteps.numpy())
