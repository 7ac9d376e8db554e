"""diffusers AutoencoderKL state dict → our VAE params (models/vae.py).

Key mapping as for the UNet (convert/unet.py): `encoder.down_blocks.0.resnets.1.conv1.weight`
→ params/encoder/down_blocks_0/resnets_1/conv1/kernel, `downsamplers.0.conv` → downsampler,
`upsamplers.0.conv` → upsampler, `to_out.0` → to_out. Checkpoints saved before diffusers
0.14 name the mid-block attention `query/key/value/proj_attn`, and some store its
projections as 1×1 conv weights [out, in, 1, 1]: both are accepted.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.convert.unet import flax_path
from fireedit_jax.models.vae import VAE, VAEConfig

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}
# Fields that change the weights; scaling_factor and shift_factor only scale latents.
_ARCHITECTURE = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)


def _attention_key(key: str) -> str:
    """Renames the pre-0.14 mid-block attention projections to today's names."""
    return re.sub(
        r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
        lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + ".",
        key,
    )


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
    """A 1×1 conv weight [out, in, 1, 1] used as a Linear → the Linear's [out, in]."""
    return w.reshape(w.shape[:2]) if w.ndim == 4 else w


def abstract_params(config: VAEConfig, dtype=jnp.float32):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    size = config.downsample_factor
    return jax.eval_shape(VAE(config, param_dtype=dtype).init, jax.random.key(0), jnp.zeros((1, size, size, config.in_channels)))


def convert_vae(state_dict, config: VAEConfig) -> dict:
    """diffusers AutoencoderKL weights (from `core.load_state_dict`) → {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every
    parameter without a source and every shape mismatch.
    """
    expected = abstract_params(config)
    known = core.flat_shapes(expected)

    def rename(key, value):
        key = _attention_key(key)
        attention = re.search(r"\.attentions\.\d+\.to_(q|k|v|out)\.weight$", key)
        if attention:
            path, _ = flax_path(key, 2)
            target = path, lambda w: core.linear(_squeeze_1x1(w))
        else:
            target = flax_path(key, np.ndim(value))
        # Keys whose path the model lacks are reported as unexpected, under their own name.
        return target if target is not None and target[0] in known else None

    return core.convert(state_dict, rename, expected, what="AutoencoderKL checkpoint")


def check_diffusers_config(diffusers_config: dict, config: VAEConfig, what: str = "AutoencoderKL checkpoint") -> None:
    """Raises `core.ConversionError` naming every architecture field where config.json and ours differ."""
    theirs = VAEConfig.from_diffusers(diffusers_config)
    core.check_config(what, {name: (getattr(theirs, name), getattr(config, name)) for name in _ARCHITECTURE})


def load_vae(path: str, config: VAEConfig) -> dict:
    """A diffusers VAE directory (config.json + weights) or weights file → params.

    A config.json beside the weights is checked against `config` first.
    """
    beside = core.config_beside(path)
    if beside is not None:
        check_diffusers_config(beside, config, what=f"checkpoint {path!r}")
    return convert_vae(core.load_state_dict(path), config)


def verify_vae(torch_vae, params, config: VAEConfig, seed: int = 0, *, batch: int = 2, size: int | None = None) -> float:
    """Max abs difference between a diffusers AutoencoderKL and ours on the same random inputs.

    Compares the posterior's mean and logvar for random images and the decoded
    image for random latents.

    Args:
      torch_vae: a diffusers AutoencoderKL or a directory saved by it.
      params: our converted params ({"params": ...}).
      size: image side length; by default 4 × the downsampling factor.
    """
    import torch
    from diffusers import AutoencoderKL

    if isinstance(torch_vae, str):
        torch_vae = AutoencoderKL.from_pretrained(torch_vae)
    check_diffusers_config(dict(torch_vae.config), config, what="the torch AutoencoderKL")
    torch_vae = torch_vae.float().eval()
    size = size or 4 * config.downsample_factor
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(batch, size, size, config.in_channels)).astype(np.float32)
    latents = rng.normal(size=(batch, size // config.downsample_factor, size // config.downsample_factor, config.latent_channels))
    latents = latents.astype(np.float32)
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # noqa: E731
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(images)).latent_dist
        want = (nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(torch_vae.decode(nchw(latents)).sample))
    encode, decode = _functions(config)
    with jax.default_matmul_precision("highest"):
        got = (*encode(params, images), decode(params, latents))
    return max(float(np.max(np.abs(np.asarray(g) - w))) for g, w in zip(got, want))


@functools.lru_cache(maxsize=8)
def _functions(config: VAEConfig):
    """Jitted encode and decode per config, so repeated checks trace and compile once."""
    model = VAE(config)
    encode = jax.jit(lambda params, x: model.apply(params, x, method=VAE.encode))
    decode = jax.jit(lambda params, z: model.apply(params, z, method=VAE.decode))
    return encode, decode
