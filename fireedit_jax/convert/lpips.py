"""LPIPS weights → our LPIPS params (models/lpips.py), from two sources.

The trunk: a torchvision AlexNet / VGG16 / SqueezeNet 1.1 state dict (`features.{i}.…`;
`classifier.*` ignored), or the lpips package's own module (`net.slice{k}.{i}.…`).
The heads: the package's weights file (`lpips/weights/v0.1/alex.pth`: `lin{k}.model.1.weight`,
`model.0` when built without dropout). A full `lpips.LPIPS(...).state_dict()` holds
both (its `lins.*` duplicates and scaling-layer buffers are ignored).

`features.3.weight` / `net.slice2.3.weight` → params/features_3/kernel (HWIO),
`features.3.expand3x3.bias` → params/features_3/expand3x3/bias,
`lin2.model.1.weight` [1, C, 1, 1] → params/lin2/kernel [1, 1, C, 1].
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.lpips import LPIPS, LPIPSConfig, example_inputs

_IGNORED = (r"^classifier\.", r"^lins\.", r"^scaling_layer\.")
_TRUNK_KEY = re.compile(r"^(?:features|net\.slice\d+)\.(\d+)\.(?:(squeeze|expand1x1|expand3x3)\.)?(weight|bias)$")
_HEAD_KEY = re.compile(r"^lin(\d+)\.model\.[01]\.weight$")


def flax_path(key: str) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform), or None if unknown."""
    match = _TRUNK_KEY.fullmatch(key)
    if match:
        index, fire_part, leaf = match.groups()
        module = ("features_" + index, *([fire_part] if fire_part else []))
        if leaf == "weight":
            return ("params", *module, "kernel"), core.conv2d
        return ("params", *module, "bias"), core.identity
    match = _HEAD_KEY.fullmatch(key)
    if match:
        return ("params", f"lin{match[1]}", "kernel"), core.conv2d
    return None


def abstract_params(config: LPIPSConfig):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(LPIPS(config).init, jax.random.key(0), *example_inputs())


def convert_lpips(trunk: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray], config: LPIPSConfig) -> dict:
    """A trunk state dict and a lin-heads state dict → our LPIPS {"params": ...}.

    Either may hold both parts (pass `{}` as the other). Strict: raises
    `core.ConversionError` naming every unexpected key, every parameter without a
    source key and every shape mismatch (a trunk of another network shows as these).
    """
    both = set(trunk) & set(heads)
    if both:
        raise core.ConversionError(f"keys in both the trunk and the heads state dicts: {', '.join(sorted(both))}")
    state = {**trunk, **heads}
    return core.convert(state, lambda k, v: flax_path(k), abstract_params(config), ignore=_IGNORED,
                        what=f"LPIPS ({config.net}) weights")


def load_lpips(trunk_path: str, heads_path: str, config: LPIPSConfig) -> dict:
    """Files (torchvision's `alexnet-owt-….pth`, the package's `weights/v0.1/alex.pth`) → params."""
    return convert_lpips(core.load_state_dict(trunk_path), core.load_state_dict(heads_path), config)


def verify_lpips(torch_model, params, config: LPIPSConfig, seed: int = 0, *, batch: int = 2,
                 size: tuple[int, int] = (64, 64)) -> float:
    """Max abs difference of the per-layer terms and the distance between an `lpips.LPIPS` and ours.

    Random image pairs in [-1, 1] of `size` (height, width).
    """
    import torch

    if torch_model.pnet_type.replace("vgg16", "vgg") != config.net or not torch_model.lpips:
        raise core.ConversionError(f"the torch model is LPIPS({torch_model.pnet_type!r}, lpips={torch_model.lpips}), "
                                   f"ours LPIPS({config.net!r}) with lin heads")
    torch_model = torch_model.float().eval()
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(2, batch, *size, 3)).astype(np.float32)
    with torch.no_grad():
        total, terms = torch_model(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in images), retPerLayer=True)
    want = [t.reshape(batch).numpy() for t in (total, *terms)]
    with jax.default_matmul_precision("highest"):
        got_total, got_terms = _forward(config)(params, *images)
    got = [np.asarray(g) for g in (got_total, *got_terms)]
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))


@functools.lru_cache(maxsize=8)
def _forward(config: LPIPSConfig):
    model = LPIPS(config)
    return jax.jit(lambda params, x0, x1: model.apply(params, x0, x1, per_layer=True))
