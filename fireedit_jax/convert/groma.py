"""Groma's region encoder (FoundationVision/Groma) → our RegionEncoder params (models/regions.py).

Groma's `GromaModel` holds the module as `region_encoder` (an MLVLROIQueryModule, in
groma/model/roi_align.py): `mlvl_fuse` (MLVLFuseModule) and `roi_align`
(MlvlRoIExtractor; its mmcv RoIAlign layers have no parameters). The prefix in front of
`mlvl_fuse.` is detected (`region_encoder.`, `model.region_encoder.`, or none for the
module's own state dict); keys outside it (perceiver, llm, img_txt_bridge, …) are ignored.

`region_encoder.mlvl_fuse.fuse_convs.3.conv.weight` → params/mlvl_fuse/fuse_3/conv/kernel (HWIO),
`region_encoder.roi_align.pos_embedd.2.weight` → params/pos_norm_1/scale,
`region_encoder.roi_align.flatten_linear.weight` [F, E·S·S] (torch flattens E, S, S) →
params/flatten_linear/kernel [S·S·E, F] (we flatten S, S, E).

Groma's weights were trained with its box and stride quirks: use them with
`RegionEncoderConfig(groma_compat=True)` to reproduce Groma (models/regions.py).
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.regions import RegionEncoder, RegionEncoderConfig, example_inputs

# Groma module name (after the prefix; {i} a level or round index) → our module path.
# The one table to correct if Groma's names turn out otherwise.
GROMA_NAMES = {
    "mlvl_fuse.input_conv.{i}": "mlvl_fuse/input_conv_{i}",
    "mlvl_fuse.fuse_convs.{i}.conv": "mlvl_fuse/fuse_{i}/conv",  # mmcv ConvModule: conv (no bias) …
    "mlvl_fuse.fuse_convs.{i}.gn": "mlvl_fuse/fuse_{i}/norm",  # … and its GroupNorm, named by abbreviation
    "roi_align.pconvs.{i}": "level_conv_{i}",
    "roi_align.flatten_linear": "flatten_linear",
    "roi_align.pos_embedd.0": "pos_fc_1",  # nn.Sequential(Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm)
    "roi_align.pos_embedd.2": "pos_norm_1",
    "roi_align.pos_embedd.3": "pos_fc_2",
    "roi_align.pos_embedd.5": "pos_norm_2",
    "roi_align.updims": "out_proj",
}
_MARKER = "mlvl_fuse.input_conv.0.weight"
_PATTERNS = [
    (re.compile(re.escape(groma).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<leaf>weight|bias)"), ours)
    for groma, ours in GROMA_NAMES.items()
]


def detect_prefix(state: Mapping[str, np.ndarray]) -> str:
    """The text in front of `mlvl_fuse.` in the region encoder's keys."""
    found = sorted(k[: -len(_MARKER)] for k in state if k.endswith(_MARKER))
    if not found:
        raise core.ConversionError(f"not a Groma region-encoder checkpoint: no key ends in {_MARKER!r}")
    if len(found) > 1:
        raise core.ConversionError(f"several Groma region encoders in one checkpoint: prefixes {found}")
    return found[0]


def flax_path(key: str, value: np.ndarray, prefix: str, config: RegionEncoderConfig):
    """A source key → (our param path, transform), or None if it names nothing we know."""
    if not key.startswith(prefix):
        return None
    for pattern, ours in _PATTERNS:
        match = pattern.fullmatch(key[len(prefix):])
        if match is None:
            continue
        path = ("params", *ours.format(i=match.groupdict().get("i")).split("/"))
        if match.group("leaf") == "bias":
            return (*path, "bias"), core.identity
        if ours == "flatten_linear":
            return (*path, "kernel"), lambda w: _flatten_kernel(w, config)
        if np.ndim(value) == 1:
            return (*path, "scale"), core.identity
        return (*path, "kernel"), core.weight_transform(key, value)
    return None


def _flatten_kernel(w: np.ndarray, config: RegionEncoderConfig) -> np.ndarray:
    """torch [F, E·S·S] (inputs flattened E, S, S) → ours [S·S·E, F] (flattened S, S, E)."""
    s, e = config.roi_size, config.embed_dim
    if w.ndim != 2 or w.shape[1] != e * s * s:
        return w.T  # a wrong size: let the shape check name it
    return w.reshape(w.shape[0], e, s, s).transpose(2, 3, 1, 0).reshape(s * s * e, w.shape[0])


