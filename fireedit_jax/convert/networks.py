"""One network at a time: `fireedit-jax convert NETWORK --src DIR --out DIR [--verify]`.

For checking a checkpoint of your own against its PyTorch original, or converting a
part once and reusing it. SRC is a transformers / diffusers directory (config.json +
weights); OUT gets config.json ({"network": ..., "config": {...}}), params/ and, when SRC
holds tokenizer files (a T5 or CLIP text directory often does), tokenizer/ with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, NamedTuple

import ml_collections

from fireedit_jax import checkpoint
from fireedit_jax.convert import clip, core, dinov2, llama, qformer, t5, unet, vae, vit
from fireedit_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.qformer import QFormerConfig
from fireedit_jax.models.t5 import T5EncoderConfig
from fireedit_jax.models.unet_config import UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.models.vit import ViTConfig


class Network(NamedTuple):
    config: Callable[[dict], Any]  # config.json dict → our config
    load: Callable[[str, Any], dict]  # (src, config) → {"params": ...}
    verify: Callable[[str, dict, Any], float]  # (src, params, config) → max abs error


NETWORKS: dict[str, Network] = {
    "unet": Network(UNetConfig.from_diffusers, lambda src, cfg: unet.convert_unet(core.load_state_dict(src), cfg),
                    unet.verify_unet),  # fmt: skip
    "vae": Network(VAEConfig.from_diffusers, vae.load_vae, vae.verify_vae),
    "clip-text": Network(CLIPTextConfig.from_hf, clip.load_clip_text, clip.verify_clip_text),
    "clip-vision": Network(CLIPVisionConfig.from_hf, clip.load_clip_vision, clip.verify_clip_vision),
    "llama": Network(LlamaConfig.from_hf, llama.load_llama, llama.verify_llama),
    "dinov2": Network(DINOv2Config.from_hf, dinov2.load_dinov2, dinov2.verify_dinov2),
    "qformer": Network(QFormerConfig.from_hf, qformer.load_qformer, qformer.verify_qformer),
    "vit": Network(ViTConfig.from_hf, vit.load_vit, vit.verify_vit),
    "t5": Network(T5EncoderConfig.from_hf, t5.load_t5, t5.verify_t5),
}


# transformers' tokenizer files (sentencepiece, BPE, fast): copied beside a converted network
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")  # fmt: skip


def convert_network(name: str, src: str, out: str, *, verify: bool = False) -> float | None:
    """Converts SRC with NETWORKS[name] into OUT; returns the max abs error vs torch if verify."""
    network = NETWORKS[name]
    config_file = os.path.join(src, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{src!r} has no config.json: expected a saved {name} directory")
    with open(config_file) as f:
        config = network.config(json.load(f))
    params = network.load(src, config)
    saved = ml_collections.ConfigDict({"network": name, "config": dataclasses.asdict(config)})
    found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
    with tempfile.TemporaryDirectory() as staging:  # the tokenizer files alone, not the weights beside them
        for file in found:
            shutil.copy(os.path.join(src, file), staging)
        checkpoint.save(out, params, saved, tokenizer_dir=staging if found else None)
    return network.verify(src, params, config) if verify else None
