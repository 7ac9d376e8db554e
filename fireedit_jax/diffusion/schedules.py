"""DDPM noise schedules (Stable Diffusion's) and the scheduler configuration.

Shape legend: T training timesteps (1000 for SD).

The arrays are computed in NumPy on the host, reproducing PyTorch's float32 arithmetic
(diffusers builds them with `torch.linspace` and `torch.cumprod`), so `betas` and
`alphas_cumprod` equal diffusers' bit for bit and samplers built on them step exactly
like diffusers' schedulers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # sample: the UNet predicts x0
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# What a diffusers scheduler uses for a key missing from its config dict (the
# constructor defaults of DDIMScheduler / EulerAncestralDiscreteScheduler), so that
# `from_diffusers` reads a file exactly as `Scheduler.from_config` would.
_DIFFUSERS_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    timestep_spacing=None,  # DDIM: "leading", Euler-ancestral: "linspace"
    steps_offset=0,
    set_alpha_to_one=True,
    clip_sample=True,
    clip_sample_range=1.0,
)

# Keys that never change DDIM / Euler-ancestral sampling (bookkeeping, or options of
# other schedulers that those two ignore in `from_config`).
_IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_use_default_values",
        "skip_prk_steps",  # PNDM
        "variance_type",  # DDPM
        "dynamic_thresholding_ratio",  # only read when thresholding=True
        "sample_max_value",  # only read when thresholding=True
    }
)

# Keys whose neutral value is accepted; any other value changes the schedule or the
# step in a way this implementation does not reproduce.
_NEUTRAL_VALUES = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "sigma_min": None,
    "sigma_max": None,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The DDPM training schedule plus the diffusers options that shape sampling.

    Defaults are Stable Diffusion 1.5's / InstructPix2Pix's scheduler files
    (scaled-linear betas 0.00085 → 0.012 over 1000 steps, ε-prediction, steps_offset 1,
    no clipping, final ᾱ = ᾱ_0).
    timestep_spacing None means the sampler's diffusers default: "leading" for DDIM,
    "linspace" for Euler-ancestral. set_alpha_to_one and clip_sample* are DDIM-only
    (diffusers' Euler-ancestral has neither).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> SchedulerConfig:
        """Reads a diffusers `scheduler_config.json` dict.

        Missing keys take diffusers' constructor defaults. Bookkeeping keys and options
        of other schedulers that DDIM / Euler-ancestral ignore are skipped; any key that
        would change sampling in a way not implemented here raises ValueError naming it.
        Keys listed in `_use_default_values` count as missing, as in diffusers' `from_config`
        (so an Euler config's saved default spacing does not become DDIM's).
        """
        config = {k: v for k, v in config.items() if k not in config.get("_use_default_values", ())}
        unsupported = {
            key: value
            for key, value in config.items()
            if key in _NEUTRAL_VALUES and value != _NEUTRAL_VALUES[key]
        }
        known = set(_DIFFUSERS_DEFAULTS) | _IGNORED_KEYS | set(_NEUTRAL_VALUES)
        unknown = sorted(set(config) - known)
        if unsupported or unknown:
            problems = [f"{k}={v!r} (supported: {_NEUTRAL_VALUES[k]!r})" for k, v in sorted(unsupported.items())]
            problems += [f"{k}={config[k]!r} (unknown key)" for k in unknown]
            raise ValueError(
                "scheduler config has options that DDIM / Euler-ancestral here do not implement: "
                + "; ".join(problems)
                + ". Remove them or set them to the supported value if the model does not need them."
            )
        values = {key: config.get(key, default) for key, default in _DIFFUSERS_DEFAULTS.items()}
        return cls(**values)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), bit for bit.

    torch computes step = (end − start)/(steps − 1) in float32, then the first half as
    start + i·step and the second as end − (steps − 1 − i)·step with one rounding
    (a fused multiply-add); float64 holds the float32 product exactly.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32])
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + step * i
    second = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def betas(config: SchedulerConfig) -> np.ndarray:
    """float32[T] DDPM betas: linear, or scaled-linear (linear in √β, SD's schedule)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    return _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32[T] ᾱ_t = Π_{s≤t} (1 − β_s); accumulated in float64 as torch.cumprod does on CPU."""
    alphas = np.float32(1.0) - betas(config)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)