def abstract_params(config: RegionEncoderConfig):
    """The boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(RegionEncoder(config).init, jax.random.key(0), *example_inputs(config))


def config_from_state(state: Mapping[str, np.ndarray], **overrides) -> RegionEncoderConfig:
    """The dimensions a Groma region-encoder state dict implies (norm groups, patch size and
    `groma_compat` are not in the weights: Groma's 64 and 14, and compat, unless overridden)."""
    prefix = detect_prefix(state)
    shape = lambda name: np.shape(state[prefix + name])  # noqa: E731
    embed_dim, input_dim = shape("mlvl_fuse.input_conv.0.weight")[:2]
    count = lambda pattern: len({k for k in state if re.fullmatch(re.escape(prefix) + pattern, k)})  # noqa: E731
    region_dim, flat = shape("roi_align.flatten_linear.weight")
    fields = dict(
        feature_dim=input_dim - 2,
        embed_dim=embed_dim,
        num_levels=count(r"mlvl_fuse\.input_conv\.\d+\.weight"),
        num_fuse=count(r"mlvl_fuse\.fuse_convs\.\d+\.conv\.weight"),
        roi_size=int(round((flat / embed_dim) ** 0.5)),
        region_dim=region_dim,
        pos_hidden_dim=shape("roi_align.pos_embedd.0.weight")[0],
        llm_dim=shape("roi_align.updims.weight")[0],
        groma_compat=True,
    )
    return RegionEncoderConfig(**{**fields, **overrides})


def convert_groma(state: Mapping[str, np.ndarray], config: RegionEncoderConfig) -> dict:
    """Groma's region encoder (in a full Groma state dict or alone) → our {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key under the region
    encoder's prefix, every parameter without a source key and every shape mismatch.
    """
    prefix = detect_prefix(state)
    return core.convert(
        state,
        lambda key, value: flax_path(key, value, prefix, config),
        abstract_params(config),
        ignore=(rf"^(?!{re.escape(prefix)})",) if prefix else (),
        what="Groma region-encoder checkpoint",
    )


def load_groma(path: str, config: RegionEncoderConfig | None = None) -> tuple[dict, RegionEncoderConfig]:
    """A Groma weights file or directory → (our params, the config: given, or read from the shapes)."""
    state = core.load_state_dict(path)
    config = config or config_from_state(state)
    return convert_groma(state, config), config


# ---------------------------------------------------------------------------- verification


def reference_forward(state: Mapping[str, np.ndarray], config: RegionEncoderConfig, levels, boxes):
    """Groma's region encoder computed as its code does (torch, NCHW, torchvision's RoIAlign in
    place of mmcv's, which computes the same), from its own state dict.

    levels: float[B, h, w, D] numpy arrays (our layout); boxes: a list of float[R_i, 4]
    normalised xyxy per image. Returns a list of float[R_i, L] numpy arrays. Groma's box and
    stride quirks apply only with `config.groma_compat`, as in our model.
    """
    import torch
    import torch.nn.functional as F
    import torchvision

    prefix = detect_prefix(state)
    weight = lambda name: torch.from_numpy(np.asarray(state[prefix + name], np.float32))  # noqa: E731
    s, shuffled = config.roi_size, config.embed_dim // 4
    kept = config.embed_dim - 2 * shuffled
    with torch.no_grad():
        feats = [torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2) for x in levels]
        b, _, h, w = feats[0].shape
        feats = [
            F.interpolate(x, size=(h * config.level_factor(l), w * config.level_factor(l)), mode="bilinear",
                          align_corners=True)
            for l, x in enumerate(feats)
        ]  # fmt: skip
        fused = []
        for l, x in enumerate(feats):
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[2]), torch.linspace(-1, 1, x.shape[3]), indexing="ij")
            coords = torch.stack([xs, ys])[None].expand(b, -1, -1, -1)
            x = torch.cat([x, coords], 1)
            conv = f"mlvl_fuse.input_conv.{l}"
            fused.append(F.conv2d(x, weight(f"{conv}.weight"), weight(f"{conv}.bias")))
        last = len(fused) - 1
        for i in range(config.num_fuse):
            mixed = []
            for l, x in enumerate(fused):
                size = x.shape[-2:]
                top, down = fused[min(l + 1, last)], fused[max(l - 1, 0)]
                from_top = F.interpolate(top[:, kept:][:, shuffled:], size=size, mode="bilinear", align_corners=True)
                from_down = F.interpolate(down[:, kept:][:, :shuffled], size=size, mode="bilinear", align_corners=True)
                mixed.append(torch.cat([x[:, :kept], from_top, from_down], 1))
            conv = f"mlvl_fuse.fuse_convs.{i}"
            fused = [
                F.relu(F.group_norm(F.conv2d(x, weight(f"{conv}.conv.weight"), padding=1), config.norm_groups,
                                    weight(f"{conv}.gn.weight"), weight(f"{conv}.gn.bias"), config.norm_eps))
                for x in mixed
            ]  # fmt: skip

        rois = [torch.from_numpy(np.asarray(bx, np.float32).reshape(-1, 4)) for bx in boxes]
        if config.groma_compat:  # Groma's boxes are DETR's cx, cy, w, h
            rois = [torch.cat([(r[:, :2] + r[:, 2:]) / 2, r[:, 2:] - r[:, :2]], 1) for r in rois]
        seen = torch.cat(rois)
        pixels = [r * torch.tensor([w, h, w, h], dtype=torch.float32) * config.patch_size for r in rois]
        # Groma declares strides 14/8, 14/4, 14/2 for maps upsampled 4×, 2×, 1×: half the true 14/f
        n = config.num_levels
        strides = [config.patch_size / 2 ** (n - l - (0 if config.groma_compat else 1)) for l in range(n)]
        pooled = sum(
            F.conv2d(
                torchvision.ops.roi_align(x, pixels, s, 1 / strides[l], config.sampling_ratio, True),
                weight(f"roi_align.pconvs.{l}.weight"), weight(f"roi_align.pconvs.{l}.bias"), padding=1,
            )
            for l, x in enumerate(fused)
        )  # fmt: skip
        x = F.linear(F.relu(pooled).flatten(1), weight("roi_align.flatten_linear.weight"),
                     weight("roi_align.flatten_linear.bias"))  # fmt: skip
        pos, mlp = seen, "roi_align.pos_embedd"
        for fc, norm in ((0, 2), (3, 5)):
            pos = F.relu(F.linear(pos, weight(f"{mlp}.{fc}.weight"), weight(f"{mlp}.{fc}.bias")))
            pos = F.layer_norm(pos, pos.shape[-1:], weight(f"{mlp}.{norm}.weight"), weight(f"{mlp}.{norm}.bias"),
                               config.norm_eps)  # fmt: skip
        out = F.linear(x + pos, weight("roi_align.updims.weight"), weight("roi_align.updims.bias")).numpy()
    return np.split(out, np.cumsum([len(r) for r in rois])[:-1])


