"""A tiny FireEdit trained from scratch on ShapeEdit (data/shapes.py): the demo and the ablation.

    fireedit-jax demo                                             # trains this config (full)
    fireedit-jax train --config configs/shapes.py --workdir runs/shapes
    fireedit-jax train --config configs/shapes.py:clip_text --workdir runs/shapes_ip2p

Every FireEdit component is present, small: a VLM (2-layer LLaMA over a word-level
ShapeEdit vocabulary, a 3-layer DINOv2, the region encoder on the exact object boxes),
the Q-Former, TATI, HVCA with a tiny CLIP vision tower, and a decoupled UNet. Nothing is
pretrained, so everything trains (the LLM fully: no LoRA) on L_diff (L_VLM is reported
with weight 0, below), except the null text (zeros: there is no CLIP text encoder to take CLIP("") from).

The autoencoder is the fixed pixel-unshuffle (VAEConfig.pixel_unshuffle = 2): 32 px
images become 16 × 16 × 12 latents, exactly invertible and parameter-free, so the whole
CPU budget goes to FireEdit and preservation is not limited by a reconstruction error
(a learned tiny VAE would cost its own training and add its reconstruction error).
A 4× unshuffle (8 × 8 × 48) was tried first: the UNet's 32-channel first level is narrower
than its 96 input channels and it did not even learn to copy the source in 232 steps.

The UNet predicts x0 (scheduler prediction_type "sample"): trained from scratch, with
ε or v it had learned only a noisy copy of the source after 600 steps (L1 outside the
edited box 0.09); predicting x0, the source-conditioned UNet's copy path is direct
(0.04 after 600 steps) and training goes to the edit.

Two more departures make the copy exact and positions visible (EditModel.source_blend and
coord_channels; measured with 1,100 steps, 64 test edits). Predicting x0 directly, the UNet
could not even copy its own nearly clean input (x0 error outside the edited box 0.030 at
t = 0: its last GroupNorm drops each image's tint) and its removals faded the other objects
too (edit success 0.19, but 0.06 with every other object kept). With source_blend the UNet
outputs a content and a keep-mask m, x0 = m·source + (1 − m)·content: unguided, L1 outside
the box 0.013 (the copy's whole L1 is 0.012). The UNet has no position embedding, and
"the leftmost square" needs one: coord_channels appends (x, y) to its input (CoordConv);
with both, specific success 0.09–0.11 against 0.03–0.06 with the blend alone. Adding the
source instead (x0 = source + output) copied as well but collapsed the condition
(Q-Former spread across instructions 0.0006) and learnt no edit.

Two departures from the paper keep the instruction in the condition. benchmarks/condition_spread.py
measures the conditions' spread across six instructions on one image (std over instructions
/ std over tokens). At init: [IMG] states 0.13 / 0.32, Q-Former output 0.08 / 0.50. After
500 steps on one-object scenes with L_VLM trained (weight 1) and diffusers' random
cross-attention init: 0.012 / 1.16 and 0.002 / 0.29 — the condition no longer depended on
the instruction; edit success 0.22 (remove 0.59, colour 0.06; 64 test edits, no guidance). The 64-wide LLM's last
states were spent on predicting the next [IMG] token, and the UNet learnt to suppress a
condition that was still noise to it. Without L_VLM (train.vlm_weight 0; it is still
reported) and with every cross-attention to_out initialised at zero (zero_init_cross_out:
the UNet starts unconditioned): 0.61 / 0.25 and 0.40 / 0.06; success 0.27, remove 1.00. Either
change alone still collapsed (Q-Former 0.005 and 0.001). A pretrained LLM and the paper's
stage-1 alignment are what keep the condition informative at full scale.

The UNet also reads the condition globally: addition_embed_type "text" (diffusers'
TextTimeEmbedding, DeepFloyd IF's) attention-pools the context tokens into the time embedding,
its last norm at zero like the cross-attention outputs. After 1,500 steps the cross-attentions'
to_out kernels had grown only to norms 0.25–0.44 from zero (the self-attentions' stay at their
init's 5.6–8.0): the condition barely reached the UNet. With the pooled path, `full` scores
specific success 0.117 / 0.141 (seeds 0 / 1; 128 test edits) against 0.094 / 0.031 without,
its seed 1 no longer collapsed; clip_text is unchanged (0.164 / 0.148 against 0.148 / 0.164).

Variants (the argument after the colon), the rows of the paper's Table 3 and a baseline:
  full          regions + TATI + HVCA (FireEdit; the default)
  region_tati   regions + TATI          region      regions only
  none          the VLM without regions, TATI or HVCA
  clip_text     InstructPix2Pix-style: the UNet on a tiny CLIP text encoder's states
"""

import dataclasses

import ml_collections

from fireedit_jax.data import shapes
from fireedit_jax.data.tokenizer import NEW_TOKENS
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.hvca import HVCAConfig
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.qformer import QFormerConfig
from fireedit_jax.models.regions import RegionEncoderConfig
from fireedit_jax.models.tati import TATIConfig
from fireedit_jax.models.unet import CROSS_DOWN, CROSS_UP, UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.train.step import base_config

VARIANTS = {  # name: (use_regions, use_tati, use_hvca)
    "none": (False, False, False),
    "region": (True, False, False),
    "region_tati": (True, True, False),
    "full": (True, True, True),
}
IMAGE_SIZE = 32  # pixels
UNSHUFFLE = 2  # latent 16 × 16 × 12
CONTEXT = (16, 64)  # (L, D): context tokens and width of the UNet's cross-attention
LLM_WIDTH = 64
VISION_WIDTH = 32  # DINOv2 and CLIP vision (HVCA concatenates both)
PATCH = 4  # 32 px → 8 × 8 patches → 16 image tokens after the 2 × 2 merge
TEXT_LENGTH = 24  # clip_text: tokens of an instruction (<s> + ≤ 17 words + </s>, padded)


