"""Tiny FireEdit training for tests and smoke runs (float32, one device), stages 1–3.

    fireedit-jax train --config configs/tiny_fireedit.py:2 --config.train.steps=50

Every component is present (region encoder, TATI, HVCA with a CLIP vision tower, the
decoupled UNet), at the sizes of a `convert fireedit ... small=True` checkpoint of the
random reference models (tests/test_fireedit.py): the UNet, VAE and CLIP text encoder
are configs/tiny.py's (the reference IP2P pipeline's), the VLM a 2-layer LLaMA over the
ShapeEdit word vocabulary (`data.shapes.build_tokenizer`) with a 3-layer DINOv2 at 32 px,
the Q-Former 2 layers. Trainable sets are `train.stages` (as `fireedit-jax info` counts
them); the loss is `losses.make_fireedit_loss` (stage 1: L_VLM + alignment to the CLIP
text encoder, which only the stage-1 model carries; stages 2, 3: L_VLM + L_diff).
"""

import dataclasses
import importlib.util
import os

import ml_collections

from fireedit_jax.convert.fireedit import bridge_configs
from fireedit_jax.data import shapes
from fireedit_jax.data.tokenizer import NEW_TOKENS
from fireedit_jax.models.clip import CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.train import stages
from fireedit_jax.train.step import base_config

# stage: learning rate (the paper's ratio: stage 1 20× stages 2 and 3, at the tiny config's 1e-4)
LEARNING_RATES = {1: 2e-3, 2: 1e-4, 3: 1e-4}
VLM_IMAGE_SIZE = 32  # DINOv2 8-px patches → 4 × 4 grid → 4 image tokens after the 2 × 2 merge


def _tiny_ip2p() -> ml_collections.ConfigDict:
    """configs/tiny.py's config (UNet, VAE, CLIP text encoder of the reference IP2P pipeline)."""
    spec = importlib.util.spec_from_file_location("configs_tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(stage: str = "3") -> ml_collections.ConfigDict:
    stage = int(stage)
    ip2p = _tiny_ip2p().model
    llm = LlamaConfig(
        vocab_size=len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary()), hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=4, num_kv_heads=2, num_new_tokens=len(NEW_TOKENS), max_position_embeddings=256,
    )  # fmt: skip
    vision = DINOv2Config(hidden_size=16, num_layers=3, num_heads=2, image_size=VLM_IMAGE_SIZE, patch_size=8)
    clip_vision = CLIPVisionConfig(hidden_size=16, intermediate_size=64, num_layers=2, num_heads=2, image_size=16,
                                   patch_size=8)  # fmt: skip
    unet = dict(ip2p.unet.to_dict(), decoupled=True)
    context = (ip2p.text_encoder.max_position_embeddings, unet["cross_attention_dim"])
    bridges = bridge_configs(llm, vision, clip_vision, context, small=True)
    bridges["qformer"] = dataclasses.replace(bridges["qformer"], num_layers=2)

    config = base_config()
    config.stage = stage
    config.resolution = 16
    config.model = ml_collections.ConfigDict({
        "conditioner": "vlm", "unet": unet, "vae": ip2p.vae.to_dict(), "scheduler": ip2p.scheduler.to_dict(),
        "sampler": ip2p.sampler, "llm": dataclasses.asdict(llm), "vision": dataclasses.asdict(vision),
        "clip_vision": dataclasses.asdict(clip_vision), "use_regions": True, "use_tati": True, "use_hvca": True,
        "vlm_image_size": VLM_IMAGE_SIZE, "hvca_sizes": (16, VLM_IMAGE_SIZE), "merge": 2,
        **{name: dataclasses.asdict(cfg) for name, cfg in bridges.items()},
    })  # fmt: skip
    if stage == 1:  # the alignment target: CLIP text states of the caption
        config.model.text_encoder = ip2p.text_encoder
    config.data = ml_collections.ConfigDict({"length_buckets": (64, 96), "box_buckets": (0, 4, 8)})
    train = config.train
    train.loss = "fireedit"
    train.trainable = stages.trainable_patterns(stage)
    train.learning_rate = LEARNING_RATES[stage]
    train.steps = 200
    train.weight_decay = 0.0
    train.batch_size = 8
    train.dtype = "float32"
    config.mesh.data = 1
    return config
