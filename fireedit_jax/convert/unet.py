"""diffusers UNet2DConditionModel state dict → our UNet params (models/unet.py).

Key mapping: `down_blocks.0.resnets.1.conv1.weight` → params/down_blocks_0/resnets_1/conv1/kernel;
`downsamplers.0.conv` → downsampler, `upsamplers.0.conv` → upsampler, `to_out.0` → to_out,
`ff.net.0.proj` / `ff.net.2` → ff/proj_in / ff/proj_out; conv weights OIHW → HWIO, Linear
weights transposed, norm weights → scale. The visual branch (to_k_ip, to_v_ip) is not in
SD checkpoints: it is left out here and filled by `models.unet.init_visual_from_text`.
GLIGEN's gated self-attention (`fuser`, with its scalar `alpha_attn` / `alpha_dense` gates)
converts where the checkpoint has it (attention_type="gated"); for an SD / IP2P checkpoint
converted into a UNet with gated_injection it is absent and left to a fresh init (the
`GATED_INJECTION` leaves). GLIGEN's `position_net` (box + phrase grounding tokens) is not
ours: the mask encoder makes the grounding tokens here, so its keys are ignored.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.unet import UNet
from fireedit_jax.models.unet_config import UNetConfig

VISUAL_BRANCH = (r"/to_k_ip/", r"/to_v_ip/")
GATED_INJECTION = (r"/fuser/",)
IGNORED = (r"^position_net\.",)

_RENAMES = (
    ("downsamplers.0.conv.", "downsampler."),
    ("upsamplers.0.conv.", "upsampler."),
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj_in."),
    (".ff.net.2.", ".ff.proj_out."),
)


def flax_path(key: str, ndim: int) -> tuple[tuple[str, ...], core.Transform] | None:
    """A diffusers key and its tensor rank → (our param path, transform), or None for other suffixes."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    *modules, leaf = re.sub(r"\.(\d+)(?=\.)", r"_\1", key).split(".")  # resnets.1.conv1 → resnets_1.conv1
    # positional_embedding: the add embedding's AttentionPooling; alpha_*: the fusers' gates
    if leaf in ("bias", "positional_embedding", "alpha_attn", "alpha_dense"):
        return ("params", *modules, leaf), core.identity
    if leaf != "weight":
        return None
    if ndim == 1:  # GroupNorm / LayerNorm
        return ("params", *modules, "scale"), core.identity
    return ("params", *modules, "kernel"), core.conv2d if ndim == 4 else core.linear


def abstract_params(config: UNetConfig, dtype=jnp.float32):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    model = UNet(config, param_dtype=dtype)
    size = 2 ** (len(config.block_out_channels) - 1)
    return jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, config.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, config.cross_attention_dim)),
    )


def convert_unet(state_dict, config: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel weights (from `core.load_state_dict`) → {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every
    parameter without a source and every shape mismatch. With `config.decoupled`
    the visual branch is absent from the result (see `init_visual_from_text`); with
    `config.gated_injection` the fusers are, when the checkpoint has none.
    """
    expected = abstract_params(config)
    known = core.flat_shapes(expected)

    def rename(key, value):
        target = flax_path(key, np.ndim(value))
        # Keys whose path the model lacks are reported as unexpected, under their own name.
        return target if target is not None and target[0] in known else None

    fresh = VISUAL_BRANCH if config.decoupled else ()
    if config.gated_injection and not any(".fuser." in key for key in state_dict):
        fresh += GATED_INJECTION
    return core.convert(
        state_dict, rename, expected, ignore=IGNORED, fresh=fresh, what="UNet2DConditionModel checkpoint"
    )


def verify_unet(torch_unet, params, config: UNetConfig, seed: int = 0, *, batch: int = 2, size: int | None = None) -> float:
    """Max abs difference between a diffusers UNet and ours on the same random inputs.

    Args:
      torch_unet: a diffusers UNet2DConditionModel or a directory saved by it.
      params: our converted params ({"params": ...}); any visual branch is unused.
      size: latent side length; by default the smallest the UNet accepts times 4.
    A gated (GLIGEN) UNet is run with grounding: random boxes and phrase embeddings through
    the torch model's position_net give the tokens both UNets read.
    """
    import torch
    from diffusers import UNet2DConditionModel

    if isinstance(torch_unet, str):
        torch_unet = UNet2DConditionModel.from_pretrained(torch_unet)
    torch_unet = torch_unet.float().eval()
    size = size or 4 * 2 ** (len(config.block_out_channels) - 1)
    rng = np.random.default_rng(seed)
    sample = rng.normal(size=(batch, size, size, config.in_channels)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, size=batch).astype(np.float32)
    context = rng.normal(size=(batch, 77, config.cross_attention_dim)).astype(np.float32)
    kwargs, grounding = {}, None
    if config.gated_injection:
        corners = np.sort(rng.uniform(size=(batch, 3, 2, 2)), axis=2).astype(np.float32)  # x0 < x1, y0 < y1
        gligen = {
            "boxes": torch.from_numpy(corners.reshape(batch, 3, 4)),  # [x0, y0], [x1, y1]
            "masks": torch.tensor([[1.0, 1.0, 0.0]] * batch),  # the last object is padding
            "positive_embeddings": torch.from_numpy(
                rng.normal(size=(batch, 3, config.cross_attention_dim)).astype(np.float32)
            ),
        }
        with torch.no_grad():
            grounding = torch_unet.position_net(**gligen).numpy()
        kwargs["cross_attention_kwargs"] = {"gligen": gligen}
    with torch.no_grad():
        want = torch_unet(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps), torch.from_numpy(context), **kwargs
        ).sample.permute(0, 2, 3, 1).numpy()
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, sample, timesteps, context, None, grounding)
    return float(np.max(np.abs(np.asarray(got) - want)))


@functools.lru_cache(maxsize=8)
def _forward(config: UNetConfig):
    """One jitted forward per config, so repeated checks trace and compile once."""
    return jax.jit(UNet(config).apply)
