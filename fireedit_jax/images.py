"""Host-side image handling: any file, size and mode in; RGB arrays the model can take out."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fireedit_jax import storage


class ImageError(ValueError):
    """An input image that cannot be used; the message names it."""


def open_image(path, what: str = "image") -> Image.Image:
    """The image file at `path` (local or gs://), as stored; ImageError if missing or unreadable."""
    path = os.fspath(path)
    if not storage.as_path(path).exists():
        raise ImageError(f"{what} {path!r} does not exist")
    try:
        with Image.open(io.BytesIO(storage.as_path(path).read_bytes())) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"{what} {path!r} is not a readable image file ({err})") from None


def load_image(image) -> Image.Image:
    """A path (local or gs://) or PIL image → an RGB PIL image (16-bit, grayscale, palette and alpha handled)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
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


# ---------------------------------------------------------------- edit masks (1 = edit, 0 = keep)

GREY_FRACTION = 0.05  # a mask with more grey pixels than this is a picture, not a mask


def mask_from_image(image: Image.Image, what: str = "mask") -> np.ndarray:
    """A mask image → bool[H, W], True where to edit: an image with transparent pixels marks the
    edit region by transparency (DALL-E 2's edit-mask convention), any other by white. Raises
    ImageError for a picture that is not a black-and-white mask."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if (alpha < 128).any():
            return alpha < 128
    grey = np.asarray(to_rgb(image).convert("L"))
    if np.mean((grey > 32) & (grey < 223)) > GREY_FRACTION:
        raise ImageError(f"{what} is not a black-and-white mask: {np.mean((grey > 32) & (grey < 223)):.0%} of its "
                         "pixels are grey. Paint the region to edit white on black (or transparent)")  # fmt: skip
    return grey >= 128


def load_mask(mask, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A mask path, PIL image or array (bool / 0-1 / 0-255) → bool[H, W] at `size` = (W, H).

    A mask of another size is resized (nearest) with a warning; an empty or all-edit mask is an
    ImageError (nothing to edit, or nothing to keep: edit without a mask instead)."""
    import warnings

    if isinstance(mask, (str, os.PathLike, Image.Image)):
        array = mask_from_image(mask if isinstance(mask, Image.Image) else open_image(mask, what), what)
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise ImageError(f"{what}: expected a [H, W] array, got shape {array.shape}")
        array = array > (127 if array.dtype == np.uint8 else 0.5)
    if array.shape[::-1] != tuple(size):
        warnings.warn(f"{what} is {array.shape[1]}×{array.shape[0]}, the image {size[0]}×{size[1]}: resized (nearest)")
        array = np.asarray(Image.fromarray(array).resize(tuple(size), Image.NEAREST))
    if not array.any():
        raise ImageError(f"{what} is empty: it marks nothing to edit")
    if array.all():
        raise ImageError(f"{what} covers the whole image: nothing would be kept (edit without a mask instead)")
    return array


def box_mask(box, size: tuple[int, int]) -> np.ndarray:
    """A normalised (x0, y0, x1, y1) box → bool[H, W] at `size` = (W, H), True inside (pixel i covers [i, i+1))."""
    values = np.asarray(box, np.float64).reshape(-1)
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise ImageError(f"mask box {list(np.asarray(box).reshape(-1))}: expected four numbers x0, y0, x1, y1")
    if values.min() < 0 or values.max() > 1 or values[2] <= values[0] or values[3] <= values[1]:
        raise ImageError(f"mask box {values.tolist()} must lie in [0, 1] with x0 < x1 and y0 < y1 "
                         "(normalised: divide pixel coordinates by the width and height)")  # fmt: skip
    width, height = size
    x0, y0, x1, y1 = (int(np.floor(values[0] * width)), int(np.floor(values[1] * height)),
                      int(np.ceil(values[2] * width)), int(np.ceil(values[3] * height)))  # fmt: skip
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool[H, W] → bool at `size` = (W, H): a pixel is in the mask if any of the mask covers it (the box
    filter's average is above 0), so a mask thinner than the new pixels shrinks to one, never to nothing."""
    mask = np.asarray(mask, bool)
    if mask.shape[::-1] == tuple(size):
        return mask.copy()
    coverage = Image.fromarray(mask.astype(np.float32)).resize(tuple(size), Image.BOX)
    return np.asarray(coverage) > 1e-6


def working_mask(mask: np.ndarray, size: tuple[int, int], dilation: int = 0, feather: float = 0.0) -> np.ndarray:
    """bool[H, W] → float32 at the working `size` = (W, H): `resize_mask`, then `soften_mask`."""
    return soften_mask(resize_mask(mask, size), dilation, feather)


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) around a non-empty mask bool[H, W], grown by `padding` pixels on
    each side and clipped to the image (diffusers' `padding_mask_crop`, without its aspect matching: the
    crop is edited at its own aspect's working size)."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    height, width = np.shape(mask)
    return (max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0),
            min(int(xs.max()) + 1 + padding, width), min(int(ys.max()) + 1 + padding, height))  # fmt: skip


def thinner_than(mask: np.ndarray, cell: int) -> bool:
    """Whether no cell × cell square fits inside the mask bool[H, W] anywhere (a stroke thinner than one
    latent cell: the edit's cells are wider than what was marked)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return cell > 1 and mask.any() and not ndimage.binary_erosion(mask, np.ones((cell, cell), bool)).any()


def composite(source: Image.Image, edited: Image.Image, weight: np.ndarray) -> Image.Image:
    """The edit pasted into the source at the source's own size: source·(1 − w) + edited·w, w float[H, W]
    in [0, 1] (1 inside the region, fading over a feathered seam); where w is 0 the output is the source,
    pixel for pixel."""
    if source.size != edited.size or weight.shape != source.size[::-1]:
        raise ValueError(f"composite: source {source.size}, edit {edited.size} and weight {weight.shape[::-1]} differ")
    a, b = np.asarray(source.convert("RGB"), np.float32), np.asarray(edited.convert("RGB"), np.float32)
    w = np.asarray(weight, np.float32)[..., None]
    blended = np.clip(np.rint(a * (1.0 - w) + b * w), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(w > 0, blended, np.asarray(source.convert("RGB"))), "RGB")


def restore_edit(source: Image.Image, edited: np.ndarray, region: np.ndarray | None = None, dilation: int = 0,
                 feather: float = 0.0) -> Image.Image:  # fmt: skip
    """A model's output float[h, w, 3] in [-1, 1] at the source's size: the whole of it (no region), or
    composited into the source (as `to_rgb` reads it) under `region` bool[H, W] grown and feathered
    (`soften_mask`)."""
    out = from_model_array(edited, source.size)
    return out if region is None else composite(to_rgb(source), out, soften_mask(region, dilation, feather))


def soften_mask(mask: np.ndarray, dilation: int = 0, feather: float = 0.0) -> np.ndarray:
    """bool[H, W] → float32[H, W] in [0, 1]: grown by `dilation` pixels (a square neighbourhood),
    then feathered outwards: a pixel d pixels outside weighs smoothstep(1 − d / feather), so the
    region marked stays fully edited and the blend fades out over `feather` pixels around it."""
    from scipy import ndimage

    out = np.asarray(mask, bool)
    if dilation:
        out = ndimage.binary_dilation(out, np.ones((2 * dilation + 1,) * 2, bool))
    if not feather:
        return out.astype(np.float32)
    ramp = np.clip(1.0 - ndimage.distance_transform_edt(~out) / feather, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)
