"""The editing model as one composition: conditioner + VAE + 8-channel UNet.

Shapes: B batch, h×w latent size, L text tokens (77), D context width (768).

`conditioner="clip_text"` is the InstructPix2Pix baseline: the CLIP text encoder's
last hidden states condition every cross-attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel
from fireedit_jax.models.unet import UNet, UNetConfig
from fireedit_jax.models.vae import VAE, VAEConfig

CONDITIONERS = ("clip_text",)


def dataclass_from_dict(cls, values):
    """A config dataclass from a (JSON-loaded) mapping; lists become tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return cls(**{k: as_tuple(v) for k, v in values.items()})


def _to_dict(values) -> dict:
    return values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values)


@dataclasses.dataclass(frozen=True)
class EditModel:
    """Holds the networks; every method is a pure function of `params`.

    params: {"unet", "vae", "text_encoder", "null_text": float[L, D]}
    """

    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    conditioner: str = "clip_text"

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, *, dtype=jnp.float32, attention: str | None = None):
        if model.conditioner not in CONDITIONERS:
            raise ValueError(f"conditioner {model.conditioner!r} not in {CONDITIONERS}")
        common = dict(dtype=dtype, attention=attention)
        return cls(
            unet=UNet(dataclass_from_dict(UNetConfig, _to_dict(model.unet)), **common),
            vae=VAE(dataclass_from_dict(VAEConfig, _to_dict(model.vae)), **common),
            text_encoder=CLIPTextModel(dataclass_from_dict(CLIPTextConfig, _to_dict(model.text_encoder)), **common),
            conditioner=model.conditioner,
        )

    @property
    def max_text_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    @property
    def latent_factor(self) -> int:
        return self.vae.config.downsample_factor

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Fresh (boxed, logically partitioned) params; `jax.eval_shape` it for the tree."""
        k_unet, k_vae, k_text = jax.random.split(key, 3)
        f = self.latent_factor
        pixels = jnp.zeros((1, 2 * f, 2 * f, 3))
        ids = jnp.zeros((1, self.max_text_length), jnp.int32)
        latents = jnp.zeros((1, 2, 2, self.unet.config.in_channels))
        context = jnp.zeros((1, self.max_text_length, self.unet.config.cross_attention_dim))
        return {
            "unet": self.unet.init(k_unet, latents, jnp.zeros((1,)), context)["params"],
            "vae": self.vae.init(k_vae, pixels)["params"],
            "text_encoder": self.text_encoder.init(k_text, ids)["params"],
            "null_text": jnp.zeros((self.max_text_length, self.unet.config.cross_attention_dim)),
        }

    def encode_text(self, params, input_ids: jax.Array) -> jax.Array:
        """int[B, L] → float[B, L, D]: last hidden states, no padding mask (as SD pipelines)."""
        return self.text_encoder.apply({"params": params["text_encoder"]}, input_ids).last_hidden_state

    def encode_image(self, params, pixels: jax.Array) -> jax.Array:
        """float[B, H, W, 3] in [-1, 1] → the unscaled latent mode float[B, h, w, C] (IP2P's image condition)."""
        mean, _ = self.vae.apply({"params": params["vae"]}, pixels, method=VAE.encode)
        return mean

    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Scaled latents float[B, h, w, C] → pixels float[B, H, W, 3] in [-1, 1] (clipped)."""
        image = self.vae.apply({"params": params["vae"]}, latents / self.vae.config.scaling_factor, method=VAE.decode)
        return jnp.clip(image, -1.0, 1.0)

    def denoise(self, params, latents_in: jax.Array, t: jax.Array, cond) -> jax.Array:
        """The edit loop's denoiser: cond = {"text": float[3B, L, D]}."""
        return self.unet.apply({"params": params["unet"]}, latents_in, t, cond["text"])
