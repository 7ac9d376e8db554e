"""FireEdit as one composition: conditioner → (TATI) → UNet with decoupled cross-attention.

Shapes: B batch, h×w latent size, L context tokens (77), D context width (768), V visual
tokens of HVCA (16).

conditioner = "vlm" (FireEdit):
  condition (once per edit): VLM(image, boxes, instruction) → e [B, 32, d_llm]
      → Q-Former → text [B, L, D];  CLIP + DINOv2 features at two sizes → HVCA(·, text) → visual [B, V, D]
  denoise (every step):  TATI(text, t) → K1/V1;  visual → K2/V2 (λ·Attn, bias-free)
conditioner = "clip_text" (the InstructPix2Pix baseline): text = CLIP text encoder states.

Switches give the paper's ablation rows: `use_regions` (region tokens), `use_tati`,
`use_hvca`.

Where to edit. Mask-guided editing (PromptEditDiff), with either conditioner: `mask_encoder`
turns the edit mask into tokens the UNet's transformer blocks read through a gated layer
(`unet.injection_layer`: PromptEditDiff's gated cross-attention, or GLIGEN's gated
self-attention), computed once per edit and the same in every guidance branch; the edit loop's
masked sampling keeps the source outside the mask. The mask comes from the user, or is predicted:
`region` (models/learnable_region.py, the region model with its own encoders) from the source and
the instruction, `grounding` (FireEdit's own, `ground`) from the VLM's states.

`image_condition` says what the UNet reads beside the noisy latents: "source" (IP2P, dual
guidance), "masked" (SD inpainting's mask ‖ masked-image latents, text guidance) or "none" (SD
text-to-image, text guidance; edits by masked sampling alone). Null conditions (DESIGN.md):
text-null = params["null_text"] (CLIP("") states) in place of the Q-Former output, then through
TATI; image-null = zero image latent and zero visual tokens (K2/V2 have no bias, so that branch
adds nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.models import clip, dinov2
from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from fireedit_jax.models.dinov2 import DINOv2Config, DINOv2Model
from fireedit_jax.models.hvca import HVCA, HVCAConfig
from fireedit_jax.models.learnable_region import LearnableRegion
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.mask_encoder import MaskEncoder, MaskEncoderConfig
from fireedit_jax.models.qformer import QFormer, QFormerConfig
from fireedit_jax.models.region_predictor import (
    RegionPrediction,
    RegionPredictor,
    RegionPredictorConfig,
    example_inputs,
)
from fireedit_jax.models.regions import RegionEncoderConfig
from fireedit_jax.models.tati import TATI, TATIConfig
from fireedit_jax.models.unet import UNet, UNetConfig
from fireedit_jax.models.vae import VAE, VAEConfig
from fireedit_jax.models.vlm import VLM, check_vlm_configs, placeholder_states, token_id
from fireedit_jax.nn.embeddings import coordinates
from fireedit_jax.nn.resize import unit_square

CONDITIONERS = ("clip_text", "vlm")
# What the UNet reads beside the noisy latents, and the guidance that goes with it.
IMAGE_CONDITIONS = {"source": "dual", "masked": "text", "none": "text"}


@dataclasses.dataclass(frozen=True)
class EditModel:
    """Holds the networks; every method is a pure function of `params`.

    params: {"unet", "vae", "null_text": float[L, D]} and, for "clip_text", "text_encoder";
    for "vlm", "vlm", "qformer" (+ "tati" if use_tati) (+ "hvca", "clip_vision" if use_hvca)
    (+ "text_encoder" if the config has one: the frozen CLIP text encoder whose states are
    stage 1's alignment targets) (+ "mask_encoder" for mask-guided editing) (+ "region": the
    learnt edit region's networks).
    """

    unet: UNet
    vae: VAE
    conditioner: str = "clip_text"
    text_encoder: CLIPTextModel | None = None
    vlm: VLM | None = None
    qformer: QFormer | None = None
    tati: TATI | None = None
    hvca: HVCA | None = None
    clip_vision: CLIPVisionModel | None = None
    vlm_image_size: int = 448
    hvca_sizes: tuple[int, ...] = (224, 448)
    coord_channels: bool = False  # the UNet also reads x, y ∈ [−1, 1] (two input channels)
    source_blend: bool = False  # x0 = m·source + (1 − m)·content, both from the UNet (x0 prediction)
    mask_encoder: MaskEncoder | None = None
    image_condition: str = "source"  # IMAGE_CONDITIONS
    region: LearnableRegion | None = None
    grounding: RegionPredictor | None = None

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, dtype=jnp.float32, attention: str | None = None):
        if model.conditioner not in CONDITIONERS:
            raise ValueError(f"conditioner {model.conditioner!r} not in {CONDITIONERS}")
        kw = dict(dtype=dtype, attention=attention)
        parts: dict[str, Any] = dict(
            unet=UNet(dataclass_from_dict(UNetConfig, model.unet), **kw),
            vae=VAE(dataclass_from_dict(VAEConfig, model.vae), **kw),
            conditioner=model.conditioner,
            coord_channels=bool(model.get("coord_channels", False)),
            source_blend=bool(model.get("source_blend", False)),
            image_condition=model.get("image_condition", "source"),
        )
        if parts["image_condition"] not in IMAGE_CONDITIONS:
            raise ValueError(f"image_condition {parts['image_condition']!r} not in {tuple(IMAGE_CONDITIONS)}")
        if model.get("mask_encoder") is not None:
            if not parts["unet"].config.gated_injection:
                raise ValueError("the mask encoder's tokens enter through the UNet's gated injection layer "
                                 "(unet.injection_layer): a mask_encoder needs unet.gated_injection=True")  # fmt: skip
            parts["mask_encoder"] = MaskEncoder(dataclass_from_dict(MaskEncoderConfig, model.mask_encoder), dtype=dtype)
        if model.get("learnable_region") is not None:
            parts["region"] = LearnableRegion.from_config(model.learnable_region, **kw)
        _check_unet_channels(parts["unet"].config, parts["vae"].config, model)
        if model.conditioner == "clip_text" or model.get("text_encoder") is not None:
            parts["text_encoder"] = CLIPTextModel(dataclass_from_dict(CLIPTextConfig, model.text_encoder), **kw)
        if model.get("grounding") is not None:
            if model.conditioner != "vlm":
                raise ValueError("FireEdit's grounding reads the VLM's states: model.grounding needs conditioner='vlm'")
            parts["grounding"] = RegionPredictor(dataclass_from_dict(RegionPredictorConfig, model.grounding), **kw)
        if model.conditioner == "vlm":
            llm = dataclass_from_dict(LlamaConfig, model.llm)
            vision = dataclass_from_dict(DINOv2Config, model.vision)
            regions = dataclass_from_dict(RegionEncoderConfig, model.regions) if model.use_regions else None
            check_vlm_configs(llm, vision, regions)
            parts["vlm"] = VLM(llm, vision, regions, merge=model.get("merge", 2), **kw)
            parts["qformer"] = QFormer(dataclass_from_dict(QFormerConfig, model.qformer), **kw)
            parts["vlm_image_size"] = model.vlm_image_size
        if model.get("use_tati", False):
            parts["tati"] = TATI(dataclass_from_dict(TATIConfig, model.tati), **kw)
        if model.get("use_hvca", False):
            parts["hvca"] = HVCA(dataclass_from_dict(HVCAConfig, model.hvca), **kw)
            parts["clip_vision"] = CLIPVisionModel(dataclass_from_dict(CLIPVisionConfig, model.clip_vision), **kw)
            parts["hvca_sizes"] = tuple(model.hvca_sizes)
            if model.conditioner != "vlm":
                raise ValueError("HVCA reads the DINOv2 tower of the VLM: use_hvca needs conditioner='vlm'")
        return cls(**parts)

    # ------------------------------------------------------------------ sizes

    @property
    def context_length(self) -> int:
        if self.qformer is None:
            return self.text_encoder.config.max_position_embeddings
        return self.qformer.config.num_queries

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def max_text_length(self) -> int:
        """Tokens of the CLIP text encoder's input (clip_text conditioner)."""
        return self.text_encoder.config.max_position_embeddings

    @property
    def num_image_tokens(self) -> int:
        """The VLM's image tokens ((vlm_image_size / patch / merge)²; 256 in FireEdit-7B)."""
        grid = self.vlm_image_size // self.vlm.vision.patch_size // self.vlm.merge
        return grid * grid

    @property
    def latent_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def guidance(self) -> str:
        """The edit loop's guidance mode for this UNet's image condition: "dual" or "text"."""
        return IMAGE_CONDITIONS[self.image_condition]

    # ------------------------------------------------------------------ params

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Fresh (boxed, logically partitioned) params; `jax.eval_shape` it for the tree."""
        keys = iter(jax.random.split(key, 9))
        f, length, width = self.latent_factor, self.context_length, self.context_dim
        text = jnp.zeros((1, length, width))
        params = {
            "unet": self.unet.init(next(keys), jnp.zeros((1, 2, 2, self.unet.config.in_channels)), jnp.zeros((1,)),
                                   text)["params"],  # fmt: skip
            "vae": self.vae.init(next(keys), jnp.zeros((1, 2 * f, 2 * f, 3))).get("params", {}),  # {}: pixel_unshuffle
            "null_text": jnp.zeros((length, width)),
        }
        if self.text_encoder is not None:
            ids = jnp.zeros((1, self.max_text_length), jnp.int32)
            params["text_encoder"] = self.text_encoder.init(next(keys), ids)["params"]
        if self.vlm is not None:
            tokens = jnp.zeros((1, 40), jnp.int32)
            pixels = jnp.zeros((1, self.vlm_image_size, self.vlm_image_size, 3))
            params["vlm"] = self.vlm.init(next(keys), pixels, tokens, None, jnp.zeros((1, 1, 4)))["params"]
            e = jnp.zeros((1, 32, self.vlm.llm.hidden_size))
            params["qformer"] = self.qformer.init(next(keys), e)["params"]
        if self.tati is not None:
            params["tati"] = self.tati.init(next(keys), text, jnp.zeros((1,)))["params"]
        if self.mask_encoder is not None:
            cells = self.mask_encoder.config.downsample_factor
            params["mask_encoder"] = self.mask_encoder.init(next(keys), jnp.zeros((1, cells, cells, 1)))["params"]
        if self.hvca is not None:
            size = self.clip_vision.config.image_size
            params["clip_vision"] = self.clip_vision.init(next(keys), jnp.zeros((1, size, size, 3)))["params"]
            visual = jnp.zeros((1, 4, self.hvca.config.visual_dim))
            params["hvca"] = self.hvca.init(next(keys), visual, None, text)["params"]
        if self.region is not None:  # its own key: the other parts keep theirs
            params["region"] = self.region.init(jax.random.fold_in(key, 1))
        if self.grounding is not None:
            inputs = example_inputs(self.grounding.config, patches=self.num_image_tokens)
            params["grounding"] = self.grounding.init(jax.random.fold_in(key, 2), *inputs)["params"]
        return params

    def draw_params(self, seed: int = 0) -> dict[str, Any]:
        """Host (numpy) params of `init`'s tree, drawn without compiling it (minutes for every FireEdit
        network on a CPU): norm scales 1, biases 0, every other leaf N(0, 0.02²), zero-initialised gates
        included. For tests and timings, where the shapes matter and the initialisers do not."""
        rng = np.random.default_rng(seed)

        def draw(path, leaf):
            name = getattr(path[-1], "key", "")
            if name in ("scale", "bias"):
                return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
            return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

        return jax.tree_util.tree_map_with_path(draw, flax.linen.meta.unbox(jax.eval_shape(self.init, jax.random.key(0))))

    # ------------------------------------------------------------------ conditioning (once per edit)

    def encode_text(self, params, input_ids: jax.Array) -> jax.Array:
        """int[B, L] → float[B, L, D]: CLIP last hidden states, no padding mask (as SD pipelines)."""
        return self.text_encoder.apply({"params": params["text_encoder"]}, input_ids).last_hidden_state

    def condition(self, params, pixels, text_inputs, boxes=None, box_mask=None, *, mask=None, dropout_key=None):
        """The edit's conditions, computed once per edit.

        Args:
          pixels: float[B, H, W, 3] in [-1, 1] (the source image); vlm: None for a text-only
            sequence (FireEdit's stage 1: no image tokens, no visual tokens).
          text_inputs: clip_text: int[B, L] CLIP ids; vlm: (input_ids, attention_mask) from
            `build_vlm_inputs`.
          boxes, box_mask: float[B, R, 4] normalised xyxy and bool[B, R] (vlm only).
          mask: float[B, h, w, 1] the edit mask at latent resolution (`latent_mask`), read by the
            mask encoder (+ "grounding"); None, or a model without one: no grounding tokens.
          dropout_key: None (inference), or a key turning the VLM's LoRA dropout and the
            Q-Former's hidden dropout on (training).
        Returns:
          ({"text": float[B, L, D], "visual": float[B, V, D] (HVCA only), "grounding": float[B, G, D]
          (mask encoder only)}, the VLMOutput (its [IMG] states e and logits) or None).
        """
        grounding = {}
        if self.mask_encoder is not None and mask is not None:
            grounding["grounding"] = self.mask_encoder.apply({"params": params["mask_encoder"]}, mask)
        if self.conditioner == "clip_text":
            return {"text": self.encode_text(params, text_inputs), **grounding}, None
        input_ids, attention_mask = text_inputs
        image = None if pixels is None else dinov2.normalize_pixels(unit_square(pixels, self.vlm_image_size))
        dropout = dict(deterministic=dropout_key is None, rngs=None if dropout_key is None else {"dropout": dropout_key})
        out = self.vlm.apply({"params": params["vlm"]}, image, input_ids, attention_mask, boxes, box_mask, **dropout)
        text = self.qformer.apply({"params": params["qformer"]}, out.e, **dropout)
        cond = {"text": text, **grounding}
        if self.hvca is not None and pixels is not None:
            visual = jax.lax.stop_gradient(self.visual_features(params, pixels, out.vision_states))
            cond["visual"] = self.hvca.apply({"params": params["hvca"]}, visual, None, text)
        return cond, out

    def ground(self, params, vlm_out, input_ids, boxes, box_mask) -> RegionPrediction:
        """FireEdit's own grounding (`grounding`): where the edit is, from the VLM's final states.
        The region tokens' states score the proposals and the image tokens' states give the cells,
        both reading the [IMG] states e, which come after the instruction (the states at the image and
        region positions precede it in the causal LLM, so they see only the image).

        vlm_out: `condition`'s VLMOutput; input_ids: int[B, T]; boxes, box_mask: float[B, R, 4], bool[B, R]."""
        llm = self.vlm.llm
        hidden = vlm_out.hidden
        image = placeholder_states(hidden, input_ids, token_id(llm, "<image>"), self.num_image_tokens)
        regions = placeholder_states(hidden, input_ids, token_id(llm, "<region>"), boxes.shape[1])
        words = jnp.ones(vlm_out.e.shape[:2], bool)
        return self.grounding.apply({"params": params["grounding"]}, image, vlm_out.e, words, boxes, box_mask, regions)

    def visual_features(self, params, pixels, vlm_vision_states=None) -> jax.Array:
        """HVCA's input: CLIP penultimate and DINOv2 last states at each of `hvca_sizes`, on tokens.

        The frozen encoders' features (float[B, S, 1024]); DINOv2 at the VLM's size is reused.
        """
        features = []
        for size in self.hvca_sizes:
            x = unit_square(pixels, size)
            clip_out = self.clip_vision.apply({"params": params["clip_vision"]}, clip.normalize_pixels(x),
                                              hidden_layers=(-2,))  # fmt: skip
            features.append(clip_out.hidden_states[0])
        for size in self.hvca_sizes:
            if size == self.vlm_image_size and vlm_vision_states is not None:
                features.append(vlm_vision_states)
                continue
            x = dinov2.normalize_pixels(unit_square(pixels, size))
            tower = DINOv2Model(self.vlm.vision, dtype=self.vlm.dtype, attention=self.vlm.attention)
            features.append(tower.apply({"params": params["vlm"]["vision"]}, x).last_hidden_state)
        return jnp.concatenate([f.astype(jnp.float32) for f in features], axis=1)

    def branches(self, params, cond):
        """The guidance branches' conditions, diffusers' order: dual (full, image-only, unconditional),
        text (full, unconditional). Grounding tokens (where to edit) are the same in every branch."""
        null = {"text": params["null_text"][None], **{k: cond[k] for k in ("grounding",) if k in cond}}
        if self.guidance == "text":
            return cond, null
        if "visual" in cond:
            image_only = {**null, "visual": cond["visual"]}
            return cond, image_only, {**null, "visual": jnp.zeros_like(cond["visual"])}
        return cond, null, null

    def encode_image(self, params, pixels: jax.Array) -> jax.Array:
        """float[B, H, W, 3] in [-1, 1] → the unscaled latent mode float[B, h, w, C] (IP2P's image condition)."""
        mean, _ = self.vae.apply({"params": params["vae"]}, pixels, method=VAE.encode)
        return mean

    def latent_mask(self, mask: jax.Array) -> jax.Array:
        """float[B, H, W, 1] pixel mask in [0, 1] → float[B, h, w, 1]: each latent cell takes its
        pixels' largest value, so every cell an edited pixel touches is editable."""
        b, height, width, _ = mask.shape
        f = self.latent_factor
        return jnp.max(mask.reshape(b, height // f, f, width // f, f, 1), axis=(2, 4)).astype(jnp.float32)

    def image_condition_latents(self, params, pixels: jax.Array, mask: jax.Array | None = None) -> jax.Array | None:
        """The conditional branch's image channels for the edit loop (and training):
        "source" the source's unscaled latent mode; "masked" the latent mask ‖ the scaled latent
        mode of the source with the mask's pixels (≥ 0.5) zeroed (diffusers' inpainting layout);
        "none" None. mask: float[B, H, W, 1] pixel mask ("masked" only)."""
        if self.image_condition == "none":
            return None
        if self.image_condition == "source":
            return self.encode_image(params, pixels)
        if mask is None:
            raise ValueError("an inpainting UNet (image_condition='masked') needs the edit mask")
        masked = self.encode_image(params, pixels * (mask < 0.5)) * self.vae.config.scaling_factor
        return jnp.concatenate([self.latent_mask(mask), masked], axis=-1)

    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Scaled latents float[B, h, w, C] → pixels float[B, H, W, 3] in [-1, 1] (clipped)."""
        image = self.vae.apply({"params": params["vae"]}, latents / self.vae.config.scaling_factor, method=VAE.decode)
        return jnp.clip(image, -1.0, 1.0)

    # ------------------------------------------------------------------ every step

    def denoise(self, params, latents_in: jax.Array, t: jax.Array, cond) -> jax.Array:
        """The edit loop's denoiser: the UNet's output, or with source_blend its blend with the source."""
        out = self.unet_output(params, latents_in, t, cond)
        if not self.source_blend:
            return out
        # latents_in = noisy ‖ image latent (unscaled; zeros in the image-null branches)
        content, keep = blend_parts(out)
        source = latents_in[..., -content.shape[-1] :] * self.vae.config.scaling_factor
        return (keep * source + (1.0 - keep) * content).astype(out.dtype)

    def unet_output(self, params, latents_in: jax.Array, t: jax.Array, cond) -> jax.Array:
        """TATI (if on) makes the text condition time-aware; the UNet reads latents_in (‖ coordinates if on)."""
        text = cond["text"]
        if self.tati is not None:
            text = self.tati.apply({"params": params["tati"]}, text, t)
        unet_in = jnp.concatenate([latents_in, coordinates(latents_in)], -1) if self.coord_channels else latents_in
        return self.unet.apply({"params": params["unet"]}, unet_in, t, text, cond.get("visual"), cond.get("grounding"))


# The VAE posteriors the IP2P loss needs: the source's mode, unscaled (the image condition),
# and the target's mean and log-variance (a sample is drawn per step).
LATENT_FIELDS = ("source_latents", "target_latents_mean", "target_latents_logvar")


def encode_latents(model: EditModel, params, source: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Pixels float[B, H, W, 3] in [-1, 1] → the `LATENT_FIELDS`, each float32[B, h, w, C].

    One encoder pass over target ‖ source (half the compiled graph of two passes).
    """
    mean, logvar = model.vae.apply({"params": params["vae"]}, jnp.concatenate([target, source]), method=VAE.encode)
    (target_mean, source_mean), (target_logvar, _) = jnp.split(mean, 2), jnp.split(logvar, 2)
    return dict(zip(LATENT_FIELDS, (source_mean, target_mean, target_logvar)))


def blend_parts(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A source_blend UNet's output float[B, h, w, 2C] → (content float[B, h, w, C], keep float32 in (0, 1))."""
    content, logits = jnp.split(out, 2, axis=-1)
    return content, jax.nn.sigmoid(logits.astype(jnp.float32))


def _check_unet_channels(unet: UNetConfig, vae: VAEConfig, model: ml_collections.ConfigDict) -> None:
    """The UNet's channels must fit the input and output that image_condition, coord_channels and
    source_blend give it."""
    coords, blend = bool(model.get("coord_channels", False)), bool(model.get("source_blend", False))
    image = model.get("image_condition", "source")
    if blend and model.scheduler.get("prediction_type") != "sample":
        raise ValueError("source_blend mixes the source latent into an x0 prediction: it needs "
                         "scheduler.prediction_type='sample'")  # fmt: skip
    if blend and image != "source":
        raise ValueError(f"source_blend reads the source latent from the UNet's input: it needs "
                         f"image_condition='source', not {image!r}")  # fmt: skip
    latent = vae.latent_channels
    image_channels = {"source": latent, "masked": latent + 1, "none": 0}.get(image, latent)
    want = (latent + image_channels + 2 * coords, latent * (1 + blend))
    if (unet.in_channels, unet.out_channels) != want:
        raise ValueError(f"the UNet has {unet.in_channels} input / {unet.out_channels} output channels; {latent} "
                         f"latent channels with image_condition={image!r}, coord_channels={coords}, "
                         f"source_blend={blend} need {want[0]} / {want[1]}")


def trainable_counts(tree) -> dict[str, int]:
    """{top-level network: parameter count} of a (boxed or abstract) param tree."""
    tree = flax.linen.meta.unbox(tree)
    return {name: sum(int(x.size) for x in jax.tree.leaves(sub)) for name, sub in tree.items()}
