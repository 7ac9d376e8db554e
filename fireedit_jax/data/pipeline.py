"""The training input pipeline: mixed sources → examples → per-process batches → global arrays.

    sources (random access) ─ shard by process ─ shuffle (seed, epoch) ─ repeat ─┐
    weighted mix ◄────────────────────────────────────────────────────────────────┘
      → read + transform (in grain worker processes; a bad record becomes "skipped")
      → batch of `batch_size` good examples, skips counted per source
      → DataIterator (main process): metrics, checkpointable state
      → make_global_batch: one jax.Array per entry, sharded over the mesh's batch axes

Every process reads only its own part of each source (`grain.sharding.ShardOptions`,
by default the JAX process index and count) and yields batches of its local
`batch_size`; the global batch is their concatenation. Shuffling is a function of the
seed and the epoch, augmentation of the seed and the example's position, so two
iterators with the same arguments give the same batches, and restoring a saved
`get_state()` continues with exactly the next batch.

The batch (per process, numpy), B = batch_size, S = resolution, R / T the box / token
buckets chosen per batch:
  source, target      uint8[B, S, S, 3]  (a VQA sample's target is zeros; a batch of caption
                      samples has no target)
  vlm_source          uint8[B, V, V, 3]  (if the transform has vlm_resolution V)
  boxes               float32[B, R, 4] normalised xyxy; box_mask bool[B, R]
  <text>_ids          int32[B, T]; <text>_mask bool[B, T]  (one pair per TextField)
  task                int32[B]  (records.Task)
  vlm_weight, diffusion_weight  float32[B]  (per-sample loss weights by task)
  source_index        int32[B]  (position of the example's source in `sources`)
  record_index        int32[B]  (the example's index in its source)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from fireedit_jax.data.records import BadRecord
from fireedit_jax.data.transforms import EditTransform

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Too many records of a source are unusable: the run stops with this message."""


@dataclasses.dataclass(frozen=True)
class _Skipped:
    source: int
    reason: str


@dataclasses.dataclass(frozen=True)
class _Read:
    """Reads record `index` of source `source` and transforms it; a BadRecord becomes `_Skipped`."""

    sources: tuple
    transform: EditTransform
    augment: bool

    def __call__(self, pair: tuple[int, int], rng: np.random.Generator):
        source, index = pair
        try:
            example, truncated = self.transform(self.sources[source][index], rng if self.augment else None)
        except BadRecord as error:
            return _Skipped(source, f"{self.sources[source].name}[{index}]: {error}")
        example["source_index"] = np.int32(source)
        example["record_index"] = np.int32(index)
        return example, truncated


def _tag(source: int, index: int) -> tuple[int, int]:
    return source, index


class _CountingBatches(grain.IterDataset):
    """Batches of `batch_size` usable examples; skipped records are counted per source
    (and stop the run past `max_skip_fraction`). Each element is (batch, stats), stats
    holding the counts since the previous batch. Runs inside the worker processes."""

    def __init__(self, parent, *, batch_size, collate, names, max_skip_fraction, min_records, drop_remainder):
        super().__init__(parent)
        self._options = dict(
            batch_size=batch_size, collate=collate, names=names,
            max_skip_fraction=max_skip_fraction, min_records=min_records, drop_remainder=drop_remainder,
        )  # fmt: skip

    def __iter__(self):
        return _CountingBatchesIterator(self._parent.__iter__(), **self._options)