def vocab_size() -> int:
    """The word-level tokenizer's size (`shapes.build_tokenizer`), before FireEdit's new tokens."""
    return len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary())


def model_config(variant: str = "full") -> ml_collections.ConfigDict:
    length, width = CONTEXT
    latent = 3 * UNSHUFFLE**2
    unet = UNetConfig(
        in_channels=2 * latent + 2, out_channels=2 * latent, block_out_channels=(32, 64),  # coordinates; blend
        layers_per_block=1, down_block_types=(CROSS_DOWN,) * 2, up_block_types=(CROSS_UP,) * 2, num_heads=4,
        cross_attention_dim=width, norm_num_groups=8, zero_init_cross_out=True, addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )  # fmt: skip
    vae = VAEConfig(pixel_unshuffle=UNSHUFFLE, latent_channels=latent, scaling_factor=1.0)
    model = dict(
        unet=dataclasses.asdict(unet), vae=dataclasses.asdict(vae), sampler="euler_ancestral",
        scheduler=dataclasses.asdict(SchedulerConfig(prediction_type="sample")), coord_channels=True, source_blend=True,
    )  # fmt: skip
    if variant == "clip_text":
        text = CLIPTextConfig(
            vocab_size=vocab_size(), hidden_size=width, intermediate_size=4 * width, num_layers=2, num_heads=4,
            max_position_embeddings=TEXT_LENGTH, eos_token_id=shapes.SPECIAL_TOKENS.index("</s>"),
        )  # fmt: skip
        return ml_collections.ConfigDict(dict(model, conditioner="clip_text", text_encoder=dataclasses.asdict(text)))
    if variant not in VARIANTS:
        raise ValueError(f"unknown configs/shapes.py variant {variant!r}; known: {', '.join([*VARIANTS, 'clip_text'])}")
    use_regions, use_tati, use_hvca = VARIANTS[variant]
    llm = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=LLM_WIDTH, intermediate_size=2 * LLM_WIDTH, num_layers=2, num_heads=4,
        max_position_embeddings=256, num_new_tokens=len(NEW_TOKENS), lora_rank=0,
    )  # fmt: skip
    vision = DINOv2Config(hidden_size=VISION_WIDTH, num_layers=3, num_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    clip_vision = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=4 * VISION_WIDTH, num_layers=2,
                                   num_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)  # fmt: skip
    model["unet"]["decoupled"] = use_hvca
    return ml_collections.ConfigDict(dict(
        model, conditioner="vlm", llm=dataclasses.asdict(llm), vision=dataclasses.asdict(vision),
        clip_vision=dataclasses.asdict(clip_vision), use_regions=use_regions, use_tati=use_tati, use_hvca=use_hvca,
        vlm_image_size=IMAGE_SIZE, hvca_sizes=(IMAGE_SIZE,), merge=2,
        regions=dataclasses.asdict(RegionEncoderConfig.tiny(feature_dim=VISION_WIDTH, llm_dim=LLM_WIDTH, patch_size=PATCH)),
        qformer=dataclasses.asdict(QFormerConfig(num_queries=length, hidden_size=width, num_layers=2, num_heads=4,
                                                 intermediate_size=2 * width, encoder_width=LLM_WIDTH, dropout=0.0)),
        tati=dataclasses.asdict(TATIConfig(num_latents=length, width=width, num_heads=4, input_dim=width,
                                           time_channel=width, time_embed_dim=width)),
        hvca=dataclasses.asdict(HVCAConfig(num_queries=8, visual_dim=VISION_WIDTH, edit_dim=width,
                                           hidden=VISION_WIDTH, num_heads=2, out_dim=width)),
    ))  # fmt: skip


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = base_config()
    config.resolution = IMAGE_SIZE
    config.model = model_config(variant)
    shapes_source = dict(kind="shapes", size=IMAGE_SIZE, seed=0, min_objects=1, max_objects=5)
    config.data = ml_collections.ConfigDict(dict(
        sources={"shapes": dict(shapes_source, split="train", num_samples=1_000_000)},
        eval=dict(shapes_source, split="test", num_samples=1000), tokenizer="builtin:shape_words",
        flip_probability=0.0,  # a flip would break "leftmost" / "to the left of"
        length_buckets=(96,), box_buckets=(8,),  # one bucket each: one compilation
    ))  # fmt: skip
    config.checkpoint = ml_collections.ConfigDict(dict(every=250, keep=2))
    config.logging = ml_collections.ConfigDict(dict(every=10, sample_every=0, sample_count=4, sample_steps=20))
    train = config.train
    train.loss = "ip2p" if variant == "clip_text" else "fireedit"
    train.vlm_weight = 0.0  # L_VLM is reported, not trained on (module docstring)
    train.batch_size = 32
    train.steps = 2000
    train.learning_rate = 1e-3
    train.schedule = "cosine"
    train.warmup_ratio = 0.02
    train.dtype = "float32"
    train.trainable = ("^(unet|text_encoder|vlm|qformer|tati|hvca|clip_vision)/",)
    train.ema.enabled = False
    config.mesh.data = -1  # every device on the data axis (batch_size must divide by their count)
    return config
