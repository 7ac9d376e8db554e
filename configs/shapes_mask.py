"""Mask-guided editing (PromptEditDiff) on ShapeEdit: configs/shapes.py's tiny models, told where.

    fireedit-jax demo --method mask                                # trains the default variant
    fireedit-jax train --config configs/shapes_mask.py --workdir runs/shapes_mask
    fireedit-jax edit --checkpoint CKPT --image scene.png --instruction "make it blue" --mask-box 0.1,0.2,0.4,0.5

Trained on quads (source, the edit's exact pixel mask, instruction, target: ShapeEdit's `mask`)
with the `mask_edit` loss: the UNet's x0 error weighted 1 on the mask's latent cells and
train.mask_outside_weight outside. Edits sample with the mask (outside it the latents are the
source's at every step), so everything outside the mask is the source exactly (the pixel-
unshuffle autoencoder is exact).

Variants (the argument after the colon):
  mask       the IP2P-style UNet on the tiny CLIP text encoder + the mask encoder (8 × 8 tokens
             from the 16 × 16 latent mask), read in every transformer block by a gated
             cross-attention (PromptEditDiff's φ·Attn(H, F_M); the default)
  gligen     the same with GLIGEN's gated self-attention + gated feed-forward instead (diffusers'
             layer; costs a second self-attention and feed-forward per block)
  blend      the same without the mask encoder: the mask acts only through the loss weights and
             masked sampling (the paper's "w/o mask encoder")
  fireedit   configs/shapes.py's FireEdit (VLM, regions, TATI, HVCA) + the mask encoder: what
             FireEdit says, told where
"""

import dataclasses
import os

from fireedit_jax.models.mask_encoder import MaskEncoderConfig
from fireedit_jax.train.run import load_config

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.py")
CONTEXT_WIDTH = 64  # configs/shapes.py's CONTEXT[1]: the UNet's cross-attention width
# variant → (configs/shapes.py's variant, the UNet's injection_layer for the mask tokens or None)
VARIANTS = {"mask": ("clip_text", "cross"), "gligen": ("clip_text", "self"), "blend": ("clip_text", None),
            "fireedit": ("full", "cross")}
MASK_TOKENS = (32, 64)  # conv widths: the 16 × 16 latent mask → 8 × 8 tokens


def get_config(variant: str = "mask"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown configs/shapes_mask.py variant {variant!r}; known: {', '.join(VARIANTS)}")
    base, layer = VARIANTS[variant]
    config = load_config(f"{SHAPES}:{base}")
    model = config.model
    if layer:
        model.unet.gated_injection, model.unet.injection_layer = True, layer
        model.mask_encoder = dataclasses.asdict(MaskEncoderConfig(channels=MASK_TOKENS, out_dim=CONTEXT_WIDTH))
        config.train.trainable = (*config.train.trainable, "^mask_encoder/")
    config.train.loss = "mask_edit"
    config.train.mask_outside_weight = 0.1
    return config
