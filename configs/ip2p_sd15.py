"""InstructPix2Pix fine-tuning of the SD1.5-sized UNet (the FireEdit paper's baseline row).

Start from a converted IP2P checkpoint (`fireedit-jax convert ip2p timbrooks/instruct-pix2pix
DIR`; its config.json's model section equals this one) or from a converted SD1.5 with
conv_in widened to 8 channels. Only the UNet trains; VAE, text encoder and null_text
are frozen and hold no optimizer state.

Hyper-parameters are the IP2P paper's (Brooks et al. 2023, §4): 256×256, global batch
1024, 10,000 steps, lr 1e-4 constant without warm-up, condition dropout 5%, EMA.
diffusers' examples/instruct_pix2pix uses lr 5e-5, batch 4 × accumulation 4 per GPU,
15,000 steps, max_grad_norm 1, EMA, and AdamW weight decay 1e-2; FireEdit uses weight
decay 0 and a 0.001 warm-up ratio. Override with e.g.
`--config.train.learning_rate=5e-5 --config.train.weight_decay=1e-2`.

Memory: 860M UNet params in float32 + Adam moments + EMA ≈ 14 GB before activations;
bfloat16 compute, remat, and the weights and moments split over `fsdp` (all devices by
default). With 8 devices, grad_accum 4 gives 32 examples per device per micro-batch.
"""

import dataclasses

import ml_collections

from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPTextConfig
from fireedit_jax.models.unet import UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.train.step import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.resolution = 256
    config.model = ml_collections.ConfigDict(dict(
        conditioner="clip_text", unet=dataclasses.asdict(UNetConfig.sd15(in_channels=8, remat=True)),
        vae=dataclasses.asdict(VAEConfig()), text_encoder=dataclasses.asdict(CLIPTextConfig.vit_l14()),
        scheduler=dataclasses.asdict(SchedulerConfig()), sampler="euler_ancestral",
    ))  # fmt: skip
    train = config.train
    train.batch_size = 1024
    train.grad_accum = 4
    train.steps = 10_000
    train.learning_rate = 1e-4
    train.schedule = "constant"
    train.warmup_ratio = 0.0
    train.clip_norm = 1.0
    train.ema.enabled = True
    train.ema.decay = 0.9999
    train.dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return config
