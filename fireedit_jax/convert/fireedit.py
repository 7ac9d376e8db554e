"""A complete initial FireEdit checkpoint from its pretrained parts.

    --ip2p DIR         diffusers InstructPix2Pix (UNet, VAE, scheduler; its CLIP text encoder
                       only computes the text-null constant CLIP("") and is not kept)
    --llm DIR          LLaMA / Vicuna / LLaVA (transformers or original layout) + tokenizer
    --dinov2 DIR       transformers Dinov2Model
    --clip-vision DIR  transformers CLIPVisionModel / CLIPModel (HVCA's CLIP features)
    --groma FILE       optional: Groma weights for the region encoder

New modules (adapter, Q-Former, TATI, HVCA, the region encoder without --groma, LoRA,
the new token rows) are initialised; the UNet's K2/V2 are copied from K1/V1.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax
import jax
import ml_collections
import numpy as np

from fireedit_jax import checkpoint, storage
from fireedit_jax.convert import clip as clip_convert
from fireedit_jax.convert import core
from fireedit_jax.convert import dinov2 as dinov2_convert
from fireedit_jax.convert import groma as groma_convert
from fireedit_jax.convert import llama as llama_convert
from fireedit_jax.convert import unet as unet_convert
from fireedit_jax.convert import vae as vae_convert
from fireedit_jax.convert.ip2p import ip2p_config, null_text
from fireedit_jax.data.tokenizer import NEW_TOKENS, load_tokenizer
from fireedit_jax.data.vlm_inputs import DEFAULT_BOX_BUCKETS, DEFAULT_LENGTH_BUCKETS
from fireedit_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.hvca import HVCAConfig
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.qformer import QFormerConfig
from fireedit_jax.models.regions import RegionEncoderConfig
from fireedit_jax.models.tati import TATIConfig
from fireedit_jax.models.unet import init_visual_from_text



def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is missing")
    with open(path) as f:
        return json.load(f)


def bridge_configs(llm: LlamaConfig, vision: DINOv2Config, clip_vision: CLIPVisionConfig, context: tuple[int, int],
                   *, small: bool = False) -> dict:  # fmt: skip
    """The new modules' configs, their widths tied to the pretrained parts'.

    context: (L, D) of the UNet's text condition (77, 768 for SD1.5).
    """
    length, width = context
    heads = 4 if small else None

    def maybe(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    return {
        "qformer": QFormerConfig.smartedit(num_queries=length, hidden_size=width, encoder_width=llm.hidden_size,
                                           **maybe(num_heads=heads, intermediate_size=4 * width if small else None)),
        "tati": TATIConfig.fireedit(width=width, input_dim=width, time_embed_dim=width,
                                    **maybe(num_heads=heads, time_channel=width if small else None)),
        "hvca": HVCAConfig.fireedit(visual_dim=vision.hidden_size, edit_dim=width, out_dim=width,
                                    **maybe(num_heads=heads, hidden=vision.hidden_size if small else None)),
        "regions": RegionEncoderConfig.groma(feature_dim=vision.hidden_size, llm_dim=llm.hidden_size,
                                             patch_size=vision.patch_size) if not small else
                   RegionEncoderConfig.tiny(feature_dim=vision.hidden_size, llm_dim=llm.hidden_size,
                                            patch_size=vision.patch_size),
    }  # fmt: skip


def fireedit_config(ip2p: str, llm: str, dinov2: str, clip_vision: str, *, use_regions: bool = True,
                    use_tati: bool = True, use_hvca: bool = True, vlm_image_size: int = 448,
                    hvca_sizes: tuple[int, ...] = (224, 448), small: bool = False) -> ml_collections.ConfigDict:  # fmt: skip
    """Our config from the source directories' config files."""
    config = ip2p_config(ip2p)
    model = config.model
    unet = dict(model.unet.to_dict(), decoupled=use_hvca)
    llm_cfg = LlamaConfig.from_hf(_read_json(os.path.join(llm, "config.json")), num_new_tokens=len(NEW_TOKENS))
    vision = DINOv2Config.from_hf(_read_json(os.path.join(dinov2, "config.json")))
    clip_cfg = CLIPVisionConfig.from_hf(_read_json(os.path.join(clip_vision, "config.json")))
    if clip_cfg.hidden_size != vision.hidden_size:
        raise ValueError(f"HVCA concatenates CLIP ({clip_cfg.hidden_size}) and DINOv2 ({vision.hidden_size}) "
                         "features: their widths must agree")  # fmt: skip
    bridges = bridge_configs(llm_cfg, vision, clip_cfg, (model.text_encoder.max_position_embeddings, unet["cross_attention_dim"]),
                             small=small)  # fmt: skip
    config.model = ml_collections.ConfigDict({
        "conditioner": "vlm", "unet": unet, "vae": model.vae.to_dict(), "scheduler": model.scheduler.to_dict(),
        "sampler": model.sampler, "llm": dataclasses.asdict(llm_cfg), "vision": dataclasses.asdict(vision),
        "clip_vision": dataclasses.asdict(clip_cfg), "use_regions": use_regions, "use_tati": use_tati,
        "use_hvca": use_hvca, "vlm_image_size": vlm_image_size, "hvca_sizes": tuple(hvca_sizes), "merge": 2,
        **{name: dataclasses.asdict(cfg) for name, cfg in bridges.items()},
    })  # fmt: skip
    config.data = ml_collections.ConfigDict(
        {"length_buckets": DEFAULT_LENGTH_BUCKETS, "box_buckets": DEFAULT_BOX_BUCKETS}
    )
    return config


