"""DDIM and Euler-ancestral samplers, stepping exactly as diffusers' schedulers.

Shape legend: S inference steps, T training timesteps, x any latent shape (e.g. B, h, w, C).

`make_sampler` does all of diffusers' `set_timesteps` work on the host, in NumPy with
diffusers' float32 rules, and keeps the per-step numbers as arrays in a `Sampler`
pytree. The step functions are then pure and take the step index i as a (possibly
traced) integer, so a whole denoising loop fits in one `lax.scan`. A Sampler passed to
a jitted function as an argument recompiles only when S or its static fields change
(e.g. eta going from 0 to > 0), not when eta's value or the schedule changes.

Randomness is explicit: a stochastic step (Euler-ancestral, DDIM with eta > 0) takes
its standard-normal noise as an argument, the `variance_noise` of diffusers' DDIM and
the `randn_tensor` draw of its Euler-ancestral step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod

# Our names, and the diffusers class names that a scheduler_config.json carries.
SAMPLERS = {
    "ddim": "ddim",
    "DDIMScheduler": "ddim",
    "euler_ancestral": "euler_ancestral",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
}
DEFAULT_SPACING = {"ddim": "leading", "euler_ancestral": "linspace"}


@flax.struct.dataclass
class Sampler:
    """Precomputed schedule of one sampler for a fixed number of steps.

    timesteps: float32[S] the model's timestep at each step, equal to diffusers'
        `scheduler.timesteps` (integers for DDIM, fractional for Euler with "linspace").
    input_divisor: float32[S] `scale_model_input` divides the latents by this
        (1 for DDIM, √(σ²+1) for Euler).
    init_noise_sigma: float32[] scale of the initial standard-normal latents.
    coefficients: {name: float32[S]} the per-step scalars `step` reads.
    """

    timesteps: jax.Array
    input_divisor: jax.Array
    init_noise_sigma: jax.Array
    coefficients: dict[str, jax.Array]
    kind: str = flax.struct.field(pytree_node=False)
    prediction_type: str = flax.struct.field(pytree_node=False)
    clip_sample_range: float | None = flax.struct.field(pytree_node=False)  # None: no clipping
    stochastic: bool = flax.struct.field(pytree_node=False)  # step needs noise

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def scale_input(self, x: jax.Array, i) -> jax.Array:
        """diffusers' `scale_model_input(x, timesteps[i])`."""
        return x / self.input_divisor[i]

    def renoise(self, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
        """x0 noised to the level of the latents after step i (clean after the last step): diffusers'
        `add_noise(x0, noise, timesteps[i + 1])`, what masked sampling puts outside the mask."""
        c = self.coefficients
        return c["renoise_signal"][i] * x0.astype(jnp.float32) + c["renoise_noise"][i] * noise.astype(jnp.float32)

    def step(self, model_output: jax.Array, i, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """x_{t_i} → x_{t_{i+1}}: diffusers' `step(model_output, timesteps[i], x).prev_sample`.

        model_output, x, noise: float[x]; noise is standard normal, required when
        `stochastic` and ignored otherwise. Computed in float32, returned in x.dtype.
        """
        if self.stochastic and noise is None:
            raise ValueError(f"this {self.kind} sampler is stochastic: pass standard-normal `noise` to step()")
        coef = {name: c[i] for name, c in self.coefficients.items()}
        out, sample = model_output.astype(jnp.float32), x.astype(jnp.float32)
        noise = None if noise is None else noise.astype(jnp.float32)
        step_fn = _ddim_step if self.kind == "ddim" else _euler_ancestral_step
        return step_fn(self, coef, out, sample, noise).astype(x.dtype)


def _ddim_step(sampler: Sampler, c, out, x, noise):
    if sampler.prediction_type == "epsilon":
        x0 = (x - c["sqrt_one_minus_alpha"] * out) / c["sqrt_alpha"]
        eps = out
    elif sampler.prediction_type == "sample":
        x0 = out
        eps = (x - c["sqrt_alpha"] * out) / c["sqrt_one_minus_alpha"]
    else:  # v_prediction
        x0 = c["sqrt_alpha"] * x - c["sqrt_one_minus_alpha"] * out
        eps = c["sqrt_alpha"] * out + c["sqrt_one_minus_alpha"] * x
    if sampler.clip_sample_range is not None:
        x0 = jnp.clip(x0, -sampler.clip_sample_range, sampler.clip_sample_range)
    prev = c["sqrt_alpha_prev"] * x0 + c["direction"] * eps
    if sampler.stochastic:
        prev = prev + c["std"] * noise
    return prev


def _euler_ancestral_step(sampler: Sampler, c, out, x, noise):
    sigma = c["sigma"]
    if sampler.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif sampler.prediction_type == "sample":  # not in diffusers' Euler-ancestral (it raises)
        x0 = out
    else:  # v_prediction
        x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    derivative = (x - x0) / sigma
    return x + derivative * (c["sigma_down"] - sigma) + noise * c["sigma_up"]


def inference_timesteps(config: SchedulerConfig, num_steps: int, spacing: str, *, integer: bool) -> np.ndarray:
    """diffusers' `set_timesteps` rule: float64[S], descending.

    leading: 0, r, 2r, … (r = T // S) + steps_offset; trailing: T, T − T/S, … rounded, − 1;
    linspace: S points from 0 to T − 1, rounded only for integer (DDIM) timesteps.
    """
    n_train = config.num_train_timesteps
    if spacing == "leading":
        return (np.arange(num_steps) * (n_train // num_steps)).round()[::-1] + config.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / num_steps)) - 1
    timesteps = np.linspace(0, n_train - 1, num_steps)[::-1]
    return timesteps.round() if integer else timesteps


def _ddim_coefficients(config: SchedulerConfig, timesteps: np.ndarray, num_steps: int, eta: float):
    # Float32 NumPy mirrors diffusers' float32 torch scalars. Whatever the spacing,
    # diffusers' DDIM takes the previous timestep as t − T // S, not the next entry.
    abar = alphas_cumprod(config)
    t = timesteps.astype(np.int64)
    prev = t - config.num_train_timesteps // num_steps
    final = np.float32(1.0) if config.set_alpha_to_one else abar[0]
    alpha = abar[t]
    alpha_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    one = np.float32(1.0)
    variance = ((one - alpha_prev) / (one - alpha)) * (one - alpha / alpha_prev)
    std = np.float32(eta) * np.sqrt(variance)
    return {
        "sqrt_alpha": np.sqrt(alpha),
        "sqrt_one_minus_alpha": np.sqrt(one - alpha),
        "sqrt_alpha_prev": np.sqrt(alpha_prev),
        "direction": np.sqrt(one - alpha_prev - std**2),
        "std": std,
    }


def euler_sigmas(config: SchedulerConfig, timesteps: np.ndarray) -> np.ndarray:
    """float32[S + 1]: σ(t) = √((1 − ᾱ)/ᾱ) linearly interpolated at the timesteps, then 0."""
    abar = alphas_cumprod(config)
    train_sigmas = np.sqrt((np.float32(1.0) - abar) / abar)
    sigmas = np.interp(timesteps.astype(np.float32), np.arange(len(train_sigmas)), train_sigmas)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def make_sampler(name: str, config: SchedulerConfig, num_steps: int, *, eta: float = 0.0) -> Sampler:
    """Builds a sampler: "ddim" or "euler_ancestral" (or the diffusers class names).

    eta: DDIM's noise weight (0 deterministic DDIM, 1 DDPM-like); Euler-ancestral has none.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(map(repr, SAMPLERS))}")
    kind = SAMPLERS[name]
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {config.num_train_timesteps}], got {num_steps}")
    if eta < 0 or (eta and kind != "ddim"):
        raise ValueError(f"eta={eta} is not valid for {kind}: eta ≥ 0 and only DDIM has it")
    spacing = config.timestep_spacing or DEFAULT_SPACING[kind]
    timesteps = inference_timesteps(config, num_steps, spacing, integer=kind == "ddim")
    if kind == "ddim":
        steps = len(timesteps)
        divisor = np.ones(steps, np.float32)
        init_sigma = np.float32(1.0)
        coefficients = _ddim_coefficients(config, timesteps, num_steps, eta)
        abar_next = alphas_cumprod(config)[timesteps[1:].astype(np.int64)]
        coefficients["renoise_signal"] = np.append(np.sqrt(abar_next), np.float32(1.0))
        coefficients["renoise_noise"] = np.append(np.sqrt(np.float32(1.0) - abar_next), np.float32(0.0))
        clip = config.clip_sample_range if config.clip_sample else None
        stochastic = eta > 0
    else:
        sigmas = euler_sigmas(config, timesteps)
        sigma, sigma_to = sigmas[:-1], sigmas[1:]
        sigma_up = np.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        divisor = np.sqrt(sigma**2 + np.float32(1.0))
        largest = sigmas.max()
        init_sigma = largest if spacing in ("linspace", "trailing") else np.sqrt(largest**2 + np.float32(1.0))
        coefficients = {"sigma": sigma, "sigma_up": sigma_up, "sigma_down": np.sqrt(sigma_to**2 - sigma_up**2),
                        "renoise_signal": np.ones_like(sigma_to), "renoise_noise": sigma_to}  # fmt: skip
        clip, stochastic = None, True
    return Sampler(
        timesteps=jnp.asarray(timesteps, jnp.float32),
        input_divisor=jnp.asarray(divisor, jnp.float32),
        init_noise_sigma=jnp.asarray(init_sigma, jnp.float32),
        coefficients={k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()},
        kind=kind,
        prediction_type=config.prediction_type,
        clip_sample_range=clip,
        stochastic=stochastic,
    )
