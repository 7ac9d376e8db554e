"""Training checkpoints: one Orbax composite per saved step, restorable onto any mesh.

    WORKDIR/checkpoints/<step>/
      params/     the whole parameter tree (float32 master weights)
      ema/        EMA of the trainable leaves (only with train.ema.enabled)
      opt/        step counters + optax state (trainable leaves only)
      config/     the run's config (JSON)
      data/       each process's data-iterator state: process_<i>-of-<n>.json
      tokenizer/  the tokenizer files (so `export` needs nothing else)

Saves are asynchronous (Orbax copies the arrays to host memory, then writes them in
the background while training goes on), every `every` steps, keeping the last `keep`.
Restoring reads every array straight into the target Trainer's shardings, so a run
saved on one mesh continues on another. A step directory that does not restore (a
half-written or truncated save) is skipped with a warning in favour of the previous one.

The directory may be in a bucket (gs://): Orbax writes the arrays there through TensorStore
and marks a finished step with commit_success.txt instead of renaming a temporary
directory (objects cannot be renamed atomically); a step without it was interrupted and is
set aside like one that does not restore.

Where a run starts (`resume_or_init`): the workdir's latest complete checkpoint, else
`init` (a training checkpoint, e.g. stage 2's run for stage 3, or an inference
checkpoint such as converted weights: its params only), else a fresh init.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import warnings
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from fireedit_jax import checkpoint as inference
from fireedit_jax import storage
from fireedit_jax.nn.lora import merge_lora

log = logging.getLogger(__name__)

STATE_ITEMS = ("params", "ema", "opt")


# ---------------------------------------------------------------- per-process data state and tokenizer files


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes (and reads back) its own JSON file of the data-iterator state."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave):
        directory.mkdir(parents=True, exist_ok=True)
        self._path(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        """The state, or None (with a warning) when the checkpoint was saved by another number of processes."""
        path = self._path(directory)
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir() if p.name.endswith(".json"))
            warnings.warn(f"{path} does not exist (this run has {jax.process_count()} processes, the checkpoint "
                          f"holds {found}): the data pipeline starts from its beginning")  # fmt: skip
            return None
        return json.loads(path.read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class FilesHandler(ocp.CheckpointHandler):
    """A directory's files copied in (by the primary process); restore returns the item's path."""

    def save(self, directory: epath.Path, args: FilesSave):
        if jax.process_index() == 0:
            storage.copy_tree(args.source, directory)

    def restore(self, directory: epath.Path, args: FilesRestore | None = None) -> str:
        return os.fspath(directory)


@ocp.args.register_with_handler(FilesHandler, for_save=True)
@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    source: str


@ocp.args.register_with_handler(FilesHandler, for_restore=True)
@dataclasses.dataclass
class FilesRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------- the manager


def abstract_with_shardings(abstract_boxed, shardings):
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores into)."""
    shapes = flax.linen.meta.unbox(abstract_boxed)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _split_state(state: dict) -> dict:
    items = {"params": state["params"], "opt": {k: v for k, v in state.items() if k not in STATE_ITEMS}}
    items["opt"].update(opt_state=state["opt_state"])
    if "ema" in state:
        items["ema"] = state["ema"]
    return items


def _join_state(items: dict) -> dict:
    state = dict(items["opt"])
    state["params"] = items["params"]
    if "ema" in items:
        state["ema"] = items["ema"]
    return state


def _state_args(items: dict, make) -> dict:
    return {name: make(tree) for name, tree in items.items()}


@dataclasses.dataclass
class Restored:
    """What a training checkpoint gives back."""

    step: int
    state: dict
    data_state: Any  # None when the checkpoint has none for this process
    config: ml_collections.ConfigDict
    tokenizer_dir: str | None


