"""Golden files of parameter trees: paths, shapes and logical axes.

`check_golden(name, boxed_abstract_params)` compares against tests/golden/NAME.json;
run with FIREEDIT_UPDATE_GOLDEN=1 to (re)write the file after a deliberate change.
"""

from __future__ import annotations

import json
import os

import flax

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def describe(boxed_params) -> dict:
    """{path: {"shape": [...], "axes": [...]}} plus the total count, from an eval_shape'd init."""
    leaves = flax.traverse_util.flatten_dict(
        boxed_params, is_leaf=lambda _, v: isinstance(v, flax.linen.Partitioned)
    )
    table, total = {}, 0
    for path, leaf in sorted(leaves.items()):
        axes = list(leaf.names) if isinstance(leaf, flax.linen.Partitioned) else None
        shape = list(flax.linen.meta.unbox(leaf).shape)
        count = 1
        for s in shape:
            count *= s
        total += count
        table["/".join(path)] = {"shape": shape, "axes": axes}
    return {"total_params": total, "params": table}


def check_golden(name: str, boxed_params) -> dict:
    got = describe(boxed_params)
    path = os.path.join(GOLDEN_DIR, f"{name}.json")
    if os.environ.get("FIREEDIT_UPDATE_GOLDEN") == "1" or not os.path.exists(path):
        if os.environ.get("CI"):
            raise AssertionError(f"golden file {path} is missing; generate it locally and commit it")
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(path) as f:
        want = json.load(f)
    assert got["total_params"] == want["total_params"]
    assert got["params"] == want["params"]
    return got