class _CountingBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent, *, batch_size, collate, names, max_skip_fraction, min_records, drop_remainder):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._collate = collate
        self._names = names
        self._max_skip_fraction = max_skip_fraction
        self._min_records = min_records
        # cumulative per source in this worker: the threshold is checked on these
        self._read = [0] * len(names)
        self._skipped = [0] * len(names)

    def __next__(self):
        examples = []
        stats = {"read": [0] * len(self._names), "skipped": [0] * len(self._names), "truncated": {}, "errors": []}
        while len(examples) < self._batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                if examples and not self._drop_remainder:
                    break  # the last, partial batch
                raise
            if isinstance(item, _Skipped):
                self._count(item.source, stats, skipped=True)
                stats["errors"].append(item.reason)
                self._check(item)
                continue
            example, truncated = item
            self._count(int(example["source_index"]), stats, skipped=False)
            for name in truncated:
                stats["truncated"][name] = stats["truncated"].get(name, 0) + 1
            examples.append(example)
        return self._collate(examples), stats

    def _count(self, source: int, stats: dict, skipped: bool) -> None:
        self._read[source] += 1
        stats["read"][source] += 1
        if skipped:
            self._skipped[source] += 1
            stats["skipped"][source] += 1

    def _check(self, item: _Skipped) -> None:
        read, skipped = self._read[item.source], self._skipped[item.source]
        if read >= self._min_records and skipped > self._max_skip_fraction * read:
            raise DataError(
                f"source {self._names[item.source]!r}: {skipped} of {read} records read could not be used "
                f"({skipped / read:.1%}, more than max_skip_fraction={self._max_skip_fraction:.1%}). "
                f"Last: {item.reason}. Fix or remove the bad records, or raise max_skip_fraction."
            )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "read": list(self._read), "skipped": list(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._read, self._skipped = list(state["read"]), list(state["skipped"])


def _shard_range(length: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, stop) of this shard: contiguous, sizes differing by at most one (or equal, dropping the rest)."""
    size, rest = divmod(length, shard.shard_count)
    if shard.drop_remainder:
        rest = 0
    start = size * shard.shard_index + min(shard.shard_index, rest)
    return start, start + size + (shard.shard_index < rest)


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(values).generate_state(1)[0])


def make_dataset(
    sources: Sequence,
    transform: EditTransform,
    *,
    batch_size: int,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    num_epochs: int | None = None,
    shard: grain.sharding.ShardOptions | None = None,
    shuffle: bool = True,
    augment: bool = True,
    max_skip_fraction: float = 0.01,
    min_records: int = 1000,
    read_options: grain.ReadOptions | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The grain data set of (batch, stats) pairs for this process (see `make_iterator`)."""
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be distinct for their metrics, got {names}")
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
    shard = shard if shard is not None else grain.sharding.ShardByJaxProcess()
    parts = []
    for i, source in enumerate(sources):
        start, stop = _shard_range(len(source), shard)
        if stop <= start:
            raise ValueError(
                f"source {source.name!r} has {len(source)} records, too few for {shard.shard_count} shards"
            )
        part = grain.MapDataset.range(start, stop).map(functools.partial(_tag, i))
        if shuffle:
            part = part.shuffle(seed=_seed(seed, i))
        parts.append(part.repeat(num_epochs))
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    # augmentation differs between processes: the mixed index repeats across shards
    augment_seed = _seed(seed, len(sources), shard.shard_index)
    examples = mixed.random_map(_Read(tuple(sources), transform, augment), seed=augment_seed)
    return _CountingBatches(
        examples.to_iter_dataset(read_options), batch_size=batch_size, collate=transform.collate, names=names,
        max_skip_fraction=max_skip_fraction, min_records=min_records, drop_remainder=drop_remainder,
    )  # fmt: skip


class DataIterator:
    """Per-process batches (dicts of numpy arrays) with running metrics and a
    checkpointable state (`get_state` / `set_state`, JSON-serialisable)."""

    def __init__(self, dataset: grain.IterDataset, names: Sequence[str]):
        self._iterator = iter(dataset)
        self._names = list(names)
        self._totals = {"read": [0] * len(names), "skipped": [0] * len(names), "truncated": {}}

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch, stats = next(self._iterator)
        totals = self._totals
        for key in ("read", "skipped"):
            totals[key] = [a + b for a, b in zip(totals[key], stats[key])]
        for reason in stats["errors"]:
            log.warning("skipped a record: %s", reason)
        for name, count in stats["truncated"].items():
            before = totals["truncated"].get(name, 0)
            totals["truncated"][name] = before + count
            if math.floor(math.log10(before + count)) > (math.floor(math.log10(before)) if before else -1):
                warnings.warn(
                    f"{before + count} {name} entries truncated so far to the largest bucket "
                    f"(metric data/truncated/{name})"
                )
        return batch

    def metrics(self) -> dict[str, int]:
        """Counts since the start of the run: data/read/<source>, data/skipped/<source>, data/truncated/<field>."""
        out = {}
        for key in ("read", "skipped"):
            out.update({f"data/{key}/{name}": n for name, n in zip(self._names, self._totals[key])})
        out.update({f"data/truncated/{name}": n for name, n in self._totals["truncated"].items()})
        return out

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), "totals": _copy_totals(self._totals)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        self._totals = _copy_totals(state["totals"])

    def close(self) -> None:
        self._iterator.close()