class Checkpoints:
    """The run's checkpoints under `directory` (an Orbax CheckpointManager).

        checkpoints = Checkpoints(workdir + "/checkpoints", every=500, keep=3)
        checkpoints.save(step, state, config=config, data_state=it.get_state(), tokenizer_dir=tok)
        restored = checkpoints.restore_latest(trainer)   # None if there is none
        checkpoints.close()                              # waits for the last save
    """

    def __init__(self, directory: str, *, every: int = 1, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):  # fmt: skip
        self.directory, self.every = storage.as_path(directory), max(1, int(every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every, max_to_keep=keep, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only,
        )  # fmt: skip
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """Whether `step` is a regular save step: a multiple of `every` (Orbax's own rule also saves the first step)."""
        return step % self.every == 0

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, *, config, data_state=None, tokenizer_dir: str | None = None,
             force: bool = False) -> bool:  # fmt: skip
        """Starts saving (asynchronously) if `step` is a save step or `force`; returns whether it did."""
        if step in self.manager.all_steps():
            return False
        items = _state_args(_split_state(state), ocp.args.StandardSave)
        items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        if tokenizer_dir is not None:
            items["tokenizer"] = FilesSave(tokenizer_dir)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict) -> Restored:
        """Step `step` into `abstract_state` (ShapeDtypeStructs with shardings, see abstract_with_shardings)."""
        names = _item_names(self.directory / str(step))
        missing = [name for name in ("params", "opt", "config") if name not in names]
        if missing or ("ema" in abstract_state) != ("ema" in names):
            raise inference.CheckpointError(
                f"checkpoint {self.directory}/{step} has items {sorted(names)}; missing {missing or ['ema']}"
            )
        items = _state_args(_split_state(abstract_state), ocp.args.StandardRestore)
        items["config"] = ocp.args.JsonRestore()
        if "data" in names:
            items["data"] = DataStateRestore()
        if "tokenizer" in names:
            items["tokenizer"] = FilesRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = _join_state({name: out[name] for name in STATE_ITEMS if name in names})
        return Restored(
            step, state, out["data"] if "data" in names else None, ml_collections.ConfigDict(out["config"]),
            out["tokenizer"] if "tokenizer" in names else None,
        )  # fmt: skip

    def restore_latest(self, abstract_state: dict) -> Restored | None:
        """The newest step that restores; broken ones are skipped with a warning (and moved aside)."""
        for step in _unfinished_steps(self.directory):
            warnings.warn(f"checkpoint {self.directory}/{step} was not finished (no {_COMMITTED}); it is set aside "
                          f"as {step}.broken")  # fmt: skip
            self._set_aside(step)
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
                warnings.warn(
                    f"checkpoint {self.directory}/{step} cannot be restored ({type(error).__name__}: "
                    f"{str(error)[:300]}); it is set aside as {step}.broken and the previous one is used"
                )
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.parent / f"{step}.broken")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _item_names(step_dir) -> set[str]:
    step_dir = storage.as_path(step_dir)
    if not step_dir.is_dir():
        return set()
    return {item.name for item in step_dir.iterdir() if item.is_dir()}


_COMMITTED = "commit_success.txt"  # Orbax's mark of a finished step in a bucket


def _step_dirs(directory) -> dict[int, epath.Path]:
    directory = storage.as_path(directory)
    try:  # a bucket's "directory" is a prefix: it can vanish between the two calls (the workdir probe)
        return {int(p.name): p for p in directory.iterdir() if p.name.isdigit()} if directory.is_dir() else {}
    except FileNotFoundError:
        return {}


def _finished(step_dir: epath.Path) -> bool:
    """Locally a step directory exists once finished (renamed from a temporary one); in a
    bucket once Orbax has written its commit file."""
    return not storage.is_remote(step_dir) or (step_dir / _COMMITTED).exists()


def _unfinished_steps(directory) -> list[int]:
    return sorted(step for step, path in _step_dirs(directory).items() if not _finished(path))


# ---------------------------------------------------------------- finding checkpoints given by the user


