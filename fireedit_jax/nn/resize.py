"""Resampling that matches torch.nn.functional.interpolate exactly.

`jax.image.resize(..., "cubic")` uses Keys' a = -0.5 and antialiasing; torch's
bicubic uses a = -0.75, no antialiasing and clamped border taps, which differ by up
to 0.33 on position embeddings. These are the torch rules, as interpolation matrices.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's cubic convolution coefficient


def _cubic(t):
    t = np.abs(t).astype(np.float32)
    return np.where(
        t <= 1,
        ((_A + 2) * t - (_A + 3)) * t * t + 1,
        np.where(t < 2, ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A, 0.0),
    )


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in]: torch bicubic (align_corners=False, size given) along one axis."""
    # torch computes source coordinates and weights in float32; so do we, to the bit.
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    frac = (src - base).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(-1, 3):
        index = np.clip(base + tap, 0, in_size - 1).astype(int)
        np.add.at(matrix, (np.arange(out_size), index), _cubic(frac - tap))
    return matrix


def bicubic_resize(x, size: tuple[int, int]):
    """x: float[..., H, W, C] → float[..., h, w, C], as torch bicubic with align_corners=False."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == tuple(size):
        return x
    rows = jnp.asarray(bicubic_matrix(h_in, size[0]), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(w_in, size[1]), jnp.float32)
    y = jnp.einsum("hH,...HWc->...hWc", rows, x.astype(jnp.float32), precision="highest")
    y = jnp.einsum("wW,...hWc->...hwc", cols, y, precision="highest")
    return y.astype(x.dtype)