def verify_groma(source, params, config: RegionEncoderConfig, seed: int = 0, *, grid: int = 4) -> float:
    """Max abs difference of the region tokens between Groma's computation (torch) and ours.

    Args:
      source: the Groma state dict, or a path `core.load_state_dict` reads.
      params: our converted params ({"params": ...}).
      grid: the patch grid side of the random features (Groma's is 32; small is faster).
    Two images with 3 and 1 random boxes (the second padded to 3).
    """
    state = core.load_state_dict(source) if isinstance(source, str) else source
    rng = np.random.default_rng(seed)
    levels = [rng.normal(size=(2, grid, grid, config.feature_dim)).astype(np.float32)
              for _ in range(config.num_levels)]  # fmt: skip
    corners = np.sort(rng.uniform(0, 1, (2, 3, 2, 2)), axis=2)  # [B, R, (lo, hi), (x, y)]
    boxes = np.concatenate([corners[:, :, 0], corners[:, :, 1]], -1).astype(np.float32)
    mask = np.array([[True, True, True], [True, False, False]])
    want = reference_forward(state, config, levels, [boxes[0], boxes[1, :1]])
    with jax.default_matmul_precision("highest"):
        got = np.asarray(RegionEncoder(config).apply(params, levels, boxes, mask))
    errors = [np.abs(got[0] - want[0]), np.abs(got[1, :1] - want[1]), np.abs(got[1, 1:])]  # padding must give zeros
    return float(max(e.max() for e in errors))
