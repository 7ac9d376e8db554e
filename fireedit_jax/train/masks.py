"""Which parameters train: path-regex masks over param trees (for optax.masked & co).

A path is the '/'-joined dict keys of a leaf, e.g. `params/layers/q_proj/lora_a`.
Trees may be plain, boxed (`nn.Partitioned`) or abstract (`jax.ShapeDtypeStruct`).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import flax.linen as nn
import jax


def _is_leaf(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def trainable_mask(params, patterns: Iterable[str]):
    """A tree of bools shaped like `params`: True where some regex in `patterns` searches the leaf's path."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: any(p.search(_path(keys)) for p in compiled), params, is_leaf=_is_leaf
    )


def count_params(params, mask=None) -> int:
    """Number of scalars in `params`, or in the leaves where `mask` is True."""
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
    if len(keep) != len(leaves):
        raise ValueError(f"mask has {len(keep)} leaves, params {len(leaves)}")
    return sum(math.prod(leaf.shape) for leaf, k in zip(leaves, keep) if k)


def split(params, mask):
    """(trainable, frozen): two trees of the same structure, None where a leaf belongs to the other.

    `jax.grad` of a loss of `combine(trainable, frozen)` with respect to `trainable`
    then differentiates only the masked leaves.
    """
    params = nn.meta.unbox(params)
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)