def convert_fireedit(ip2p: str, llm: str, dinov2: str, clip_vision: str, out: str, *, groma: str | None = None,
                     verify: bool = False, seed: int = 0, **options) -> dict[str, float]:  # fmt: skip
    """Writes the checkpoint directory OUT; returns {network: max abs error} if verify."""
    config = fireedit_config(ip2p, llm, dinov2, clip_vision, **options)
    if groma is not None:  # Groma's weights were trained with its box-format and stride quirks
        config.model.regions.groma_compat = True
    model = EditModel.from_config(config.model)
    fresh = jax.jit(model.init)(jax.random.key(seed))
    params = jax.tree.map(np.asarray, flax.linen.meta.unbox(fresh))
    unet = unet_convert.convert_unet(core.load_state_dict(os.path.join(ip2p, "unet")),
                                     dataclasses.replace(model.unet.config, decoupled=False))["params"]  # fmt: skip
    params["unet"] = init_visual_from_text(unet) if model.unet.config.decoupled else unet
    params["vae"] = vae_convert.load_vae(os.path.join(ip2p, "vae"), model.vae.config)["params"]
    vlm = dict(params["vlm"])
    vlm["llm"] = llama_convert.load_llama(llm, model.vlm.llm, seed=seed)["params"]
    vlm["vision"] = dinov2_convert.load_dinov2(dinov2, model.vlm.vision)["params"]
    if groma is not None and model.vlm.regions is not None:
        vlm["regions"] = groma_convert.load_groma(groma, model.vlm.regions)[0]["params"]
    params["vlm"] = vlm
    if model.hvca is not None:
        params["clip_vision"] = clip_convert.load_clip_vision(clip_vision, model.clip_vision.config)["params"]
    text_config = CLIPTextConfig.from_hf(_read_json(os.path.join(ip2p, "text_encoder", "config.json")))
    text_params = clip_convert.load_clip_text(os.path.join(ip2p, "text_encoder"), text_config)["params"]
    params["null_text"] = null_text(ip2p, text_config, text_params)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    differences = checkpoint.tree_differences(params, jax.eval_shape(model.init, jax.random.key(0)))
    if differences:
        raise core.ConversionError("assembled FireEdit params do not match the model: " + "; ".join(differences))
    tokenizer, _ = load_tokenizer(llm, model.vlm.llm.vocab_size)
    checkpoint.save(out, params, config)
    with storage.staged(os.path.join(out, "tokenizer")) as local:  # transformers writes local files only
        tokenizer.save_pretrained(local)
    errors = {}
    if verify:
        errors = {
            "unet": unet_convert.verify_unet(os.path.join(ip2p, "unet"), {"params": unet},
                                             dataclasses.replace(model.unet.config, decoupled=False)),
            "vae": vae_convert.verify_vae(os.path.join(ip2p, "vae"), {"params": params["vae"]}, model.vae.config),
            "llm": llama_convert.verify_llama(llm, {"params": vlm["llm"]}, model.vlm.llm),
            "dinov2": dinov2_convert.verify_dinov2(dinov2, {"params": vlm["vision"]}, model.vlm.vision),
        }  # fmt: skip
        if model.hvca is not None:
            errors["clip_vision"] = clip_convert.verify_clip_vision(
                clip_vision, {"params": params["clip_vision"]}, model.clip_vision.config
            )
    return errors
