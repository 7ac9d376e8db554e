"""Config dataclasses from (JSON-loaded) mappings: the one helper every network's config goes through.

A leaf module (it imports nothing of the package), so models, training, the pipeline and the
benchmarks share it without importing each other.
"""

from __future__ import annotations

import dataclasses

import ml_collections


def dataclass_from_dict(cls, values):
    """A config dataclass from a (JSON-loaded) mapping; lists become tuples."""
    values = values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return cls(**{k: as_tuple(v) for k, v in values.items()})