def find_training_checkpoint(path: str) -> tuple[epath.Path, int] | None:
    """(manager directory, step) for a run's workdir, its checkpoints/ directory, or one step
    directory in it; None when `path` holds no finished training checkpoint. The latest step is taken."""
    path = storage.as_path(path)
    for directory in (path / "checkpoints", path):
        steps = [step for step, step_dir in _step_dirs(directory).items() if _finished(step_dir)]
        if steps:
            return directory, max(steps)
    if path.name.isdigit() and _finished(path) and {"params", "opt"} <= _item_names(path):
        return path.parent, int(path.name)
    return None


def restore_params(path: str, abstract_params, *, use_ema: bool = False):
    """The params of a training checkpoint (the latest complete step of a run) into
    `abstract_params` (ShapeDtypeStructs with shardings); `use_ema`: trainable leaves from the EMA.
    Returns (params, step directory)."""
    found = find_training_checkpoint(path)
    if found is None:
        raise inference.CheckpointError(f"{path!r} holds no training checkpoint")
    directory, step = found
    names = _item_names(directory / str(step))
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    ema = use_ema and "ema" in names
    if ema:
        template = ocp.StandardCheckpointer().metadata(directory / str(step) / "ema").item_metadata.tree
        abstract_ema = _matching(abstract_params, template)
        items["ema"] = ocp.args.StandardRestore(abstract_ema)
    checkpoints = Checkpoints(directory, read_only=True)
    try:
        out = checkpoints.manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        checkpoints.close()
    params = out["params"]
    if ema:
        params = ema_params(params, out["ema"])
    return params, directory / str(step)


def ema_params(params, ema):
    """`params` with the trained leaves taken from the EMA (ema has None at frozen leaves)."""
    return jax.tree.map(lambda e, p: p if e is None else e, ema, params, is_leaf=lambda x: x is None)


def _matching(abstract_params, template):
    """`abstract_params` with None where `template` (a tree with None at untrained leaves) has None."""
    present = flax.traverse_util.flatten_dict(template)
    flat = flax.traverse_util.flatten_dict(abstract_params)
    return flax.traverse_util.unflatten_dict({k: (v if present.get(k) is not None else None) for k, v in flat.items()})


# Leaves that a method adds to a model (mask-guided editing: the mask encoder and the UNet's gated
# layer reading its tokens, each transformer block's `fuser`; learnt edit regions: the region model).
# Starting from a checkpoint without them (converted SD / IP2P weights, a FireEdit run, a mask-guided
# generator), they are initialised anew and listed in a warning; any other difference is an error.
NEW_LEAVES = (r"^mask_encoder/", r"/fuser/", r"^region/")


def _injection_layer(names) -> str:
    """The UNet's gated layer (models/unet.py `GatedInjection`) that new fuser leaves belong to: only
    GLIGEN's gated self-attention has a gated feed-forward (alpha_dense)."""
    if any("/fuser/alpha_dense" in name for name in names):
        return "gated self-attention (unet.injection_layer 'self')"
    return "gated cross-attention to the mask tokens (unet.injection_layer 'cross')"


