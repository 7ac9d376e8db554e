"""How ShapeEdit's objects look: the palette, the shapes' pixel masks, the textured background.

Shapes are drawn with PIL without antialiasing, inside odd-sized square boxes (so they are
symmetric): a target differs from its source only inside the edited box. data/shapes.py
places the objects and plans the edits; eval/shapes_metrics.py reads the pixels back.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {  # far from each other and from the light background
    "red": (220, 50, 50),
    "yellow": (230, 210, 50),
    "green": (50, 170, 70),
    "cyan": (50, 200, 210),
    "blue": (50, 80, 220),
    "purple": (140, 50, 180),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "big")
# The background: a tint per channel in BACKGROUND_TINT, stripes and pixel noise (together at
# most BACKGROUND_WOBBLE in each channel).
BACKGROUND_TINT = (185.0, 225.0)
STRIPE_AMPLITUDE = (2.0, 6.0)
PIXEL_NOISE = 3.0
BACKGROUND_WOBBLE = STRIPE_AMPLITUDE[1] + PIXEL_NOISE


class Obj(NamedTuple):
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # pixels, x0 y0 x1 y1, end exclusive


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """bool[height, width]: `shape` filling a width × height box, drawn without antialiasing."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    r, b = width - 1, height - 1
    if shape == "square":
        draw.rectangle([0, 0, r, b], fill=255)
    elif shape == "circle":
        draw.ellipse([0, 0, r, b], fill=255)
    elif shape == "triangle":
        draw.polygon([(r / 2, 0), (r, b), (0, b)], fill=255)
    elif shape == "diamond":
        draw.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    mask = np.asarray(canvas) > 0
    mask.setflags(write=False)
    return mask


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8[size, size, 3]: a light tint (per channel in BACKGROUND_TINT) with faint stripes
    and pixel noise (together at most BACKGROUND_WOBBLE in each channel)."""
    tint = rng.uniform(*BACKGROUND_TINT, 3)
    angle, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    period, amplitude = rng.uniform(6, 16), rng.uniform(*STRIPE_AMPLITUDE)
    y, x = np.mgrid[0:size, 0:size]
    stripes = amplitude * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)
    noise = rng.uniform(-PIXEL_NOISE, PIXEL_NOISE, (size, size))
    return np.clip(np.rint(tint + (stripes + noise)[..., None]), 0, 255).astype(np.uint8)


def object_mask(obj: Obj, size: int) -> np.ndarray:
    """bool[size, size]: the object's pixels."""
    mask = np.zeros((size, size), bool)
    x0, y0, x1, y1 = obj.box
    mask[y0:y1, x0:x1] = shape_mask(obj.shape, x1 - x0, y1 - y0)
    return mask


def render(backdrop: np.ndarray, objects: Sequence[Obj]) -> np.ndarray:
    """uint8[H, W, 3]: the objects painted on a copy of `backdrop`, each only inside its box."""
    image = backdrop.copy()
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        image[y0:y1, x0:x1][shape_mask(obj.shape, x1 - x0, y1 - y0)] = PALETTE[obj.colour]
    return image
