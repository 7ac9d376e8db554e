"""Strict PyTorch state dict → Flax param tree conversion.

A source family supplies `rename(key) -> (flax_path, transform) | None`; everything
else (reading files, stacking scanned layers, checking names and shapes) is here.
Every source key must be consumed except those matching `ignore`; every expected
Flax leaf must be produced except those matching `fresh` (initialised anew).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Mapping

import flax
import numpy as np

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending name."""


# ---------------------------------------------------------------------------- reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict as float32/bf16-upcast numpy arrays.

    `path` is a `.safetensors` file, a `.bin`/`.pt` pickle (loaded with
    `weights_only=True`), a `*.index.json` of shards, or a directory holding one
    of these (safetensors preferred).
    """
    if os.path.isdir(path):
        return load_state_dict(_weights_file_in(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_state_dict(os.path.join(os.path.dirname(path), shard)))
        return state
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except TypeError:  # bfloat16 has no numpy dtype: go through torch
            from safetensors.torch import load_file as load_torch

            return {k: _to_numpy(v) for k, v in load_torch(path).items()}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {k: _to_numpy(v) for k, v in state.items()}


def config_beside(path: str) -> dict | None:
    """The config.json of a weights directory (or beside a weights file), or None."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        return None
    with open(config_file) as f:
        return json.load(f)


def _weights_file_in(directory: str) -> str:
    names = os.listdir(directory)
    for suffix in (".safetensors.index.json", ".safetensors", ".bin.index.json", ".bin", ".pt", ".pth"):
        found = sorted(n for n in names if n.endswith(suffix))
        if found:
            return os.path.join(directory, found[0])
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected *.safetensors, *.safetensors.index.json or *.bin"
    )


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------- transforms


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] → Flax kernel [in, out]."""
    return w.T


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] → Flax kernel [kh, kw, in, out] (1×1 convs stored as Linear too)."""
    if w.ndim == 2:
        w = w[:, :, None, None]
    return w.transpose(2, 3, 1, 0)


def identity(w: np.ndarray) -> np.ndarray:
    return w


def weight_transform(key: str, w: np.ndarray) -> Transform:
    """The usual transform for a `.weight`: Linear → transposed, Conv → HWIO, norms as they are."""
    if w.ndim == 4:
        return conv2d
    if w.ndim == 2 and not key.endswith(("embed_tokens.weight", "embedding.weight", "embeddings.weight")):
        return linear
    return identity


# ---------------------------------------------------------------------------- matching


def flat_shapes(tree) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of a (possibly boxed, possibly abstract) param tree."""
    tree = flax.linen.meta.unbox(tree)
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def convert(
    state: Mapping[str, np.ndarray],
    rename: Callable[[str, np.ndarray], tuple[Path, Transform] | None],
    expected,
    *,
    ignore: Iterable[str] = (),
    fresh: Iterable[str] = (),
    stack: Callable[[Path], tuple[Path, int] | None] | None = None,
    what: str = "checkpoint",
) -> dict:
    """Converts `state` into a nested param dict matching `expected` exactly.

    Args:
      state: torch key → array.
      rename: maps a source key to its Flax path and array transform, or None if unknown.
      expected: the model's param tree (e.g. from `jax.eval_shape(model.init, ...)`).
      ignore: regexes of source keys deliberately dropped.
      fresh: regexes of Flax paths ('/'-joined) initialised anew, not converted.
      stack: for scanned layer stacks: maps a converted path to (stacked path, layer index).
      what: names the checkpoint in error messages.
    Returns:
      {path: np.ndarray} nested as `expected`, without the `fresh` leaves.
    """
    ignore, fresh = tuple(ignore), tuple(fresh)
    want = flat_shapes(expected)
    got: dict[Path, np.ndarray] = {}
    source_of: dict[Path, str] = {}
    layers: dict[Path, dict[int, np.ndarray]] = {}
    unknown = []
    for key, value in state.items():
        if _matches(key, ignore):
            continue
        target = rename(key, value)
        if target is None:
            unknown.append(key)
            continue
        path, transform = target
        array = np.asarray(transform(np.asarray(value)))
        stacked = stack(path) if stack else None
        if stacked is not None:
            layers.setdefault(stacked[0], {})[stacked[1]] = array
            source_of[stacked[0]] = key
        else:
            got[path] = array
            source_of[path] = key
    problems = []
    for path, per_layer in layers.items():
        n = want[path][0] if path in want else max(per_layer) + 1
        absent = sorted(set(range(n)) - set(per_layer))
        surplus = sorted(set(per_layer) - set(range(n)))
        if absent or surplus:
            problems.append(f"{'/'.join(path)}: layers {absent} missing, layers {surplus} not in the model")
        else:
            got[path] = np.stack([per_layer[i] for i in range(n)])

    if unknown:
        problems.append("unexpected keys in the checkpoint: " + ", ".join(sorted(unknown)))
    missing = [p for p in want if p not in got and not _matches("/".join(p), fresh)]
    if missing:
        problems.append("parameters with no source key: " + ", ".join("/".join(p) for p in sorted(missing)))
    extra = [p for p in got if p not in want]
    if extra:
        problems.append(
            "checkpoint keys the model does not have: "
            + ", ".join(f"{source_of[p]} (as {'/'.join(p)})" for p in sorted(extra))
        )
    shapes = [
        f"{'/'.join(p)} (checkpoint {got[p].shape}, model {want[p]})"
        for p in sorted(got)
        if p in want and tuple(got[p].shape) != want[p]
    ]
    if shapes:
        problems.append("shape mismatches: " + ", ".join(shapes))
    if problems:
        raise ConversionError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
    return flax.traverse_util.unflatten_dict(got)


def check_config(what: str, pairs: Mapping[str, tuple]) -> None:
    """Raises naming every field whose checkpoint value differs from ours: {field: (theirs, ours)}."""
    bad = [f"{k}: checkpoint {a!r}, ours {b!r}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ConversionError(f"{what} config disagrees with ours: " + "; ".join(bad))
