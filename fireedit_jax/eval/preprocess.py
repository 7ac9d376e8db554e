"""Host-side image preprocessing for the editing metrics, as the reference scripts do it.

Every function takes a PIL image (or a uint8[H, W, 3] array), converts it to RGB with
PIL as MagicBrush's `evaluation/image_eval.py` does before any transform, and returns
float32 NHWC-ready arrays [H, W, 3] (stack them for a batch):

  clip_pixels   `clip.load(...)`'s preprocess (MagicBrush CLIP-I / CLIP-T): the shorter side
                resized to 224 (PIL bicubic), centre crop 224, [0, 1], CLIP mean/std.
  ip2p_clip_pixels   InstructPix2Pix's `metrics/clip_similarity.py`: [0, 1], then torch
                bicubic (no antialiasing, no crop, aspect not kept) to 224×224, CLIP mean/std.
  dino_pixels   MagicBrush's DINO transform: Resize(256, bicubic) on the shorter side,
                CenterCrop(224), [0, 1], ImageNet mean/std.
  distance_pair MagicBrush's L1 / L2 inputs: the generated image resized to the reference's
                size (PIL's default bicubic), both in [0, 1].

Resizing and cropping follow torchvision's rules on PIL images exactly (its output-size
and crop-offset rounding), so the arrays equal torchvision's transforms' output.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fireedit_jax.models import clip, vit
from fireedit_jax.nn.resize import bicubic_matrix

CLIP_SIZE = 224
DINO_RESIZE, DINO_CROP = 256, 224


def to_rgb(image) -> Image.Image:
    """A PIL image or uint8[H, W, 3] array → an RGB PIL image (PIL's convert, as the reference scripts)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8[H, W, 3] array, got {image.dtype}{list(image.shape)}")
        return Image.fromarray(image, "RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: shorter side → size, longer → int(size · long / short)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` on a PIL image at least `size` on each side."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"a {width}×{height} image is smaller than the {size}×{size} crop")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_unit_array(image: Image.Image) -> np.ndarray:
    """torchvision `ToTensor()`, channels last: uint8 RGB → float32[H, W, 3] in [0, 1]."""
    return np.asarray(image, np.uint8).astype(np.float32) / np.float32(255)


def normalize(array: np.ndarray, mean, std) -> np.ndarray:
    """torchvision `Normalize(mean, std)` on float32[..., 3]."""
    return (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_pixels(image, size: int = CLIP_SIZE) -> np.ndarray:
    """OpenAI CLIP's preprocess → float32[size, size, 3]."""
    image = center_crop(resize_shorter_side(to_rgb(image), size), size)
    return normalize(to_unit_array(image), clip.PIXEL_MEAN, clip.PIXEL_STD)


def ip2p_clip_pixels(image, size: int = CLIP_SIZE) -> np.ndarray:
    """InstructPix2Pix's CLIP input → float32[size, size, 3] (torch bicubic, align_corners=False)."""
    pixels = to_unit_array(to_rgb(image))
    height, width, _ = pixels.shape
    rows, cols = bicubic_matrix(height, size), bicubic_matrix(width, size)
    pixels = np.einsum("wW,hWc->hwc", cols, np.einsum("hH,HWc->hWc", rows, pixels))
    return normalize(pixels.astype(np.float32), clip.PIXEL_MEAN, clip.PIXEL_STD)


def dino_pixels(image, resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> np.ndarray:
    """MagicBrush's DINO transform → float32[crop, crop, 3]."""
    image = center_crop(resize_shorter_side(to_rgb(image), resize), crop)
    return normalize(to_unit_array(image), vit.PIXEL_MEAN, vit.PIXEL_STD)


def distance_pair(generated, reference) -> tuple[np.ndarray, np.ndarray]:
    """MagicBrush's L1 / L2 inputs → (generated, reference), float32[H, W, 3] in [0, 1] at the reference's size."""
    generated, reference = to_rgb(generated), to_rgb(reference)
    if generated.size != reference.size:
        generated = generated.resize(reference.size, Image.BICUBIC)
    return to_unit_array(generated), to_unit_array(reference)
