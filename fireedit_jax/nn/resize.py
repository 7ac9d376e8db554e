"""Resampling that matches torch.nn.functional.interpolate exactly (bicubic, antialiased bicubic, bilinear).

`jax.image.resize(..., "cubic")` uses Keys' a = -0.5 and antialiasing; torch's
bicubic uses a = -0.75, no antialiasing and clamped border taps, which differ by up
to 0.33 on position embeddings. These are the torch rules, as interpolation matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's cubic convolution coefficient


def _cubic(t, a: float = _A):
    """Keys' cubic convolution kernel."""
    t = np.abs(t).astype(np.float32)
    a = np.float32(a)
    return np.where(
        t < 1,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    ).astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in]: torch bicubic (align_corners=False, size given) along one axis."""
    # torch computes scale·(i + ½) − ½ in float32 with one rounding (FMA); float64 is exact here.
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    base = np.floor(src)
    frac = (src - base).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(-1, 3):
        index = np.clip(base + tap, 0, in_size - 1).astype(int)
        np.add.at(matrix, (np.arange(out_size), index), _cubic(frac - tap))
    return matrix


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in]: torch bicubic with antialias=True (align_corners=False, size given) along one axis.

    torch's antialiased kernel is PIL's: Keys' cubic with a = −0.5, stretched by the
    scale when shrinking, truncated at the borders (no clamped taps) and normalised to
    sum to one — so it differs from plain bicubic even when enlarging.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    support = np.float32(2 * scale if scale >= 1 else 2)
    stretch = np.float32(1 / scale if scale >= 1 else 1)
    taps = int(np.ceil(support)) * 2 + 1
    out = np.arange(out_size)
    center = (np.float64(scale) * (out + 0.5)).astype(np.float32)
    first = np.maximum((center + np.float64(0.5) - support).astype(np.int64), 0)
    last = np.minimum((center + np.float64(0.5) + support).astype(np.int64), in_size)
    count = np.clip(last - first, 0, taps)
    tap = np.arange(taps)
    index = first[:, None] + tap
    valid = tap < count[:, None]
    offset = ((index - center[:, None]).astype(np.float32) + np.float64(0.5)) * stretch
    weights = np.where(valid, _cubic(offset.astype(np.float32), -0.5), 0).astype(np.float32)
    weights /= weights.sum(-1, keepdims=True)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.broadcast_to(out[:, None], index.shape)
    np.add.at(matrix, (rows[valid], index[valid]), weights[valid])
    return matrix


def bicubic_resize(x, size: tuple[int, int], antialias: bool = False):
    """x: float[..., H, W, C] → float[..., h, w, C], as torch bicubic with align_corners=False."""
    matrix = antialiased_bicubic_matrix if antialias else bicubic_matrix
    return _resample(x, size, matrix)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in]: torch bilinear interpolation with align_corners=True along one axis."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    src = scale * np.arange(out_size, dtype=np.float32)
    low = np.minimum(np.floor(src).astype(int), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(src - low, 0, 1).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


def bilinear_resize(x, size: tuple[int, int]):
    """x: float[..., H, W, C] → float[..., h, w, C], as torch bilinear with align_corners=True."""
    return _resample(x, size, bilinear_matrix)


def _resample(x, size, matrix):
    """Applies a separable interpolation matrix along H and W (in float32, full precision)."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == tuple(size):
        return x
    rows = jnp.asarray(matrix(h_in, size[0]), jnp.float32)
    cols = jnp.asarray(matrix(w_in, size[1]), jnp.float32)
    y = jnp.einsum("hH,...HWc->...hWc", rows, x.astype(jnp.float32), precision="highest")
    y = jnp.einsum("wW,...hWc->...hwc", cols, y, precision="highest")
    return y.astype(x.dtype)


def unit_square(pixels, size: int):
    """float[B, H, W, 3] in [-1, 1] → float32 in [0, 1] at size × size (antialiased bicubic when
    shrinking, clipped): what the vision towers' pixel normalisations start from."""
    x = (pixels.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] == (size, size):
        return x
    return jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic", antialias=True).clip(0.0, 1.0)