def _copy_totals(totals: Mapping[str, Any]) -> dict[str, Any]:
    return {"read": list(totals["read"]), "skipped": list(totals["skipped"]), "truncated": dict(totals["truncated"])}


def make_iterator(
    sources: Sequence,
    transform: EditTransform,
    *,
    batch_size: int,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    num_epochs: int | None = None,
    shard: grain.sharding.ShardOptions | None = None,
    shuffle: bool = True,
    augment: bool = True,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    max_skip_fraction: float = 0.01,
    min_records: int = 1000,
    read_options: grain.ReadOptions | None = None,
    drop_remainder: bool = True,
) -> DataIterator:
    """This process's batches of `batch_size` examples from a weighted mixture of sources.

    Args:
      sources: random-access sources of EditRecords, each with a distinct `name`.
      transform: record → example and the batch collation (buckets, texts).
      seed: fixes the shuffling (per source and epoch) and the augmentation.
      weights: mixing weights (default uniform); each source repeats on its own.
      num_epochs: None repeats forever; otherwise iteration stops when the first
        source runs out.
      shard: which part this process reads (default: JAX process index / count).
      shuffle / augment: False for evaluation (file order, centred crop, no flip).
      num_workers: grain worker processes doing the decoding (0: in this process).
      read_options: the reading threads of each process (grain's default: 16 threads).
      max_skip_fraction / min_records: a source whose unusable records exceed this
        fraction, once `min_records` of it were read by a worker, stops the run with
        a DataError.
      drop_remainder: with num_epochs, whether the last batch, if smaller than
        batch_size, is dropped (training) or yielded (a pass over every record).
    """
    dataset = make_dataset(
        sources, transform, batch_size=batch_size, seed=seed, weights=weights, num_epochs=num_epochs,
        shard=shard, shuffle=shuffle, augment=augment, max_skip_fraction=max_skip_fraction, min_records=min_records,
        read_options=read_options, drop_remainder=drop_remainder,
    )  # fmt: skip
    if num_workers:
        from absl import flags

        # grain 0.2.18 reads an absl flag when starting workers, which raises in programs
        # that never parse absl flags (grain issue #1355): take the defaults then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size)
        dataset = dataset.mp_prefetch(options)
    return DataIterator(dataset, [source.name for source in sources])


def pad_to_shapes(batch: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]], pad_values=None) -> dict:
    """Pads each entry (after its batch axis) to `shapes[key]` with `pad_values.get(key, 0)`."""
    pad_values = pad_values or {}
    out = {}
    for key, value in batch.items():
        widths = [(0, 0)] + [(0, want - have) for have, want in zip(value.shape[1:], shapes[key])]
        out[key] = np.pad(value, widths, constant_values=pad_values.get(key, 0)) if any(w for _, w in widths) else value
    return out


def make_global_batch(
    batch: Mapping[str, np.ndarray], mesh, batch_axes: Sequence[str] = ("data", "fsdp"), *, pad_values=None
) -> dict:
    """This process's batch → global jax.Arrays, split along the first axis over the mesh's
    `batch_axes` (each process contributes its rows, in process order).

    With several processes the bucketed lengths (boxes, tokens) may differ between them:
    all are padded to the largest, found with one small all-gather of the shapes.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        keys = sorted(batch)
        mine = np.concatenate([np.asarray(batch[key].shape[1:], np.int64) for key in keys])
        widest = np.max(multihost_utils.process_allgather(mine), axis=0)
        shapes, offset = {}, 0
        for key in keys:
            rank = batch[key].ndim - 1
            shapes[key], offset = widest[offset : offset + rank].tolist(), offset + rank
        batch = pad_to_shapes(batch, shapes, pad_values)
    sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}
