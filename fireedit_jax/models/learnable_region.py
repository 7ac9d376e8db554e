"""Beyond Editing Pairs' region model: where to edit, from the source image and the instruction.

Shapes: B batch, H×W pixels, P = h·w CLIP patches, T instruction tokens, L caption tokens,
E the CLIP joint embedding width.

Four networks, all read by the `learnable_region` loss, only the predictor (and T5 where no
pretrained one exists, as on ShapeEdit) trained:
  clip_text     CLIP text tower with its projection: e(c), the captions' joint embeddings
  clip_vision   CLIP vision tower with its projection: E_img(I) and the patch tokens F_I
  t5            the T5 encoder: the instruction's tokens F_T
  predictor     models/region_predictor.py: F_I × F_T → one edit probability per patch

The predicted region drives the mask-guided edit (diffusion/edit_loop.py `edit_inputs`): soft
during training, so that the CLIP losses on the edited image reach the predictor through a few
denoising steps; thresholded at `threshold` for an edit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from fireedit_jax.models import clip
from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from fireedit_jax.models.region_predictor import RegionPrediction, RegionPredictor, RegionPredictorConfig
from fireedit_jax.models.t5 import T5Encoder, T5EncoderConfig


@dataclasses.dataclass(frozen=True)
class LearnableRegion:
    """Holds the networks; every method is a pure function of the region params
    {"clip_text", "clip_vision", "t5", "predictor"}."""

    clip_text: CLIPTextModel
    clip_vision: CLIPVisionModel
    t5: T5Encoder
    predictor: RegionPredictor
    threshold: float = 0.5  # an edit's mask: the patches whose probability exceeds it

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, dtype=jnp.float32, attention: str | None = None):
        """config: {"clip_text", "clip_vision", "t5", "predictor": their config dicts, "threshold"}."""
        from fireedit_jax.models.fireedit import dataclass_from_dict

        kw = dict(dtype=dtype, attention=attention)
        text = dataclass_from_dict(CLIPTextConfig, config.clip_text)
        vision = dataclass_from_dict(CLIPVisionConfig, config.clip_vision)
        t5 = dataclass_from_dict(T5EncoderConfig, config.t5)
        predictor = dataclass_from_dict(RegionPredictorConfig, config.predictor)
        if not (text.with_projection and vision.with_projection) or text.projection_dim != vision.projection_dim:
            raise ValueError("the region model compares images and captions in CLIP's joint space: both CLIP towers "
                             "need with_projection=True and one projection_dim")  # fmt: skip
        want = dict(image_dim=vision.hidden_size, text_dim=t5.d_model, embed_dim=text.projection_dim)
        have = {name: getattr(predictor, name) for name in want}
        if have != want:
            raise ValueError(f"the region predictor reads CLIP patches and T5 states into CLIP's joint space: "
                             f"it needs {want}, its config has {have}")  # fmt: skip
        return cls(CLIPTextModel(text, **kw), CLIPVisionModel(vision, **kw), T5Encoder(t5, **kw),
                   RegionPredictor(predictor, **kw), float(config.get("threshold", 0.5)))  # fmt: skip

    @property
    def grid(self) -> int:
        """Patches per side of the CLIP image (h = w)."""
        return self.clip_vision.config.grid_size

    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, 4)
        vision = self.clip_vision.config
        patches = jnp.zeros((1, self.grid**2, vision.hidden_size))
        words = jnp.zeros((1, 4, self.t5.config.d_model))
        return {
            "clip_text": self.clip_text.init(keys[0], *clip.example_inputs(self.clip_text.config))["params"],
            "clip_vision": self.clip_vision.init(keys[1], *clip.example_inputs(vision))["params"],
            "t5": self.t5.init(keys[2], jnp.zeros((1, 4), jnp.int32))["params"],
            "predictor": self.predictor.init(keys[3], patches, words, jnp.ones((1, 4), bool))["params"],
        }

    def text_embeds(self, params, ids: jax.Array) -> jax.Array:
        """Caption ids int[B, L] (padded after the EOS) → e(c) float32[B, E]."""
        return self.clip_text.apply({"params": params["clip_text"]}, ids).embeds.astype(jnp.float32)

    def image_features(self, params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pixels float[B, H, W, 3] in [-1, 1] → (E_img float32[B, E], patch tokens float[B, P, D]),
        at the CLIP tower's image size."""
        size = self.clip_vision.config.image_size
        x = (pixels.astype(jnp.float32) + 1.0) / 2.0
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic", antialias=True).clip(0.0, 1.0)
        out = self.clip_vision.apply({"params": params["clip_vision"]}, clip.normalize_pixels(x))
        return out.embeds.astype(jnp.float32), out.last_hidden_state[:, 1:]

    def predict(self, params, patches: jax.Array, instruction_ids: jax.Array, instruction_mask: jax.Array,
                ) -> RegionPrediction:  # fmt: skip
        """F_I float[B, P, D] and the instruction int[B, T] (bool[B, T] real tokens) → the prediction."""
        words = self.t5.apply({"params": params["t5"]}, instruction_ids, instruction_mask)
        return self.predictor.apply({"params": params["predictor"]}, patches, words, instruction_mask)

    def pixel_mask(self, logits: jax.Array, height: int, width: int) -> jax.Array:
        """Patch logits float[B, P] → the edit probability float32[B, H, W, 1], each patch's value
        over the pixels it covers (nearest)."""
        grid = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1, self.grid, self.grid, 1)
        return jax.image.resize(grid, (grid.shape[0], height, width, 1), "nearest")

    def region_mask(self, params, pixels: jax.Array, instruction_ids: jax.Array, instruction_mask: jax.Array,
                    ) -> jax.Array:  # fmt: skip
        """An edit's mask: float32[B, H, W] in {0, 1}, the patches predicted above `threshold`."""
        _, patches = self.image_features(params, pixels)
        prediction = self.predict(params, patches, instruction_ids, instruction_mask)
        probability = self.pixel_mask(prediction.logits, *pixels.shape[1:3])[..., 0]
        return (probability > self.threshold).astype(jnp.float32)
