"""The Stable Diffusion VAE (diffusers' AutoencoderKL): image ⇄ latent.

Shapes: B batch, H/W image height/width, h/w latent height/width (H/2^(levels−1)),
C channels, Z latent channels, T = h·w tokens of the mid-block attention.
Images and feature maps are NHWC; images are in [−1, 1].

The encoder gives a diagonal Gaussian over latents: `encode` returns its (mean,
logvar); the deterministic latent (diffusers' `latent_dist.mode()`) is the mean.
Diffusion models work on `scaling_factor · (z − shift_factor)`; `encode`/`decode`
work on unscaled z, as diffusers' do.

`VAEConfig.pixel_unshuffle = f > 0` swaps the learned networks for a fixed, exactly
invertible space-to-depth by f (no parameters, latent channels 3·f², a zero-variance
posterior): models trained from scratch (the ShapeEdit demo) then need no autoencoder
training and lose nothing in reconstruction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import conv, dense
from fireedit_jax.nn.norms import GroupNorm

Dtype = Any

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
NORM_EPS = 1e-6  # diffusers' VAE uses 1e-6 in every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this

# diffusers AutoencoderKL fields that only change how latents are used, not the network.
_INERT_DIFFUSERS_FIELDS = ("sample_size", "force_upcast", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Dimensions of an AutoencoderKL; defaults are Stable Diffusion 1.5's.

    `block_out_channels` lists the widths from the highest resolution down; the
    image is downsampled 2^(levels−1) times. The encoder has `layers_per_block`
    resnets per level, the decoder one more (as diffusers).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # None: no shift (SD1.x)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    pixel_unshuffle: int = 0  # f > 0: the fixed space-to-depth autoencoder (module docstring)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        f = self.pixel_unshuffle
        if f and self.latent_channels != self.in_channels * f * f:
            raise ValueError(f"pixel_unshuffle={f} makes {self.in_channels * f * f} latent channels, "
                             f"not latent_channels={self.latent_channels}")  # fmt: skip
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} do not split into {self.norm_num_groups} norm groups")

    @property
    def downsample_factor(self) -> int:
        return self.pixel_unshuffle or 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls, **overrides) -> VAEConfig:
        """Stable Diffusion 1.5's VAE (also InstructPix2Pix's): 8× downsampling, 4 latent channels."""
        return cls(**overrides)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers AutoencoderKL config dict (its config.json).

        Raises ValueError naming every field set to something this VAE does not implement.
        """
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        levels = len(config.get("block_out_channels", (64,)))
        fixed = {
            "act_fn": (config.get("act_fn", "silu"), "silu"),
            "down_block_types": (tuple(config.get("down_block_types", (DOWN_BLOCK,))), (DOWN_BLOCK,) * levels),
            "up_block_types": (tuple(config.get("up_block_types", (UP_BLOCK,))), (UP_BLOCK,) * levels),
        }
        problems = [f"{k}={theirs!r} (supported: {want!r})" for k, (theirs, want) in fixed.items() if theirs != want]
        names = {f.name for f in dataclasses.fields(cls)}
        problems += [f"{k} (unknown field)" for k in sorted(set(config) - names - set(fixed) - set(_INERT_DIFFUSERS_FIELDS))]
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
        # diffusers' class defaults, where they differ from ours (SD1.5's), for fields config.json leaves out.
        defaults = {"block_out_channels": (64,), "layers_per_block": 1}
        return cls(**{**defaults, **{k: v for k, v in config.items() if k in names}})


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3×3 conv, GroupNorm, SiLU, 3×3 conv, + (1×1 conv) shortcut; no time input."""

    config: VAEConfig
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: float[B, H, W, Cin] → float[B, H, W, out_channels]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GroupNorm(self.config.norm_num_groups, NORM_EPS, name=name, **kw)  # noqa: E731
        h = conv(self.out_channels, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
        h = conv(self.out_channels, name="conv2", **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over all positions: GroupNorm, q/k/v, attend, to_out, + input."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x):
        """x: float[B, h, w, C] → float[B, h, w, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        h = GroupNorm(self.config.norm_num_groups, NORM_EPS, name="group_norm", **kw)(x).reshape(b, height * width, 1, c)
        q, k, v = (dense(c, ("embed", "heads"), name=name, **kw)(h) for name in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v, implementation=self.attention).reshape(b, height, width, c)
        return x + dense(c, ("heads", "embed"), name="to_out", **kw)(out)


class Level(nn.Module):
    """One resolution level: `num_resnets` resnets, then a stride-2 conv ("down"), ×2 nearest + conv ("up") or nothing."""

    config: VAEConfig
    channels: int
    num_resnets: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_resnets):
            x = ResnetBlock(self.config, self.channels, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            # diffusers pads right and bottom only, then a stride-2 unpadded conv.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = conv(self.channels, strides=2, padding=0, name="downsampler", **kw)(x)
        elif self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = conv(self.channels, name="upsampler", **kw)(x)
        return x


class MidBlock(nn.Module):
    """resnet, (attention,) resnet at the lowest resolution."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels[-1]
        x = ResnetBlock(cfg, channels, name="resnets_0", **kw)(x)
        if cfg.mid_block_add_attention:
            x = SpatialSelfAttention(cfg, attention=self.attention, name="attentions_0", **kw)(x)
        return ResnetBlock(cfg, channels, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """Image → 2·Z channels (mean ‖ logvar) at 1/2^(levels−1) resolution, before quant_conv."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x):
        """x: float[B, H, W, in_channels] → float[B, h, w, 2·Z]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype))
        for i, channels in enumerate(cfg.block_out_channels):
            resample = "down" if i < levels - 1 else None
            x = Level(cfg, channels, cfg.layers_per_block, resample, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg, attention=self.attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent (after post_quant_conv) → image."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, z):
        """z: float[B, h, w, Z] → float[B, H, W, out_channels]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = cfg.block_out_channels[::-1]  # lowest resolution first
        x = conv(widths[0], name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(cfg, attention=self.attention, name="mid_block", **kw)(x)
        for u, channels in enumerate(widths):
            resample = "up" if u < len(widths) - 1 else None
            x = Level(cfg, channels, cfg.layers_per_block + 1, resample, name=f"up_blocks_{u}", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, name="conv_out", **kw)(x)


class VAE(nn.Module):
    """AutoencoderKL. Call `apply(params, x, method=VAE.encode)` / `method=VAE.decode`."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    def setup(self):
        cfg = self.config
        if cfg.pixel_unshuffle:
            return
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, attention=self.attention, **kw)
        self.decoder = Decoder(cfg, attention=self.attention, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, padding=0, **kw)

    def encode(self, x):
        """x: float[B, H, W, 3] in [−1, 1] → (mean, logvar): float32[B, h, w, Z] each.

        mean is the posterior's mode; logvar is clamped to [−30, 20] as in diffusers.
        """
        if self.config.pixel_unshuffle:
            mean = space_to_depth(x.astype(jnp.float32), self.config.pixel_unshuffle)
            return mean, jnp.full_like(mean, LOGVAR_RANGE[0])
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z: float[B, h, w, Z] (unscaled latents) → float[B, H, W, 3], nominally in [−1, 1]."""
        if self.config.pixel_unshuffle:
            return depth_to_space(z, self.config.pixel_unshuffle)
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        """Reconstruction through the posterior's mode (also creates every parameter at init)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def space_to_depth(x, f: int):
    """float[B, H, W, C] → float[B, H/f, W/f, f·f·C]: each f × f patch onto channels (row, column, channel order)."""
    b, height, width, c = x.shape
    x = x.reshape(b, height // f, f, width // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height // f, width // f, f * f * c)


def depth_to_space(z, f: int):
    """The inverse of `space_to_depth`: float[B, h, w, f·f·C] → float[B, h·f, w·f, C]."""
    b, height, width, channels = z.shape
    z = z.reshape(b, height, width, f, f, channels // (f * f)).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, height * f, width * f, channels // (f * f))


def sample_posterior(rng, mean, logvar):
    """A draw z = mean + exp(logvar / 2)·ε, ε ~ N(0, 1): float32, shaped as mean."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)


def scale_latents(z, config: VAEConfig):
    """Unscaled VAE latents → the diffusion model's latent space: (z − shift)·scaling_factor."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents, config: VAEConfig):
    """The inverse of `scale_latents`, before `decode`."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)
