"""Where an edit pair edits: the region target of grounded editing, from any edit triplet.

A record that carries a mask (ShapeEdit's exact masks, MagicBrush's `mask_img`, UltraEdit's
region masks, a folder + JSONL `mask_image`) gives it. Any other pair (InstructPix2Pix-style
data) gives its *difference mask*, computed on the same crop as the images:

  |target − source| (the largest of the three channels, 0-255) > `threshold`
  → changes within `link` pixels of each other grouped; groups of fewer than `min_area` changed
    pixels dropped: specks of resampling and JPEG noise go, while the scattered corners of a
    small shape change (a 5-pixel circle made a square differs in 4 pixels) stay together
  → dilated by `dilation` pixels (the seam of an edit is part of it)

Tested on ShapeEdit, where the target differs from the source only inside the edited box: the
difference mask's box is the edit's box within one latent cell for every kind (a shape change
between shapes that overlap leaves their overlap unchanged; the mask is the rest).
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 24.0  # of 255: above resampling ripples and JPEG noise, below a visible change
MIN_AREA = 4  # pixels
LINK = 2  # pixels
DILATION = 1  # pixels


def difference_mask(source: np.ndarray, target: np.ndarray, *, threshold: float = THRESHOLD,
                    min_area: int = MIN_AREA, link: int = LINK, dilation: int = DILATION) -> np.ndarray:  # fmt: skip
    """uint8[H, W, 3] source and target → bool[H, W], True where the pair differs (module docstring)."""
    from scipy import ndimage

    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} differ in shape")
    change = np.max(np.abs(target.astype(np.int16) - source.astype(np.int16)), axis=-1) > threshold
    if min_area > 1 and change.any():
        linked = ndimage.binary_dilation(change, np.ones((2 * link + 1,) * 2, bool)) if link else change
        labels, count = ndimage.label(linked, np.ones((3, 3), bool))
        sizes = ndimage.sum(change, labels, np.arange(1, count + 1))  # changed pixels per group
        change &= np.isin(labels, 1 + np.flatnonzero(sizes >= min_area))
    if dilation and change.any():
        change = ndimage.binary_dilation(change, np.ones((2 * dilation + 1,) * 2, bool))
    return change

