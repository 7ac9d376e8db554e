"""The train state: a plain dict, sharded over the mesh from its creation.

    state = {
      "step":              int32[]  steps taken, skipped ones included (seeds each step's randomness)
      "skipped":           int32[]  steps skipped for a non-finite loss or gradient, in total
      "consecutive_skips": int32[]  the current run of skipped steps
      "params":            the whole parameter tree (trainable and frozen), float32 master weights
      "opt_state":         optax state over the trainable leaves only (None at frozen leaves)
      "ema":               EMA of the trainable leaves (None at frozen leaves); only with train.ema.enabled
    }

Updates applied so far = step − skipped (the optimizer's own count, which a skipped step
leaves unchanged). Nothing is materialised unsharded: the state's shape is traced with
`jax.eval_shape`, its leaves' logical axes become PartitionSpecs, and the initialiser is
jitted with those out_shardings.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fireedit_jax.train import mesh as mesh_lib

COUNTERS = ("step", "skipped", "consecutive_skips")


def _trainable_leaves(params, mask):
    """`params` with None at frozen leaves; unlike `masks.split` it keeps logical boxes (for specs)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda p, m: p if m else None, params, mask, is_leaf=is_box)


def build_state(params, optimizer: optax.GradientTransformation, mask, *, ema: bool) -> dict:
    """The initial state around `params` (plain, or boxed for `jax.eval_shape`)."""
    trainable = _trainable_leaves(params, mask)
    state = {name: jnp.zeros((), jnp.int32) for name in COUNTERS}
    state["params"] = params
    state["opt_state"] = optimizer.init(trainable)
    if ema:
        state["ema"] = jax.tree.map(jnp.array, trainable)
    return state


def abstract_state(init_params: Callable[[jax.Array], dict], optimizer, mask, *, ema: bool) -> dict:
    """The boxed abstract state (ShapeDtypeStructs with logical axes); `init_params(key)` → boxed params."""
    return jax.eval_shape(lambda k: build_state(init_params(k), optimizer, mask, ema=ema), jax.random.key(0))


def state_shardings(abstract, mesh, rules):
    """NamedShardings for the unboxed state (counters replicated, Adam moments as their params)."""
    return mesh_lib.named_shardings(mesh_lib.partition_specs(abstract, mesh, rules), mesh)


def init_state(init_params, optimizer, mask, key: jax.Array, shardings, *, ema: bool) -> dict:
    """A fresh state, each leaf created directly in its shards."""
    create = lambda k: nn.meta.unbox(build_state(init_params(k), optimizer, mask, ema=ema))  # noqa: E731
    return jax.jit(create, out_shardings=shardings)(key)


def state_from_params(params, optimizer, mask, shardings, *, ema: bool) -> dict:
    """A state around existing (e.g. converted) params: host or device arrays, placed by shard."""
    params = jax.device_put(nn.meta.unbox(params), shardings["params"])
    create = lambda p: build_state(p, optimizer, mask, ema=ema)  # noqa: E731
    return jax.jit(create, in_shardings=(shardings["params"],), out_shardings=shardings)(params)
