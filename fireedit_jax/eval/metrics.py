"""Editing metrics of MagicBrush, Emu Edit and InstructPix2Pix, on batches of images or embeddings.

Each function takes numpy or jax arrays with any leading batch axes and returns one value
per sample (jax arrays, float32); `aggregate` averages per-sample records per benchmark
or edit type. Conventions (REFERENCES.md §8):

  l1_distance / l2_distance   MagicBrush: mean |a − b| / mean (a − b)² over pixels and
                              channels of [0, 1] images (`preprocess.distance_pair`).
  clip_i, dino_score          cosine of two images' embeddings (CLIP image embeds of
                              `preprocess.clip_pixels`; DINO class tokens of `dino_pixels`).
  clip_t                      cosine of an image's and a caption's CLIP embeddings.
  clip_direction              InstructPix2Pix / Emu Edit CLIP-dir: cos(î₁ − î₀, t̂₁ − t̂₀) of
                              L2-normalised embeddings (source image/caption 0, edit 1).
  lpips_distance              LPIPS (models/lpips.py); not part of either benchmark.

Emu Edit compares the output with the *input* image (it has no targets): pass the
source image where MagicBrush passes the ground truth.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.models.lpips import LPIPS, LPIPSConfig

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's


def _pair(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    return a, b


def l1_distance(generated, reference):
    """generated, reference: float[..., H, W, C] in [0, 1] → float[...]: mean absolute difference."""
    generated, reference = _pair(generated, reference)
    return jnp.mean(jnp.abs(generated - reference), axis=(-3, -2, -1))


def l2_distance(generated, reference):
    """As `l1_distance`, the mean squared difference (MagicBrush's "L2" is torch's MSELoss)."""
    generated, reference = _pair(generated, reference)
    return jnp.mean(jnp.square(generated - reference), axis=(-3, -2, -1))


def unit(x, eps: float = COSINE_EPS):
    """x: float[..., E] → x / max(‖x‖, eps) along E."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity(a, b, eps: float = COSINE_EPS):
    """a, b: float[..., E] → float[...], as torch.nn.functional.cosine_similarity (0 for a zero vector)."""
    a, b = _pair(a, b)
    return jnp.sum(unit(a, eps) * unit(b, eps), axis=-1)


def clip_i(generated_embeds, reference_embeds):
    """CLIP-I: cosine of CLIP image embeddings float[..., E] → float[...]."""
    return cosine_similarity(generated_embeds, reference_embeds)


def dino_score(generated_features, reference_features):
    """DINO: cosine of DINO class-token features float[..., D] → float[...]."""
    return cosine_similarity(generated_features, reference_features)


def clip_t(image_embeds, text_embeds):
    """CLIP-T (Emu Edit's CLIP-out with the output caption): image vs caption embeddings → float[...]."""
    return cosine_similarity(image_embeds, text_embeds)


def clip_direction(source_image_embeds, edited_image_embeds, source_text_embeds, target_text_embeds):
    """CLIP-dir: cos(î₁ − î₀, t̂₁ − t̂₀) of L2-normalised embeddings float[..., E] → float[...].

    Zero when the two captions (or images) have equal embeddings (torch's convention);
    Emu Edit evaluations often drop such samples instead.
    """
    image_direction = unit(edited_image_embeds) - unit(source_image_embeds)
    text_direction = unit(target_text_embeds) - unit(source_text_embeds)
    return cosine_similarity(image_direction, text_direction)


@functools.lru_cache(maxsize=4)
def _lpips_apply(config: LPIPSConfig):
    return jax.jit(LPIPS(config).apply)


def lpips_distance(params, generated, reference, config: LPIPSConfig = LPIPSConfig(), *, normalize: bool = True):
    """LPIPS of image pairs float[B, H, W, 3] → float[B].

    Args:
      params: converted LPIPS params of `config`'s network (convert/lpips.py).
      normalize: the images are in [0, 1] (as `preprocess.distance_pair` gives) and are
        mapped to [-1, 1] first, as the lpips package's `normalize=True`; False for
        images already in [-1, 1].
    """
    generated, reference = _pair(generated, reference)
    if normalize:
        generated, reference = 2 * generated - 1, 2 * reference - 1
    return _lpips_apply(config)(params, generated, reference)


def _is_value(value: Any) -> bool:
    """A metric value: a real float scalar (not an int label, a bool or a string)."""
    return not isinstance(value, (str, bytes)) and np.ndim(value) == 0 and np.asarray(value).dtype.kind == "f"


def _mean_record(samples: Sequence[Mapping[str, Any]], metrics: Iterable[str]) -> dict:
    record = {"count": len(samples)}
    for name in metrics:
        values = [float(s[name]) for s in samples if s.get(name) is not None and not math.isnan(float(s[name]))]
        record[name] = sum(values) / len(values) if values else math.nan
    return record


def aggregate(per_sample: Sequence[Mapping[str, Any]], by: str | None = None,
              metrics: Sequence[str] | None = None) -> dict:
    """Means of per-sample metrics, overall or per value of one label field.

    Args:
      per_sample: one dict per edit, e.g. {"benchmark": "emu_edit", "task": "add",
        "clip_i": 0.91, "l1": 0.08}. A metric that is None or NaN in a sample (e.g. CLIP-dir
        of a sample with identical captions) is left out of that metric's mean.
      by: a label field ("benchmark", "task", …) to group by, or None for one overall mean.
      metrics: the fields to average; by default every field holding a float in any sample.
    Returns:
      {"count": n, metric: mean, …}, or with `by` {label value: that record} in sorted
      order of the values. A metric with no values in a group is NaN.
    """
    if metrics is None:
        metrics = sorted({k for s in per_sample for k, v in s.items() if k != by and _is_value(v)})
    if by is None:
        return _mean_record(per_sample, metrics)
    groups = defaultdict(list)
    for sample in per_sample:
        if by not in sample:
            raise KeyError(f"a sample has no {by!r} field to group by: {dict(sample)}")
        groups[sample[by]].append(sample)
    return {label: _mean_record(groups[label], metrics) for label in sorted(groups, key=str)}
