"""Host-side image handling: any file, size and mode in; RGB arrays the model can take out."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fireedit_jax import storage


class ImageError(ValueError):
    """An input image that cannot be used; the message names it."""


def load_image(image) -> Image.Image:
    """A path (local or gs://) or PIL image → an RGB PIL image (16-bit, grayscale, palette and alpha handled)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not storage.as_path(path).exists():
            raise ImageError(f"image {path!r} does not exist")
        try:
            with Image.open(io.BytesIO(storage.as_path(path).read_bytes())) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ImageError(f"{path!r} is not a readable image file ({err})") from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected an image path or a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale to 8 bits instead of clipping at 255
        array = np.asarray(image, np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def working_size(width: int, height: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """(W, H): the input's aspect ratio at about resolution² pixels, each side a multiple of `multiple`."""
    scale = resolution / np.sqrt(width * height)
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in (width, height))


def to_model_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB PIL → float32[H, W, 3] in [-1, 1] at `size` = (W, H) (bicubic when resizing)."""
    if image.size != tuple(size):
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def from_model_array(array, size: tuple[int, int] | None = None) -> Image.Image:
    """float[H, W, 3] in [-1, 1] → RGB PIL, resized back to `size` = (W, H) if given."""
    pixels = np.clip((np.asarray(array, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(size, Image.BICUBIC)
    return image
