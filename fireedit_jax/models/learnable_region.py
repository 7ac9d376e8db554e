"""The region model: where to edit, from the source image and the instruction, with its own encoders.

Shapes: B batch, H×W pixels, P = h·w CLIP patches, T instruction tokens, L caption tokens,
E the CLIP joint embedding width, R proposal boxes.

Four networks:
  clip_text     CLIP text tower with its projection: e(c), the captions' joint embeddings (only
                the caption-trained losses read it; absent from a region model trained on edit pairs)
  clip_vision   CLIP vision tower (with its projection for those losses): the patch tokens F_I
  t5            the T5 encoder: the instruction's tokens F_T
  predictor     models/region_predictor.py: F_I × F_T (× proposals) → edit logits per (sub-)patch
                (and per box)

Two ways to train it, one way to use it:
  - Beyond Editing Pairs (`learnable_region`, `clip_contrastive`): from image–caption pairs; the
    predicted region drives the mask-guided edit softly, so that CLIP's judgement of the edited
    image reaches the predictor through a few denoising steps;
  - on edit pairs (`grounded`): supervised by the region the pair edits (its mask, or the
    difference of source and target), beside the generator or alone (data/region_targets.py);
  - an edit's mask (`region_mask`): the box the predictor picks (score_boxes), else the
    (sub-)patches above `threshold`, as they are or as their bounding box (`region_box`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.models import clip
from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from fireedit_jax.models.region_predictor import (
    RegionPrediction,
    RegionPredictor,
    RegionPredictorConfig,
    cell_probability,
    edit_region,
    example_inputs,
)
from fireedit_jax.models.t5 import T5Encoder, T5EncoderConfig
from fireedit_jax.nn.resize import unit_square

INSTRUCTION_TOKENS = 32  # the instruction's T5 tokens unless config.data.region_length says otherwise


@dataclasses.dataclass(frozen=True)
class LearnableRegion:
    """Holds the networks; every method is a pure function of the region params
    {"clip_text" (if any), "clip_vision", "t5", "predictor"}."""

    clip_text: CLIPTextModel | None
    clip_vision: CLIPVisionModel
    t5: T5Encoder
    predictor: RegionPredictor
    threshold: float = 0.5  # an edit's mask: the cells whose probability exceeds it
    region_box: bool = False  # an edit's mask from the cells: their bounding box instead of the cells

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, dtype=jnp.float32, attention: str | None = None):
        """config: {"clip_vision", "t5", "predictor": their config dicts, optional "clip_text",
        "threshold", "region_box"}."""
        kw = dict(dtype=dtype, attention=attention)
        vision = dataclass_from_dict(CLIPVisionConfig, config.clip_vision)
        t5 = dataclass_from_dict(T5EncoderConfig, config.t5)
        predictor = dataclass_from_dict(RegionPredictorConfig, config.predictor)
        text = None
        if config.get("clip_text") is not None:
            text = dataclass_from_dict(CLIPTextConfig, config.clip_text)
            if not (text.with_projection and vision.with_projection) or text.projection_dim != vision.projection_dim:
                raise ValueError("the region model compares images and captions in CLIP's joint space: both CLIP "
                                 "towers need with_projection=True and one projection_dim")  # fmt: skip
        want = dict(image_dim=vision.hidden_size, text_dim=t5.d_model)
        if text is not None:
            want["embed_dim"] = text.projection_dim
        have = {name: getattr(predictor, name) for name in want}
        if have != want:
            raise ValueError(f"the region predictor reads CLIP patches and T5 states (into CLIP's joint space): "
                             f"it needs {want}, its config has {have}")  # fmt: skip
        return cls(None if text is None else CLIPTextModel(text, **kw), CLIPVisionModel(vision, **kw),
                   T5Encoder(t5, **kw), RegionPredictor(predictor, **kw), float(config.get("threshold", 0.5)),
                   bool(config.get("region_box", False)))  # fmt: skip

    @property
    def grid(self) -> int:
        """Patches per side of the CLIP image (h = w)."""
        return self.clip_vision.config.grid_size

    @property
    def cells(self) -> int:
        """Cells per side of the predicted region's grid (the patch grid × the sub-patch factor)."""
        return self.grid * self.predictor.config.subpixel

    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, 4)
        vision = self.clip_vision.config
        predictor = self.predictor.config
        params = {
            "clip_vision": self.clip_vision.init(keys[1], *clip.example_inputs(vision))["params"],
            "t5": self.t5.init(keys[2], jnp.zeros((1, 4), jnp.int32))["params"],
            "predictor": self.predictor.init(keys[3], *example_inputs(predictor, patches=self.grid**2))["params"],
        }
        if self.clip_text is not None:
            params["clip_text"] = self.clip_text.init(keys[0], *clip.example_inputs(self.clip_text.config))["params"]
        return params

    def text_embeds(self, params, ids: jax.Array) -> jax.Array:
        """Caption ids int[B, L] (padded after the EOS) → e(c) float32[B, E]."""
        if self.clip_text is None:
            raise ValueError("this region model has no CLIP text tower (it was trained on edit pairs, not captions)")
        return self.clip_text.apply({"params": params["clip_text"]}, ids).embeds.astype(jnp.float32)

    def image_features(self, params, pixels: jax.Array) -> tuple[jax.Array | None, jax.Array]:
        """Pixels float[B, H, W, 3] in [-1, 1] → (E_img float32[B, E], or None without a projection;
        patch tokens float[B, P, D]), at the CLIP tower's image size."""
        x = unit_square(pixels, self.clip_vision.config.image_size)
        out = self.clip_vision.apply({"params": params["clip_vision"]}, clip.normalize_pixels(x))
        embeds = None if out.embeds is None else out.embeds.astype(jnp.float32)
        return embeds, out.last_hidden_state[:, 1:]

    def predict(self, params, patches: jax.Array, instruction_ids: jax.Array, instruction_mask: jax.Array,
                boxes=None, box_mask=None) -> RegionPrediction:  # fmt: skip
        """F_I float[B, P, D], the instruction int[B, T] (bool[B, T] real tokens) and the proposals
        (float[B, R, 4] normalised xyxy, bool[B, R]; read with score_boxes) → the prediction."""
        words = self.t5.apply({"params": params["t5"]}, instruction_ids, instruction_mask)
        extra = (boxes, box_mask) if self.predictor.config.score_boxes else ()
        return self.predictor.apply({"params": params["predictor"]}, patches, words, instruction_mask, *extra)

    def pixel_mask(self, logits: jax.Array, height: int, width: int) -> jax.Array:
        """Cell logits float[B, cells²] → the edit probability float32[B, H, W, 1], each cell's value
        over the pixels it covers (nearest)."""
        return cell_probability(logits, height, width)[..., None]

    def region_mask(self, params, pixels: jax.Array, instruction_ids: jax.Array, instruction_mask: jax.Array,
                    boxes=None, box_mask=None) -> jax.Array:  # fmt: skip
        """An edit's mask: float32[B, H, W] in {0, 1} (`region_predictor.edit_region`)."""
        _, patches = self.image_features(params, pixels)
        prediction = self.predict(params, patches, instruction_ids, instruction_mask, boxes, box_mask)
        return edit_region(prediction, *pixels.shape[1:3], boxes, threshold=self.threshold, cells_box=self.region_box)
