"""Tiny IP2P fine-tuning for tests and smoke runs (float32, one device).

The model has `convert.reference.IP2PSizes()`'s dimensions, so it is the model
`ip2p_config` reads from a saved random reference pipeline: training can start from
such a converted checkpoint or from a fresh init.

    fireedit-jax train --config configs/tiny.py --config.train.steps=50
"""

import dataclasses

import ml_collections

from fireedit_jax.convert.reference import IP2PSizes
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPTextConfig
from fireedit_jax.models.unet import CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.train.step import base_config

CHARACTER_VOCAB = 2 * 256 + 2  # reference.clip_tokenizer: bytes, bytes + "</w>", start, end


def get_config() -> ml_collections.ConfigDict:
    sizes = IP2PSizes()
    levels = len(sizes.unet_channels)
    unet = UNetConfig(
        in_channels=8, block_out_channels=sizes.unet_channels, layers_per_block=sizes.layers_per_block,
        down_block_types=(CROSS_DOWN,) * (levels - 1) + (PLAIN_DOWN,),
        up_block_types=(PLAIN_UP,) + (CROSS_UP,) * (levels - 1),
        num_heads=sizes.unet_heads, cross_attention_dim=sizes.text_width, norm_num_groups=sizes.norm_groups,
    )  # fmt: skip
    vae = VAEConfig(block_out_channels=sizes.vae_channels, layers_per_block=1, norm_num_groups=sizes.norm_groups)
    text = CLIPTextConfig(
        vocab_size=CHARACTER_VOCAB, hidden_size=sizes.text_width, intermediate_size=4 * sizes.text_width,
        num_layers=sizes.text_layers, num_heads=sizes.text_heads, eos_token_id=CHARACTER_VOCAB - 1,
        projection_dim=512,
    )  # fmt: skip

    config = base_config()
    config.resolution = sizes.sample_size * vae.downsample_factor
    config.model = ml_collections.ConfigDict(dict(
        conditioner="clip_text", unet=dataclasses.asdict(unet), vae=dataclasses.asdict(vae),
        text_encoder=dataclasses.asdict(text), scheduler=dataclasses.asdict(SchedulerConfig()),
        sampler="euler_ancestral",
    ))  # fmt: skip
    # ShapeEdit scenes made on the fly: a tiny run trains without any data files
    shapes = dict(kind="shapes", size=config.resolution)
    config.data = ml_collections.ConfigDict(dict(
        sources={"shapes": dict(shapes, split="train", num_samples=10_000)},
        eval=dict(shapes, split="test", num_samples=16), tokenizer="builtin:clip_chars", num_workers=0,
    ))  # fmt: skip
    train = config.train
    train.batch_size = 8
    train.steps = 200
    train.learning_rate = 1e-4  # IP2P's; see tests/test_sharding.py for why not more
    train.warmup_ratio = 0.001
    train.dtype = "float32"
    train.ema.enabled = True
    train.ema.decay = 0.99
    config.mesh.data = 1
    return config
