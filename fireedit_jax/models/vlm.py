"""The region-aware VLM: DINOv2 image tokens + region tokens + instruction → LLaMA → e.

Shapes: B batch, T tokens (a length bucket), R boxes (a box bucket), I image tokens
((grid / merge)², 256 at 448 px), D the LLM width, V' = V + new tokens.

  pixels ─► DINOv2 (frozen) ─► last states ─► 2×2 merge ─► adapter (Linear, GELU, Linear) ─► I tokens
                 └─ hidden_states[-3:] ─► region encoder(boxes) ─► R tokens
  embed(input_ids) with <image> / <region> rows replaced, in order ─► LLaMA (+LoRA)
  e = final (post-RMSNorm) states at the 32 [IMG] positions;  L_VLM = NLL of the targets

The template and its buckets are built on the host (`data/vlm_inputs.py`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.vlm_tokens import NEW_TOKENS, NUM_IMG_TOKENS
from fireedit_jax.models.dinov2 import DINOv2Config, DINOv2Model, patch_grid
from fireedit_jax.models.llama import Llama, LlamaConfig
from fireedit_jax.models.regions import RegionEncoder, RegionEncoderConfig
from fireedit_jax.nn.linear import dense

Dtype = Any
REGION_LAYERS = (-3, -2, -1)


@flax.struct.dataclass
class VLMOutput:
    """e: float[B, 32, D]; logits: float32[B, T, V']; vision_states: float[B, 1+n+h·w, Dv]
    (DINOv2's normed last states, reused by HVCA); hidden: float[B, T, D] the LLM's final
    (post-RMSNorm) states at every position (FireEdit's grounding reads them)."""

    e: jax.Array
    logits: jax.Array
    vision_states: jax.Array
    hidden: jax.Array | None = None


def token_id(llm: LlamaConfig, token: str) -> int:
    """Ids of the new tokens follow the base vocabulary in `NEW_TOKENS` order (vlm_tokens.py)."""
    return llm.vocab_size + NEW_TOKENS.index(token)


def merge_patches(grid: jax.Array, merge: int) -> jax.Array:
    """float[B, h, w, C] → float[B, (h/m)·(w/m), m·m·C]: each m×m block of patches becomes one token."""
    b, h, w, c = grid.shape
    if h % merge or w % merge:
        raise ValueError(f"patch grid {h}×{w} does not split into {merge}×{merge} blocks")
    x = grid.reshape(b, h // merge, merge, w // merge, merge, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // merge) * (w // merge), merge * merge * c)


def splice(embeds: jax.Array, input_ids: jax.Array, placeholder: int, rows: jax.Array) -> jax.Array:
    """Replaces the k-th `placeholder` position of each sample by rows[:, k] (k in order).

    embeds: float[B, T, D]; rows: float[B, K, D] with K ≥ the placeholders per sample.
    """
    is_slot = input_ids == placeholder
    index = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, max(rows.shape[1] - 1, 0))
    if rows.shape[1] == 0:
        return embeds
    gathered = jnp.take_along_axis(rows, index[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(is_slot[..., None], gathered, embeds)


def img_positions(input_ids: jax.Array, first_img_id: int) -> jax.Array:
    """int[B, 32]: the positions of [IMG_1] … [IMG_32] (contiguous; the first one found by argmax)."""
    start = jnp.argmax(input_ids >= first_img_id, axis=1)
    return start[:, None] + jnp.arange(NUM_IMG_TOKENS)[None, :]


def placeholder_states(hidden: jax.Array, input_ids: jax.Array, placeholder: int, count: int) -> jax.Array:
    """float[B, T, D] states → float[B, count, D]: those at the first `count` positions of the
    (contiguous) `placeholder` block of each sequence, in order (the image or the region tokens)."""
    start = jnp.argmax(input_ids == placeholder, axis=1)
    positions = jnp.minimum(start[:, None] + jnp.arange(count)[None, :], hidden.shape[1] - 1)
    return jnp.take_along_axis(hidden, positions[..., None], axis=1)


def vlm_loss(logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array, sample_weight=None) -> jax.Array:
    """L_VLM: mean next-token NLL over target positions (the [IMG] tokens, or VQA answers).

    The logits at position p − 1 predict token p. sample_weight: bool or float[B], each
    sample's tokens weighted by it (0 drops the sample); the mean is over the weighted tokens.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    weight = target_mask[:, 1:].astype(jnp.float32)
    if sample_weight is not None:
        weight = weight * jnp.asarray(sample_weight, jnp.float32)[:, None]
    total = jnp.sum(weight)
    return jnp.where(total > 0, jnp.sum(jnp.where(weight > 0, nll, 0.0) * weight) / jnp.maximum(total, 1e-12), 0.0)


class VLM(nn.Module):
    """Params: vision (frozen DINOv2), adapter_in / adapter_out, regions (if enabled), llm."""

    llm: LlamaConfig
    vision: DINOv2Config
    regions: RegionEncoderConfig | None = None  # None: no region tokens (ablation)
    merge: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, pixels, input_ids, attention_mask, boxes=None, box_mask=None, *, deterministic: bool = True):
        """Args:
          pixels: float[B, H, W, 3], DINOv2-normalised (448 px in FireEdit), or None for a
            text-only sequence (stage 1's captions: no image or region tokens, no vision tower).
          input_ids, attention_mask: int[B, T], bool[B, T] from `build_vlm_inputs`.
          boxes: float[B, R, 4] normalised xyxy; box_mask: bool[B, R] (ignored without regions).
        Returns:
          VLMOutput (vision_states None without pixels).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        llm = Llama(self.llm, attention=self.attention, name="llm", **kw)
        embeds = llm.embed(input_ids)
        seen = None
        if pixels is not None:
            embeds, seen = self._splice_visual(embeds, pixels, input_ids, boxes, box_mask)
        out = llm(inputs_embeds=embeds, attention_mask=attention_mask, deterministic=deterministic)
        positions = img_positions(input_ids, token_id(self.llm, "[IMG_1]"))
        e = jnp.take_along_axis(out.last_hidden_state, positions[..., None], axis=1)
        return VLMOutput(e=e, logits=out.logits, vision_states=None if seen is None else seen.last_hidden_state,
                         hidden=out.last_hidden_state)  # fmt: skip

    def _splice_visual(self, embeds, pixels, input_ids, boxes, box_mask):
        """The image tokens (and region tokens) in place of their placeholders; also DINOv2's output."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = REGION_LAYERS if self.regions is not None else ()
        seen = DINOv2Model(self.vision, attention=self.attention, name="vision", **kw)(pixels, hidden_layers=layers)
        seen = jax.lax.stop_gradient(seen)  # the image encoder is frozen in every stage
        grid = patch_grid(seen.last_hidden_state, seen.grid, self.vision)
        width = self.llm.hidden_size
        image = dense(width, ("mlp", "embed"), name="adapter_in", **kw)(merge_patches(grid, self.merge))
        image = dense(width, ("mlp", "embed"), name="adapter_out", **kw)(nn.gelu(image, approximate=False))
        embeds = splice(embeds, input_ids, token_id(self.llm, "<image>"), image)
        if self.regions is not None:
            if boxes is None:
                boxes, box_mask = jnp.zeros((pixels.shape[0], 0, 4)), None
            if boxes.shape[1] or self.is_initializing():  # no boxes: nothing to splice
                levels = [patch_grid(h, seen.grid, self.vision) for h in seen.hidden_states]
                tokens = RegionEncoder(self.regions, name="regions", **kw)(levels, boxes, box_mask)
                embeds = splice(embeds, input_ids, token_id(self.llm, "<region>"), tokens)
        return embeds, seen


def check_vlm_configs(llm: LlamaConfig, vision: DINOv2Config, regions: RegionEncoderConfig | None) -> None:
    """Checks that the three configs fit together (widths), naming what disagrees."""
    if regions is not None:
        problems = []
        if regions.feature_dim != vision.hidden_size:
            problems.append(f"regions.feature_dim {regions.feature_dim} ≠ vision.hidden_size {vision.hidden_size}")
        if regions.llm_dim != llm.hidden_size:
            problems.append(f"regions.llm_dim {regions.llm_dim} ≠ llm.hidden_size {llm.hidden_size}")
        if regions.patch_size != vision.patch_size:
            problems.append(f"regions.patch_size {regions.patch_size} ≠ vision.patch_size {vision.patch_size}")
        if problems:
            raise ValueError("VLM configs do not fit: " + "; ".join(problems))

