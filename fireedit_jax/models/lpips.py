"""LPIPS, the learned perceptual image distance (the `lpips` package's LPIPS, version 0.1).

Shapes: B batch, H/W image height/width, h/w a tapped feature map's, C its channels,
K the number of tapped layers (5 for alex and vgg, 7 for squeeze).

d(x₀, x₁) = Σ_k mean_{h,w} Σ_c w_kc · (f̂₀ − f̂₁)²_khwc, where f_k are the features of
a torchvision trunk (AlexNet, VGG16 or SqueezeNet 1.1 `features`) after ReLU at K
layers, f̂ = f / (‖f‖_C + 1e-10) and w_k ≥ 0 the learnt 1×1 "lin" heads. Inputs in
[-1, 1] first go through the package's scaling layer. The trunk's layers are named by
their torchvision `features` index (`features_3`), as its checkpoints number them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fireedit_jax.nn.linear import conv

Dtype = Any

# The lpips package's ScalingLayer: from [-1, 1] to roughly ImageNet-normalised pixels.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0):
    return ("conv", features, kernel, stride, padding)


def _pool(kernel: int, stride: int, ceil: bool = False):
    return ("pool", kernel, stride, ceil)


def _fire(squeeze: int, expand: int):
    """SqueezeNet's Fire: 1×1 squeeze conv, then 1×1 and 3×3 expand convs concatenated (each + ReLU)."""
    return ("fire", squeeze, expand)


_RELU = ("relu",)


def _vgg_block(width: int, convs: int):
    return (_conv(width, 3, 1, 1), _RELU) * convs


@dataclasses.dataclass(frozen=True)
class Trunk:
    """torchvision `features`, one entry per index; features are tapped after the `taps` indices."""

    layers: tuple
    taps: tuple[int, ...]


TRUNKS = {
    "alex": Trunk(
        layers=(_conv(64, 11, 4, 2), _RELU, _pool(3, 2), _conv(192, 5, 1, 2), _RELU, _pool(3, 2),
                _conv(384, 3, 1, 1), _RELU, _conv(256, 3, 1, 1), _RELU, _conv(256, 3, 1, 1), _RELU),
        taps=(1, 4, 7, 9, 11),
    ),
    "vgg": Trunk(
        layers=(*_vgg_block(64, 2), _pool(2, 2), *_vgg_block(128, 2), _pool(2, 2), *_vgg_block(256, 3), _pool(2, 2),
                *_vgg_block(512, 3), _pool(2, 2), *_vgg_block(512, 3)),
        taps=(3, 8, 15, 22, 29),
    ),
    "squeeze": Trunk(
        layers=(_conv(64, 3, 2), _RELU, _pool(3, 2, ceil=True), _fire(16, 64), _fire(16, 64), _pool(3, 2, ceil=True),
                _fire(32, 128), _fire(32, 128), _pool(3, 2, ceil=True), _fire(48, 192), _fire(48, 192),
                _fire(64, 256), _fire(64, 256)),
        taps=(1, 4, 7, 9, 10, 11, 12),
    ),
}


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    """net: the trunk, "alex" (the package's default and most papers'), "vgg" or "squeeze" (PIE-Bench's)."""

    net: str = "alex"

    def __post_init__(self):
        if self.net not in TRUNKS:
            raise ValueError(f"LPIPS net {self.net!r} not supported: one of {sorted(TRUNKS)}")

    @property
    def trunk(self) -> Trunk:
        return TRUNKS[self.net]

    @property
    def channels(self) -> tuple[int, ...]:
        """C of each tapped feature map (the lin heads' input widths)."""
        widths, width = [], 0
        for layer in self.trunk.layers:
            if layer[0] == "conv":
                width = layer[1]
            elif layer[0] == "fire":
                width = 2 * layer[2]
            widths.append(width)
        return tuple(widths[i] for i in self.trunk.taps)


def _max_pool(x, kernel: int, stride: int, ceil: bool):
    """torch MaxPool2d without padding; `ceil` keeps a last partial window (ceil_mode)."""
    pads = []
    for n in x.shape[1:3]:
        out = (n - kernel) // stride + 1
        if ceil and (n - kernel) % stride and out * stride < n:  # torch: the extra window must start inside
            out += 1
        pads.append((0, (out - 1) * stride + kernel - n))
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


class Fire(nn.Module):
    """SqueezeNet 1.1 Fire module (params `squeeze`, `expand1x1`, `expand3x3`)."""

    squeeze: int
    expand: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: float[B, h, w, C] → float[B, h, w, 2·expand]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(conv(self.squeeze, 1, padding=0, name="squeeze", **kw)(x))
        return jnp.concatenate([nn.relu(conv(self.expand, 1, padding=0, name="expand1x1", **kw)(x)),
                                nn.relu(conv(self.expand, 3, padding=1, name="expand3x3", **kw)(x))], axis=-1)


def _unit_normalize(f):
    """f / (‖f‖ over channels + 1e-10), in float32."""
    f = f.astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + NORM_EPS)


class LPIPS(nn.Module):
    """The scaling layer, the trunk up to its last tap, unit-normalised squared differences, lin heads."""

    config: LPIPSConfig = LPIPSConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images0, images1, *, per_layer: bool = False):
        """Perceptual distance between image pairs.

        Args:
          images0, images1: float[B, H, W, 3] in [-1, 1].
          per_layer: also return each tapped layer's term.
        Returns:
          float[B] (the sum over layers), or (float[B], tuple of K float[B]) with per_layer.
        """
        if images0.shape != images1.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {images0.shape} and {images1.shape}")
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = images0.shape[0]
        x = jnp.concatenate([images0, images1]).astype(jnp.float32)  # one trunk pass for both
        x = ((x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
        taps = []
        for i, layer in enumerate(cfg.trunk.layers[: cfg.trunk.taps[-1] + 1]):
            kind, *args = layer
            if kind == "conv":
                features, kernel, stride, padding = args
                x = conv(features, kernel, strides=stride, padding=padding, name=f"features_{i}", **kw)(x)
            elif kind == "relu":
                x = nn.relu(x)
            elif kind == "pool":
                x = _max_pool(x, *args)
            else:
                x = Fire(*args, name=f"features_{i}", **kw)(x)
            if i in cfg.trunk.taps:
                taps.append(x)

        terms = []
        for k, f in enumerate(taps):
            f = _unit_normalize(f)
            diff = jnp.square(f[:b] - f[b:])
            head = conv(1, 1, padding=0, use_bias=False, name=f"lin{k}", param_dtype=self.param_dtype)
            terms.append(jnp.mean(head(diff)[..., 0], axis=(1, 2)))
        distance = sum(terms)
        return (distance, tuple(terms)) if per_layer else distance


def example_inputs(batch: int = 1, size: int = 64):
    """Two zero image batches, e.g. for `jax.eval_shape(model.init, rng, *example_inputs())`."""
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    return images, images
