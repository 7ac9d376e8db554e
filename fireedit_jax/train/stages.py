"""FireEdit's three training stages as path-regex lists of trainable parameters.

Paths are '/'-joined keys of the EditModel param tree (models/fireedit.py):
  stage 1  Q-Former + the new token rows, aligned to the CLIP text encoder (lr 2e-4)
  stage 2  adapter + LoRA + Q-Former + UNet (+ the new token rows)          (lr 1e-5)
  stage 3  LoRA + Q-Former + HVCA + TATI + UNet (adapter frozen)            (lr 1e-5)
DINOv2, CLIP vision, the VAE, the LLM's base weights and the text-null constant never
train. The region encoder comes pretrained from Groma in the paper (frozen); a model
trained from scratch (e.g. the ShapeEdit demo) adds REGION_ENCODER to stages 2 and 3.
"""

from __future__ import annotations

NEW_ROWS = r"^vlm/llm/new_(embed|lm_head)$"
LORA = r"^vlm/llm/.*lora_[ab]$"
ADAPTER = r"^vlm/adapter_(in|out)/"
QFORMER = r"^qformer/"
UNET = r"^unet/"
TATI = r"^tati/"
HVCA = r"^hvca/"
REGION_ENCODER = r"^vlm/regions/"

STAGES: dict[int, tuple[str, ...]] = {
    1: (QFORMER, NEW_ROWS),
    2: (ADAPTER, LORA, QFORMER, UNET, NEW_ROWS),
    3: (LORA, QFORMER, HVCA, TATI, UNET),
}


def trainable_patterns(stage: int, *, train_regions: bool = False) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage}")
    return STAGES[stage] + ((REGION_ENCODER,) if train_regions and stage > 1 else ())
