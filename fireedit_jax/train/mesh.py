"""Device meshes, logical-axis rules and shardings.

Mesh axes:
  data    plain data parallelism (each replica holds whole weights)
  fsdp    data parallelism whose replicas also split weights and optimizer state
          (ZeRO-3 / FSDP: weights are all-gathered per use, gradients reduce-scattered)
  tensor  Megatron-style splits of MLP width, heads and output channels

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `conv_in`,
`conv_out`, `layers`); activations are constrained at block boundaries with
`activation_batch` / `activation_embed`. The config's rules map those names to mesh axes
(flax's priority order: the first rule whose mesh axes are still free wins). A mesh axis
that does not divide a dimension is dropped for that leaf (a 3-channel RGB conv stays
unsplit over fsdp=4) instead of failing: uneven shardings are an error in jax.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "activation_batch"

# The default mapping (configs copy it into config.sharding.rules, where it can be edited).
STANDARD_RULES = (
    (BATCH, ("data", "fsdp")),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("layers", None),
)

# Launchers whose processes JAX's cluster detection can connect by itself.
_LAUNCHER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(config=None) -> bool:
    """Calls `jax.distributed.initialize` for multi-process runs; returns whether it did.

    Call it before anything touches devices. `config.distributed` (all optional):
      coordinator_address, num_processes, process_id: passed on (GPU hosts, CPU clusters);
        each falls back to env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
      enabled: True always initialises (e.g. TPU pod slices, where JAX finds its peers
        itself), False never; None (default) initialises when any address setting is
        given, or a launcher says there are several processes (SLURM, Open MPI, a
        multi-host or multislice TPU), and otherwise leaves a single process alone.
    """
    section = config.get("distributed") if config is not None else None
    section = section.to_dict() if section else {}
    env = {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _env_int("JAX_NUM_PROCESSES"),
        "process_id": _env_int("JAX_PROCESS_ID"),
    }
    settings = {k: section.get(k) if section.get(k) is not None else v for k, v in env.items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    enabled = section.get("enabled")
    if enabled is False or jax.distributed.is_initialized():
        return False
    if enabled or settings or _launched_as_several_processes():
        jax.distributed.initialize(**settings)
        return True
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def _launched_as_several_processes() -> bool:
    if any((_env_int(name) or 0) > 1 for name in _LAUNCHER_SIZE_ENV):
        return True
    # a multi-host TPU slice lists its workers; multislice runs name a coordinator
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes from the config; one of them may be -1 (the rest of the devices)."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    described = " × ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {described}: sizes must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {described}: {num_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {described} needs {math.prod(sizes)} devices; {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes.

    jax 0.10 defaults to Explicit axes, under which flax's logical constraints fail.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(rules) -> tuple[tuple[str, Any], ...]:
    """Rules from a config (JSON turns tuples into lists) as flax wants them."""
    as_axes = lambda m: tuple(m) if isinstance(m, (list, tuple)) else m  # noqa: E731
    return tuple((str(name), as_axes(mesh_axes)) for name, mesh_axes in rules)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with, per dimension, the longest prefix of its mesh axes whose size divides the dimension."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return PartitionSpec(*fitted)


def without_axes(spec: PartitionSpec, axes: Sequence[str]) -> PartitionSpec:
    """`spec` with the mesh axes `axes` removed (those dimensions become whole along them)."""
    kept = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n not in axes)
        kept.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*kept)


def partition_specs(abstract_boxed, mesh: Mesh, rules):
    """Mesh PartitionSpecs for every leaf of a boxed abstract tree (from `jax.eval_shape(init)`).

    Boxed leaves map their logical names through `rules`; plain leaves are replicated.
    The result has the unboxed tree's structure.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(
        lambda spec, leaf: fit_spec(nn.logical_to_mesh_axes(tuple(spec), rules), leaf.shape, mesh),
        logical,
        shapes,
        is_leaf=is_spec,
    )


def scanned_leaves(abstract_boxed):
    """Bool tree (unboxed structure): True for leaves whose logical axes include `layers` (nn.scan stacks)."""
    logical = nn.get_partition_spec(abstract_boxed)
    return jax.tree.map(lambda spec: "layers" in tuple(spec), logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def named_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(rules) -> PartitionSpec:
    """The leading (batch) dimension split as `activation_batch` says; the rest replicated."""
    return nn.logical_to_mesh_axes((BATCH,), rules)


def shard_batch(batch, sharding: NamedSharding):
    """Host arrays (this process's rows) → global arrays split along the batch dimension."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class GatheredOnRead(flax.struct.PyTreeNode, nn.meta.AxisMetadata):
    """A weight that a module sees gathered to `spec` (its sharding without `fsdp`) where it reads it.

    `Module.param` unboxes it with the sharding constraint, so XLA all-gathers the weight
    at its use. Under `nn.scan` the stacked axis leaves the spec, so a scanned stack
    (LLaMA's layers) is gathered one layer at a time instead of whole.
    """

    value: Any
    spec: tuple = flax.struct.field(pytree_node=False)

    def unbox(self):
        return jax.lax.with_sharding_constraint(self.value, PartitionSpec(*self.spec))

    def replace_boxed(self, val):
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict) -> GatheredOnRead:
        return self.replace(spec=self.spec[:index] + (None,) + self.spec[index:])

    def remove_axis(self, index: int, params: dict) -> GatheredOnRead:
        return self.replace(spec=self.spec[:index] + self.spec[index + 1 :])


def gather_weights(params, specs, on_read):
    """`params` gathered over `fsdp` (specs: their PartitionSpecs): leaves where the bool tree
    `on_read` is True are boxed as `GatheredOnRead` (for modules under nn.scan; nothing else
    may read them), the rest are constrained here."""

    def gather(x, spec, per_read):
        spec = tuple(without_axes(spec, ("fsdp",)))
        spec = spec + (None,) * (x.ndim - len(spec))
        return GatheredOnRead(x, spec) if per_read else jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))

    return jax.tree.map(gather, params, specs, on_read)
