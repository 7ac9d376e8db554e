"""FireEdit-7B (the paper's model): LLaMA-7B + DINOv2-L/14 VLM, SD1.5 IP2P UNet, stages 1–3.

    fireedit-jax train --config configs/fireedit_7b.py:3 --workdir runs/stage3 --init runs/stage2
    fireedit-jax plan  --config configs/fireedit_7b.py:3 --mesh data=2,fsdp=8,tensor=1

The argument after the colon is the stage (default 3). Sizes are the paper's (DESIGN.md);
pretrained weights come from `fireedit-jax convert fireedit` (the `--init` checkpoint).
"""

import dataclasses

import ml_collections

from fireedit_jax.convert.fireedit import bridge_configs
from fireedit_jax.data.tokenizer import NEW_TOKENS
from fireedit_jax.data.vlm_inputs import DEFAULT_BOX_BUCKETS, DEFAULT_LENGTH_BUCKETS
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.unet import UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.train import stages
from fireedit_jax.train.step import base_config

# stage: (learning rate, steps) from the paper (stage 1 120k at 2e-4; stages 2 and 3 at 1e-5)
SCHEDULE = {1: (2e-4, 120_000), 2: (1e-5, 5_000), 3: (1e-5, 25_000)}


def model_config(*, use_regions=True, use_tati=True, use_hvca=True) -> ml_collections.ConfigDict:
    # remat: each LLaMA layer / UNet block recomputed in the backward pass, so activations and
    # the per-layer fsdp gathers (train/step.py) are not kept for all layers at once
    llm = LlamaConfig.llama_7b(num_new_tokens=len(NEW_TOKENS), remat=True)
    vision = DINOv2Config.vit_l14()
    clip_vision = CLIPVisionConfig.vit_l14()
    bridges = bridge_configs(llm, vision, clip_vision, (77, 768))
    return ml_collections.ConfigDict({
        "conditioner": "vlm", "unet": dataclasses.asdict(UNetConfig.sd15(decoupled=use_hvca, remat=True)),
        "vae": dataclasses.asdict(VAEConfig.sd15()), "scheduler": dataclasses.asdict(SchedulerConfig()),
        "sampler": "euler_ancestral", "llm": dataclasses.asdict(llm), "vision": dataclasses.asdict(vision),
        "clip_vision": dataclasses.asdict(clip_vision), "use_regions": use_regions, "use_tati": use_tati,
        "use_hvca": use_hvca, "vlm_image_size": 448, "hvca_sizes": (224, 448), "merge": 2,
        **{name: dataclasses.asdict(cfg) for name, cfg in bridges.items()},
    })  # fmt: skip


def get_config(stage: str = "3") -> ml_collections.ConfigDict:
    stage = int(stage)
    config = base_config()
    config.stage = stage
    config.resolution = 256  # SmartEdit / FireEdit train the UNet at 256 px
    config.model = model_config()
    if stage == 1:  # the alignment target: SD1.5's CLIP text encoder (frozen), states of the caption
        config.model.text_encoder = dataclasses.asdict(CLIPTextConfig.vit_l14())
    config.data = ml_collections.ConfigDict(
        {"length_buckets": DEFAULT_LENGTH_BUCKETS, "box_buckets": DEFAULT_BOX_BUCKETS}
    )
    learning_rate, steps = SCHEDULE[stage]
    train = config.train
    train.loss = "fireedit"
    train.learning_rate, train.steps = learning_rate, steps
    train.warmup_ratio = 0.001
    train.weight_decay = 0.0
    train.trainable = stages.trainable_patterns(stage)
    train.batch_size = 128  # 8 GPUs × 2 per device × 8 accumulation, as SmartEdit
    train.grad_accum = 8
    train.dtype = "bfloat16"
    config.mesh.fsdp = -1
    config.mesh.data = 1
    return config
