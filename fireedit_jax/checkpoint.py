"""Inference checkpoints: one directory that `Editor.from_pretrained` needs nothing beside.

    DIR/config.json   the ml_collections config (model dimensions, scheduler, ...)
    DIR/params/       the parameter tree (Orbax)
    DIR/tokenizer/    tokenizer files (optional)

DIR may be local or in a bucket (gs://, storage.py).
"""

from __future__ import annotations

import json

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from fireedit_jax import storage


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not match its config."""


def save(directory: str, params, config: ml_collections.ConfigDict, tokenizer_dir: str | None = None) -> None:
    directory = storage.check_writable(directory, "checkpoint directory")
    storage.remove_tree(directory / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params)
    checkpointer.wait_until_finished()
    (directory / "config.json").write_text(config.to_json(indent=1))
    if tokenizer_dir is not None:
        storage.copy_tree(tokenizer_dir, directory / "tokenizer")


def load_config(directory: str) -> ml_collections.ConfigDict:
    path = storage.as_path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    if not (path / "config.json").exists():
        raise CheckpointError(
            f"{directory!r} is not a fireedit_jax checkpoint: it has no config.json "
            "(convert weights with `fireedit-jax convert`)"
        )
    return ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))


def load_params(directory: str, expected, *, only: tuple[str, ...] | None = None):
    """Restores the params and checks them against `expected` (the config's abstract tree).

    only: restore just these top-level entries (e.g. ("vae",)), reading nothing else from disk.
    """
    path = storage.as_path(directory) / "params"
    if not path.is_dir():
        raise CheckpointError(f"{directory!r} has no params/ directory: the checkpoint is incomplete")
    check_readable(directory, only)
    if only is None:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path)
    else:
        expected = {name: expected[name] for name in only}
        item = {name: tree for name, tree in abstract(expected).items() if jax.tree.leaves(tree)}  # none if empty
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = {}
        if item:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item, as_numpy, partial_restore=True))
        # what the checkpoint lacks comes back as given (abstract): left out, so it is reported missing
        found = {k: v for k, v in flax.traverse_util.flatten_dict(restored).items() if isinstance(v, np.ndarray)}
        params = {name: {} for name in only} | flax.traverse_util.unflatten_dict(found)
    differences = tree_differences(params, expected)
    if differences:
        raise CheckpointError(
            f"the parameters in {directory!r} do not match its config.json:\n  " + "\n  ".join(differences)
        )
    return params


def damaged(directory: str, what: str) -> str:
    return (f"checkpoint {directory!r} is damaged: {what}; copy it again from where it was made, or export it "
            "again (`fireedit-jax export`, `fireedit-jax convert`)")


def check_readable(directory: str, only: tuple[str, ...] | None = None) -> None:
    """CheckpointError naming the first leaf whose stored bytes cannot be read (a truncated or missing data file).

    Reads the last byte of every stored value (of the `only` entries), not the values. Orbax's restore would find
    the same damage, but it closes its event loop on the first failed read while the others are in flight, and
    each of those then reports "RuntimeError: Event loop is closed" when it completes; nothing is read by Orbax
    here until every value is known to be there. A checkpoint without an OCDBT manifest is left to Orbax.
    """
    path = storage.as_path(directory) / "params"
    if not (path / "manifest.ocdbt").exists():
        return
    base = str(path) + "/" if storage.is_remote(path) else f"file://{path}/"
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
        keys = store.list().result()
    except ValueError as err:
        raise CheckpointError(damaged(directory, f"its index cannot be read ({' '.join(str(err).split())})")) from err
    keys = [k.decode() for k in keys if only is None or k.decode().replace("/", ".").split(".")[0] in only]
    reads = [(key, store.read(key, byte_range=slice(-1, None))) for key in keys]  # all in flight at once
    failed = []
    for key, read in reads:
        try:
            read.result()
        except ValueError as err:
            failed.append((key, " ".join(str(err).split())))
    if failed:
        key, err = failed[0]
        leaf = key.rsplit("/", 1)[0].replace(".", "/")  # orbax's "unet.conv_in.kernel/0.0.0.0": leaf, then chunk
        more = f" (and {len(failed) - 1} more stored chunks)" if len(failed) > 1 else ""
        raise CheckpointError(damaged(directory, f"the stored bytes of {leaf}{more} cannot be read: {err}"))


def tree_differences(got, want) -> list[str]:
    """Human-readable differences between two param trees (paths and shapes)."""

    def shapes(tree):
        flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(tree))
        return {"/".join(map(str, k)): tuple(v.shape) for k, v in flat.items()}

    got, want = shapes(got), shapes(want)
    out = [f"missing: {k}" for k in sorted(want.keys() - got.keys())]
    out += [f"unexpected: {k}" for k in sorted(got.keys() - want.keys())]
    out += [f"shape of {k}: checkpoint {got[k]}, config {want[k]}" for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
    return out


def tokenizer_dir(directory: str) -> str:
    """The checkpoint's tokenizer/ directory, as a local directory (copied from a bucket)."""
    path = storage.as_path(directory) / "tokenizer"
    if not path.is_dir():
        raise CheckpointError(f"{directory!r} has no tokenizer/ directory")
    return storage.local_copy(path)


def abstract(tree):
    """ShapeDtypeStructs of a (possibly boxed) param tree."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), flax.linen.meta.unbox(tree))
