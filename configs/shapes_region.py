"""Learnt edit regions (Beyond Editing Pairs) on ShapeEdit: where to edit, learnt from captions alone.

    fireedit-jax demo --method region                                   # all three stages below
    fireedit-jax train --config configs/shapes_region.py:clip --workdir runs/clip --init outputs/demo_mask/checkpoint
    fireedit-jax train --config configs/shapes_region.py --workdir runs/region --init runs/clip
    fireedit-jax edit --checkpoint CKPT --method region --image scene.png --instruction "make the red circle blue"

The model is configs/shapes_mask.py's mask-guided editor (the generator, frozen: trained on edit
pairs, as the paper's generator is a pretrained inpainting model) plus the region model
(models/learnable_region.py): a tiny CLIP (text and vision towers with projections), a tiny T5
encoder and the region predictor. The records are ShapeEdit's caption view: the scene, its
caption, the instruction and the target scene's caption (data/shapes.py `describe`); the target
image is never read. There is no pretrained CLIP or T5 to download, so:
  clip     trains the CLIP towers contrastively on the scene–caption pairs (loss clip_contrastive)
  region   trains the region predictor and the T5 encoder (no pretrained one: it learns the
           instruction's words with the predictor) on L_sa + L_clip, CLIP and the generator frozen
  structural  region with the structural term ×10 (λ_structural; benchmarks/region_landscape.py's
           best lever on free logits)
  no_sa    region without L_sa (the paper's Table 4 "w/o L_sa")
  no_clip  region without L_clip ("w/o L_clip": no edit is made, the predictor learns from L_sa alone)

CLIP's vision tower reads 2-pixel patches, a 16 × 16 grid on the 32-pixel scenes: objects are 5
or 9 pixels wide, and a coarser grid could not outline a small one (4-pixel patches cap a
5-pixel object's IoU at 0.39).
"""

import dataclasses
import os

from fireedit_jax.data import shapes
from fireedit_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from fireedit_jax.models.region_predictor import RegionPredictorConfig
from fireedit_jax.models.t5 import T5EncoderConfig
from fireedit_jax.train.run import load_config

SHAPES_MASK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_mask.py")
IMAGE_SIZE = 32
WIDTH = 64  # CLIP, T5 and the predictor; the joint embedding too
CAPTION_LENGTH = 48  # <s> + a scene of five objects ("a big red circle in the top left" each) + </s>
VARIANTS = {"clip", "region", "structural", "no_sa", "no_clip"}


def region_model() -> dict:
    vocab = len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary())
    eos = shapes.SPECIAL_TOKENS.index("</s>")
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_layers=2, num_heads=4,
                          max_position_embeddings=CAPTION_LENGTH, eos_token_id=eos, projection_dim=WIDTH,
                          with_projection=True)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_layers=2, num_heads=4,
                              image_size=IMAGE_SIZE, patch_size=2, projection_dim=WIDTH, with_projection=True)  # fmt: skip
    t5 = T5EncoderConfig(vocab_size=vocab, d_model=WIDTH, d_kv=16, d_ff=2 * WIDTH, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20)  # fmt: skip
    predictor = RegionPredictorConfig(image_dim=WIDTH, text_dim=WIDTH, width=WIDTH, num_heads=4, mlp_hidden=2 * WIDTH,
                                      embed_dim=WIDTH)  # fmt: skip
    return dict(clip_text=dataclasses.asdict(text), clip_vision=dataclasses.asdict(vision), t5=dataclasses.asdict(t5),
                predictor=dataclasses.asdict(predictor), threshold=0.5, generator_text="instruction")  # fmt: skip


def get_config(variant: str = "region"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown configs/shapes_region.py variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
    config = load_config(f"{SHAPES_MASK}:mask")
    config.model.learnable_region = region_model()
    config.data.sources.shapes.view = "captions"  # no target image (config.data.eval keeps the edits: sample grids)
    config.data.region_length = 24  # the instruction's T5 tokens: <s> + at most 17 words + </s>
    train = config.train
    train.ema.enabled = False
    if variant == "clip":
        train.loss, train.trainable = "clip_contrastive", ("^region/clip_(text|vision)/",)
        train.batch_size, train.steps, train.learning_rate = 64, 1000, 1e-3
        train.clip_temperature = 0.07
        return config
    train.loss, train.trainable = "learnable_region", ("^region/(predictor|t5)/",)
    # a step edits under the soft region through region_edit_steps steps of three guidance branches,
    # forward and (rematerialised) backward: ~15× the generator's train step per example
    train.batch_size, train.steps, train.learning_rate = 8, 300, 1e-3
    train.region_edit_steps = 2
    train.region_guidance = (1.0, 3.0)  # (s_I, s_T) of the edit, the mask demo's
    train.region_weights = dict(lambda_sa=0.0 if variant == "no_sa" else 1.0,
                                lambda_clip=0.0 if variant == "no_clip" else 1.0,
                                lambda_guidance=1.0, lambda_directional=1.0,
                                lambda_structural=10.0 if variant == "structural" else 1.0)  # fmt: skip
    return config
