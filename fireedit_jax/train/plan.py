"""`fireedit-jax plan`: the train step's per-device memory, compiled without allocating anything.

    fireedit-jax plan --config configs/fireedit_7b.py:3 --mesh data=1,fsdp=16,tensor=1 --topology v5e:4x4
    fireedit-jax plan --config configs/tiny.py --mesh data=2,fsdp=4,tensor=1 --batch 16

The step (`train/step.py` Trainer) is lowered on abstract inputs — ShapeDtypeStructs of the
state and a batch, carrying their shardings — and compiled ahead of time; XLA's
`memory_analysis()` of the executable gives per-device bytes: arguments (the state shard,
the batch shard), outputs, the part of the outputs aliased to arguments (the donated
state), temporaries (activations, gradients, collectives' buffers), and
total = arguments + outputs − aliased + temporaries.

Where it compiles:
  --topology v5e:4x4, v5p:2x2x2, ...  TPU, deviceless ahead-of-time through libtpu (the `tpu`
                                      extra: `pip install -e .[tpu]`); no TPU needed
  a GPU machine                       the local GPUs
  otherwise                           the CPU, with as many host devices as the mesh needs:
                                      XLA's CPU figures, an estimate of an accelerator's
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re

import flax.linen as nn
import jax
import ml_collections

from fireedit_jax.train import flops
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train.step import Trainer

# HBM per device (one device per chip: v5e and v6e have one core, v5p's two act as one)
DEVICE_MEMORY_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled train step."""

    platform: str  # what it was compiled for, e.g. "TPU v5 lite × 16 (v5e:4x4)"
    estimate: bool  # True: compiled for the CPU, not the accelerator it stands for
    mesh: dict[str, int]
    batch_size: int
    grad_accum: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    capacity: int | None  # the device's memory, where known

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def micro_batch_per_device(self) -> float:
        return self.batch_size / self.grad_accum / (self.mesh["data"] * self.mesh["fsdp"])


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=8,tensor=1" → {"data": 2, "fsdp": 8, "tensor": 1} (missing axes: 1; one may be -1)."""
    sizes = dict.fromkeys(mesh_lib.MESH_AXES, 1)
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in sizes:
            raise ValueError(f"--mesh {text!r}: expected axis=size items, axes {mesh_lib.MESH_AXES}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: {value!r} is not an integer") from None
    return sizes


TOPOLOGY_EXAMPLES = "v5e:4x4, v5p:2x2x2, v6e:8x8"


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. "v5e:4x4", for deviceless compilation through libtpu."""
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", topology):
        raise ValueError(f"TPU topology {topology!r} is not KIND:AxB[xC] (examples: {TOPOLOGY_EXAMPLES})")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"compiling for TPU topology {topology!r} needs libtpu: pip install -e '.[tpu]' "
            f"(jax[tpu] at the installed jax {jax.__version__})"
        ) from None
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as error:  # noqa: BLE001 - libtpu's message names the problem
        raise ValueError(f"TPU topology {topology!r}: {error} (examples: {TOPOLOGY_EXAMPLES})") from None


def local_devices(count: int) -> list:
    """The first `count` devices of the default backend."""
    if jax.device_count() < count:
        raise RuntimeError(
            f"the mesh needs {count} devices; {jax.device_count()} {jax.default_backend()} devices here "
            f"(on the CPU: XLA_FLAGS=--xla_force_host_platform_device_count={count}, or give --topology)"
        )
    return jax.devices()[:count]


def _host_devices(count: int) -> None:
    """Gives the CPU backend `count` devices, unless XLA_FLAGS sets a number or it has started."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started (an in-process call): its devices stay
        pass