def init_params(path: str, abstract_params, init_fn=None, key: jax.Array | None = None) -> tuple[Any, str | None]:
    """The params to start from: a training checkpoint's (--init a run) or an inference
    checkpoint's (converted weights, an export). Returns (params, tokenizer dir or None).

    init_fn(key) → the model's (boxed) params: the NEW_LEAVES that the checkpoint lacks come from
    it (only those are computed), with a warning naming them. Without it they are an error."""
    training = find_training_checkpoint(path)
    if training is not None:
        params_dir = training[0] / str(training[1]) / "params"
    elif (storage.as_path(path) / "config.json").exists():
        params_dir = storage.as_path(path) / "params"
    else:
        raise inference.CheckpointError(
            f"--init {path!r} is neither a training run / checkpoint (checkpoints/<step>/) nor an "
            "inference checkpoint (config.json + params/)"
        )
    flat = flax.traverse_util.flatten_dict(abstract_params, keep_empty_nodes=True)  # e.g. a parameter-free VAE's {}
    new = []
    if init_fn is not None and params_dir.is_dir():
        stored = flax.traverse_util.flatten_dict(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
        new = [k for k in flat if k not in stored and any(re.search(p, "/".join(k)) for p in NEW_LEAVES)]
    old = flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in new})
    if training is not None:
        params, step_dir = restore_params(path, old)
    else:
        loaded = flax.traverse_util.flatten_dict(inference.load_params(path, old))  # drops empty nodes: put back
        params = flax.traverse_util.unflatten_dict({k: jax.device_put(loaded[k], v.sharding) if k in loaded else v
                                                    for k, v in flat.items() if k not in new})  # fmt: skip
        step_dir = storage.as_path(path)
    if new:
        names = ["/".join(k) for k in new]
        encoder = sum(n.startswith("mask_encoder/") for n in names)
        blocks = {n.split("/fuser/")[0] for n in names if "/fuser/" in n}
        parts = [f"mask encoder ({encoder} leaves)"] if encoder else []
        parts += [f"{_injection_layer(names)} in {len(blocks)} UNet transformer blocks"] if blocks else []
        region = sum(n.startswith("region/") for n in names)
        parts += [f"region model ({region} leaves)"] if region else []
        warnings.warn(f"--init {path!r} has no {' or '.join(parts)}: initialised anew ({len(names)} leaves)")
        log.info("initialised anew: %s", ", ".join(names))

        @functools.partial(jax.jit, out_shardings=[flat[k].sharding for k in new])
        def fresh(key):  # only the new leaves: XLA drops the rest of the init
            init = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(init_fn(key)))
            return [init[k] for k in new]

        values = fresh(jax.random.key(0) if key is None else key)
        kept = flax.traverse_util.flatten_dict(params, keep_empty_nodes=True)
        params = flax.traverse_util.unflatten_dict({**kept, **dict(zip(new, values))})
    return params, _tokenizer_in(step_dir)


# ---------------------------------------------------------------- export


def export(path: str, out: str, *, use_ema: bool = True) -> int:
    """A training checkpoint → an inference checkpoint (`checkpoint.py`'s format, what
    `Editor.from_pretrained` loads): EMA weights for the trained leaves when there are
    any (`use_ema`), LoRA adapters merged into their kernels (the config's lora_rank set
    to 0), no optimizer state. Returns the exported step."""
    from fireedit_jax.models.fireedit import EditModel

    found = find_training_checkpoint(path)
    if found is None:
        raise inference.CheckpointError(f"{path!r} holds no training checkpoint (checkpoints/<step>/)")
    directory, step = found
    step_dir = directory / str(step)
    config = ml_collections.ConfigDict(json.loads((step_dir / "config" / "metadata").read_text()))
    model = EditModel.from_config(config.model)
    abstract = inference.abstract(jax.eval_shape(model.init, jax.random.key(0)))
    host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), abstract)
    params, _ = restore_params(step_dir, abstract, use_ema=use_ema)
    params = jax.tree.map(lambda x: jax.device_get(x), params)
    export_config = ml_collections.ConfigDict(config.to_dict())
    if model.conditioner == "vlm" and model.vlm.llm.lora_rank:
        params = jax.device_get(merge_lora(params, model.vlm.llm))
        export_config.model.llm.lora_rank = 0
    inference.save(out, params, export_config, _tokenizer_in(step_dir))
    return step


def _tokenizer_in(directory: epath.Path) -> str | None:
    """directory/tokenizer (a path string, possibly gs://) if it is there."""
    tokenizer = directory / "tokenizer"
    return os.fspath(tokenizer) if tokenizer.is_dir() else None
