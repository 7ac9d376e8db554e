"""A diffusers InstructPix2Pix (or Stable Diffusion) directory → one fireedit_jax checkpoint directory.

    SRC/unet/ SRC/vae/ SRC/text_encoder/ SRC/tokenizer/ SRC/scheduler/

The UNet's input channels say what it is: 8 InstructPix2Pix (noisy ‖ source latents, dual
guidance), 9 SD inpainting (noisy ‖ mask ‖ masked-image latents, text guidance; every edit
needs a mask), 4 SD text-to-image (text guidance; it edits by masked sampling under a mask).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fireedit_jax import checkpoint
from fireedit_jax.convert import clip as clip_convert
from fireedit_jax.convert import core
from fireedit_jax.convert import unet as unet_convert
from fireedit_jax.convert import vae as vae_convert
from fireedit_jax.diffusion.samplers import SAMPLERS
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.unet_config import UNetConfig
from fireedit_jax.models.vae import VAEConfig

SUBDIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is missing")
    with open(path) as f:
        return json.load(f)


def ip2p_config(src: str) -> ml_collections.ConfigDict:
    """Our config from the diffusers directory's config files."""
    missing = [d for d in SUBDIRS if not os.path.isdir(os.path.join(src, d))]
    if missing:
        raise FileNotFoundError(
            f"{src!r} is not a diffusers InstructPix2Pix directory: missing {', '.join(d + '/' for d in missing)}"
        )
    unet = UNetConfig.from_diffusers(_read_json(os.path.join(src, "unet", "config.json")))
    vae = VAEConfig.from_diffusers(_read_json(os.path.join(src, "vae", "config.json")))
    text = CLIPTextConfig.from_hf(_read_json(os.path.join(src, "text_encoder", "config.json")))
    scheduler_json = _read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    sampler = SAMPLERS.get(scheduler_json.get("_class_name"))
    if sampler is None:
        warnings.warn(f"scheduler {scheduler_json.get('_class_name')} is not implemented here; editing defaults to Euler-ancestral")
        sampler = "euler_ancestral"
    scheduler = SchedulerConfig.from_diffusers(scheduler_json)
    unet_json = _read_json(os.path.join(src, "unet", "config.json"))
    latent = vae.latent_channels
    layouts = {2 * latent: "source", 2 * latent + 1: "masked", latent: "none"}
    if unet.in_channels not in layouts:
        raise ValueError(f"{src}/unet has {unet.in_channels} input channels: expected {2 * latent} (InstructPix2Pix), "
                         f"{2 * latent + 1} (SD inpainting) or {latent} (Stable Diffusion)")  # fmt: skip
    config = ml_collections.ConfigDict()
    config.resolution = int(unet_json.get("sample_size", 64)) * vae.downsample_factor
    config.model = ml_collections.ConfigDict(
        {
            "conditioner": "clip_text",
            "unet": dataclasses.asdict(unet),
            "vae": dataclasses.asdict(vae),
            "text_encoder": dataclasses.asdict(text),
            "scheduler": dataclasses.asdict(scheduler),
            "sampler": sampler,
            "image_condition": layouts[unet.in_channels],
        }
    )
    return config


def convert_ip2p(src: str, out: str, *, verify: bool = False) -> dict[str, float]:
    """Converts SRC into the checkpoint directory OUT; returns {network: max abs error} if verify."""
    config = ip2p_config(src)
    model = EditModel.from_config(config.model)
    params = {
        "unet": unet_convert.convert_unet(core.load_state_dict(os.path.join(src, "unet")), model.unet.config)["params"],
        "vae": vae_convert.load_vae(os.path.join(src, "vae"), model.vae.config)["params"],
        "text_encoder": clip_convert.load_clip_text(os.path.join(src, "text_encoder"), model.text_encoder.config)[
            "params"
        ],
    }
    params["null_text"] = null_text(src, model.text_encoder.config, params["text_encoder"])
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    checkpoint.save(out, params, config, tokenizer_dir=os.path.join(src, "tokenizer"))
    errors = {}
    if verify:
        errors = verify_ip2p(src, params, model)
    return errors


def null_text(src: str, text_config: CLIPTextConfig, text_params) -> np.ndarray:
    """float32[L, D]: the CLIP text encoder's last hidden states of "" — the text-null condition."""
    from fireedit_jax.pipeline import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(src, "tokenizer"))
    length = text_config.max_position_embeddings
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True).input_ids
    with jax.default_matmul_precision("highest"):
        out = CLIPTextModel(text_config).apply({"params": text_params}, jnp.asarray(ids, jnp.int32))
    return np.asarray(out.last_hidden_state[0], np.float32)


def verify_ip2p(src: str, params, model: EditModel) -> dict[str, float]:
    """Runs each torch network and ours on random inputs: {network: max abs error}."""
    return {
        "unet": unet_convert.verify_unet(os.path.join(src, "unet"), {"params": params["unet"]}, model.unet.config),
        "vae": vae_convert.verify_vae(os.path.join(src, "vae"), {"params": params["vae"]}, model.vae.config),
        "text_encoder": clip_convert.verify_clip_text(
            os.path.join(src, "text_encoder"), {"params": params["text_encoder"]}, model.text_encoder.config
        ),
    }