def plan(config: ml_collections.ConfigDict, devices, *, label: str = "", **buckets) -> MemoryPlan:
    """Compiles `config`'s train step for `devices` (config.mesh over them) and reads its memory.

    buckets: text_length, num_boxes of a FireEdit batch (flops.abstract_batch).
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    trainer = Trainer.from_config(config, mesh=mesh)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(trainer.abstract_state),
        trainer.state_shardings,
    )
    batch_size = int(config.train.batch_size)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding),
        flops.abstract_batch(config, trainer.model, batch_size, **buckets),
    )
    device = devices[0]
    try:
        stats = trainer.step.lower(state, batch).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a step that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise ValueError(
            f"does not fit on {device.device_kind} × {len(devices)} with mesh {config.mesh.to_dict()}, "
            f"{batch_size} examples in {config.train.grad_accum} micro-batches: {str(error).splitlines()[0]}. "
            "Try a larger tensor axis (weights are gathered over fsdp only), fewer examples per "
            "micro-batch (--grad-accum) or remat."
        ) from None
    estimate = device.platform == "cpu"
    memory = DEVICE_MEMORY_GIB.get(device.device_kind)
    capacity = memory * 2**30 if memory else _local_capacity(device)
    return MemoryPlan(
        platform=f"{device.device_kind} × {len(devices)}" + (f" ({label})" if label else ""),
        estimate=estimate, mesh=dict(zip(mesh_lib.MESH_AXES, mesh.devices.shape)), batch_size=batch_size,
        grad_accum=int(config.train.grad_accum), arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes, aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes, capacity=capacity,
    )  # fmt: skip


def _local_capacity(device) -> int | None:
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - deviceless TPU devices and the CPU have no stats
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:9.2f} GiB" if n >= 2**30 else f"{n / 2**20:9.2f} MiB"


def format_plan(p: MemoryPlan) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    estimate = "  — CPU compilation: an ESTIMATE of accelerator memory" if p.estimate else ""
    lines = [
        f"platform     {p.platform}{estimate}",
        f"mesh         {mesh}",
        f"batch        {p.batch_size} per step = {p.grad_accum} micro-batches × "
        f"{p.micro_batch_per_device:g} per device × {p.mesh['data'] * p.mesh['fsdp']} batch shards",
        "per device:",
        f"  arguments    {_gib(p.arguments)}   (state shard + batch shard)",
        f"  outputs      {_gib(p.outputs)}",
        f"  aliased      {_gib(p.aliased)}   (donated state, counted once)",
        f"  temporaries  {_gib(p.temporaries)}",
        f"  total        {_gib(p.total)}",
    ]
    if p.capacity:
        verdict = "fits" if p.total <= p.capacity else "DOES NOT FIT"
        lines.append(f"  capacity     {_gib(p.capacity)}   {verdict} ({100 * p.total / p.capacity:.0f}%)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fireedit_jax.train import run as run_lib

    run_lib.add_config_argument(parser, "configs/X.py (or X.py:ARG); --config.path=value overrides as for `train`")
    parser.add_argument("--mesh", required=True, help="data=..,fsdp=..,tensor=.. (one size may be -1)")
    parser.add_argument("--topology", help="TPU slice to compile for without TPUs, e.g. v5e:4x4, v5p:2x2x2")
    parser.add_argument("--batch", type=int, help="global examples per step (default: train.batch_size)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default: train.grad_accum)")
    parser.add_argument("--text-length", type=int, help="FireEdit: the VLM's token bucket (default: the smallest)")
    parser.add_argument("--boxes", type=int, help="FireEdit: the box bucket (default: the smallest non-zero)")


def run(args: argparse.Namespace) -> int:
    from fireedit_jax.train import run as run_lib

    config = run_lib.apply_overrides(run_lib.load_config(args.config), args.overrides)
    config.mesh.update(parse_mesh(args.mesh))
    if args.batch:
        config.train.batch_size = args.batch
    if args.grad_accum:
        config.train.grad_accum = args.grad_accum
    if args.topology:
        devices = topology_devices(args.topology)
    else:
        _host_devices(_mesh_size(config.mesh))
        devices = local_devices(_mesh_size(config.mesh))
    result = plan(config, devices, label=args.topology or "", text_length=args.text_length, num_boxes=args.boxes)
    print(format_plan(result))
    return 0


def _mesh_size(mesh_config) -> int:
    sizes = [int(mesh_config[a]) for a in mesh_lib.MESH_AXES]
    if -1 in sizes:
        raise ValueError("without --topology, give every mesh size (no -1): the mesh picks the devices")
    return math.prod(sizes)
