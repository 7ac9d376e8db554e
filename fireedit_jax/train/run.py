"""The training run: `train_and_evaluate(config, workdir)` and `fireedit-jax train`.

    fireedit-jax train --config configs/tiny.py --config.train.steps=50 --workdir runs/tiny
    fireedit-jax train --config configs/fireedit_7b.py:3 --workdir runs/s3 --init runs/s2
    fireedit-jax export --checkpoint runs/tiny --out ckpt/tiny     # → Editor.from_pretrained

WORKDIR after a run:
  checkpoints/<step>/   Orbax training checkpoints (train/checkpoints.py)
  tokenizer/            the tokenizer the run uses (copied into every checkpoint)
  tensorboard/          event files: train/<loss parts>, learning_rate, grad/param/update
                        norms, step_time, examples_per_second, tflops_per_device, data counts,
                        and the sample grids
  samples/step_<N>.png  fixed validation examples: source | edit | target, one row each
  metrics.jsonl         the logged scalars, one line per logged step

WORKDIR may be in a bucket (gs://bucket/run; storage.py): checkpoints go there through
Orbax, the event files through tensorboardX's GCS writer (uploaded every 120 s and at the
end), metrics.jsonl every 30 s and at each checkpoint. The run first writes a probe object
into WORKDIR and checks that every data path exists, so a wrong bucket or missing
permission stops it with one message naming the path, before anything compiles.

The run starts from the workdir's latest complete checkpoint (exact resume: params,
optimizer, step, data-iterator position), else from `init` (a training run or an
inference checkpoint such as converted weights), else from a fresh init. SIGTERM (or
JAX's preemption notice on multi-host) saves a checkpoint at the next step boundary and
the run returns normally (exit code 0).

Run settings with their defaults (`run_defaults`; configs may set them):
  checkpoint.every / keep    save every N steps (and at the end), keep the last K
  logging.every              scalars every N steps
  logging.sample_every / sample_count / sample_steps   sample grids (0: never)
  init                       the starting checkpoint when the workdir has none (--init overrides)
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from fireedit_jax import storage
from fireedit_jax.train import checkpoints as ckpt_lib
from fireedit_jax.train import inputs
from fireedit_jax.train.flops import loss_inputs, train_flops_per_example
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train.step import Trainer, check_skips

log = logging.getLogger(__name__)


def run_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the run's own sections added where missing."""
    config = ml_collections.ConfigDict(config.to_dict())
    defaults = {
        "checkpoint": {"every": 500, "keep": 3},
        "logging": {"every": 10, "sample_every": 1000, "sample_count": 4, "sample_steps": 20},
    }
    for section, values in defaults.items():
        if section not in config:
            config[section] = ml_collections.ConfigDict(values)
        else:
            for key, value in values.items():
                if key not in config[section]:
                    config[section][key] = value
    if "init" not in config:
        config.init = ml_collections.config_dict.placeholder(str)
    return config


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    """step: optimizer steps taken (the final state's step); metrics: the last logged scalars;
    preempted: stopped early by SIGTERM / a preemption notice (a checkpoint was saved);
    checkpoint: the directory of the final checkpoint."""

    step: int
    metrics: dict[str, float]
    preempted: bool
    checkpoint: str


class Preemption:
    """SIGTERM → `requested(step)` turns True at the next step boundary (single process);
    on several processes, JAX's preemption sync point (all hosts agree on the step)."""

    def __init__(self):
        self.received = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None

    def _handle(self, signum, frame):
        self.received = True
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")

    def requested(self, step: int) -> bool:
        if self.received:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off
                return False
        return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _tokenizer(config, sources: Sequence[str | None], workdir):
    """(tokenizer, directory of its files): the first existing directory in `sources`
    (resumed checkpoint, --init), else config.data.tokenizer; its files go to WORKDIR/tokenizer."""
    target = workdir / "tokenizer"
    source = next((storage.as_path(s) for s in sources if s and storage.as_path(s).is_dir()), None)
    if source is not None:
        if jax.process_index() == 0 and source != target:
            storage.copy_tree(source, target)
        return inputs.make_tokenizer(storage.local_copy(source)), os.fspath(target)
    spec = config.data.get("tokenizer") if "data" in config else None
    tokenizer = inputs.make_tokenizer(spec)
    if tokenizer is None:
        return None, None
    if jax.process_index() == 0:
        with storage.staged(target) as local:
            tokenizer.save_pretrained(local)
    return tokenizer, os.fspath(target)


def _flops_per_example(config) -> float | None:
    try:
        return train_flops_per_example(config)
    except Exception as error:  # noqa: BLE001 - a missing figure must not stop training
        log.warning("model FLOPs unavailable (%s): tflops_per_device is not logged", error)
        return None


class _Writer:
    """TensorBoard events (tensorboardX, which writes gs:// paths itself) + metrics.jsonl, on
    the first process only."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"))
            self.jsonl = storage.AppendFile(workdir / "metrics.jsonl")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def image(self, step: int, name: str, pixels: np.ndarray) -> None:
        if self.active:
            self.tb.add_image(name, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        """At a checkpoint: the logs in a bucket catch up with it."""
        if self.active:
            self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


class _Samples:
    """Edits of fixed validation examples with the current weights (EMA if kept) → a grid
    PNG (rows: source | edit | target) in WORKDIR/samples and in TensorBoard."""

    def __init__(self, config, trainer: Trainer, tokenizer, transform, workdir):
        from fireedit_jax.pipeline import Editor

        self.config, self.workdir = config.logging, workdir
        self.source, self.target, self.instructions, boxes = inputs.eval_examples(
            config, transform, int(config.logging.sample_count)
        )
        self.boxes = boxes if trainer.model.conditioner == "vlm" else None
        self.editor = Editor(trainer.model, None, config, tokenizer)

    def __call__(self, step: int, state: dict, writer: _Writer) -> str:
        params = ckpt_lib.ema_params(state["params"], state["ema"]) if "ema" in state else state["params"]
        self.editor.params = params
        pixels = self.source.astype(np.float32) / 127.5 - 1.0
        edited = self.editor.edit_arrays(pixels, self.instructions, boxes=self.boxes,
                                         steps=int(self.config.sample_steps), seed=0)  # fmt: skip
        edited = np.clip((np.asarray(edited) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        grid = np.concatenate([np.concatenate(row, axis=1) for row in zip(self.source, edited, self.target)], axis=0)
        path = self.workdir / "samples" / f"step_{step:07d}.png"
        if writer.active:
            storage.save_image(Image.fromarray(grid), path)
        writer.image(step, "samples", grid)
        return os.fspath(path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, init: str | None = None,
                       mesh=None, progress: bool = True, on_log: Callable[[int, dict], None] | None = None,
                       ) -> RunResult:  # fmt: skip
    """Trains `config` in `workdir` until config.train.steps (or SIGTERM); see the module docstring.

    init: the checkpoint to start from when the workdir has none (default config.init).
    mesh: default `mesh.make_mesh(config.mesh)` over all devices.
    on_log: called with (step, the logged scalars) at every logged step (e.g. to estimate the time left).
    """
    config = run_defaults(config)
    mesh_lib.maybe_initialize_distributed(config)
    preemption = Preemption()  # from the start: a SIGTERM during start-up stops at the first step boundary
    try:
        return _train(config, check_paths(config, workdir, init or config.get("init")), init, mesh, progress,
                      preemption, on_log)  # fmt: skip
    finally:
        preemption.close()


def check_paths(config, workdir, init: str | None):
    """WORKDIR (writable), `init` and every data source's path (existing) → WORKDIR as a path;
    StorageError naming the first that fails."""
    workdir = storage.check_writable(workdir, "--workdir")
    if init:
        storage.check_readable(init, "--init")
    for name, spec in inputs.data_specs(config):
        for field in ("path", "image_root"):
            if spec.get(field):
                storage.check_readable(spec[field], f"config.data source {name!r}: {field}")
    return workdir


def _train(config, workdir, init: str | None, mesh, progress: bool, preemption: Preemption, on_log) -> RunResult:
    """train_and_evaluate's body."""
    trainer = Trainer.from_config(config, mesh=mesh)
    total = int(config.train.steps)
    checkpoints = ckpt_lib.Checkpoints(workdir / "checkpoints", every=int(config.checkpoint.every),
                                       keep=int(config.checkpoint.keep))  # fmt: skip
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)

    restored = checkpoints.restore_latest(abstract)
    init = init or config.get("init")
    init_tokenizer, fresh = None, None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        if restored is not None:
            state, start = restored.state, restored.step
            log.info("resuming from %s/%d", checkpoints.directory, start)
        elif init:
            params, init_tokenizer = ckpt_lib.init_params(init, abstract["params"], trainer.model.init,
                                                          jax.random.key(int(config.seed)))  # fmt: skip
            state, start = trainer.init_state(params=params), 0
            log.info("starting from %s", init)
        else:  # XLA compiles on one core: the init compiles on the other while the step compiles below
            fresh, start = pool.submit(trainer.init_state), 0
        tokenizer, tokenizer_dir = _tokenizer(
            config, [restored.tokenizer_dir if restored else None, init_tokenizer], workdir
        )
        transform = inputs.make_transform(config, trainer.model, tokenizer)
        local_batch = int(config.train.batch_size) // jax.process_count()
        data = inputs.make_train_iterator(config, transform, local_batch)
        if restored is not None and restored.data_state is not None:
            data.set_state(restored.data_state)
        loss_keys, batch = loss_inputs(config), None
        if start < total:
            batch = trainer.shard_batch(inputs.model_batch(next(data), loss_keys))
            trainer.step.lower(abstract, batch).compile()  # the step's first call finds it compiled
        if fresh is not None:
            state = fresh.result()

    writer = _Writer(workdir)
    every, sample_every = int(config.logging.every), int(config.logging.sample_every)
    samples = _Samples(config, trainer, tokenizer, transform, workdir) if sample_every and "eval" in config.data else None
    flops = _flops_per_example(config)
    devices = trainer.mesh.devices.size
    step, last, preempted, previous = start, {}, False, None
    last_time, last_step = time.perf_counter(), start
    bar = _progress(total, start, progress)
    try:
        while step < total:
            if batch is None:
                batch = trainer.shard_batch(inputs.model_batch(next(data), loss_keys))
            state, metrics = trainer.step(state, batch)
            step, batch = step + 1, None
            if previous is not None:  # the step before: reading this one's would wait for it, not prepare the next batch
                check_skips(previous, int(config.train.max_consecutive_skips))
            previous = metrics
            if step % every == 0 or step == total:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                if last_step > start:  # the first interval after a (re)start includes compilation
                    seconds = (now - last_time) / (step - last_step)
                    values["step_time"] = seconds
                    values["examples_per_second"] = int(config.train.batch_size) / seconds
                    if flops:
                        values["tflops_per_device"] = flops * int(config.train.batch_size) / seconds / devices / 1e12
                values.update({k: float(v) for k, v in data.metrics().items()})
                writer.scalars(step, values)
                if on_log is not None:
                    on_log(step, values)
                last, last_time, last_step = values, now, step
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if samples is not None and step % sample_every == 0:
                samples(step, state, writer)
            preempted = preemption.requested(step)
            if preempted or step == total or checkpoints.should_save(step):
                checkpoints.save(step, state, config=config, data_state=data.get_state(),
                                 tokenizer_dir=tokenizer_dir, force=True)  # fmt: skip
                writer.flush()
            if preempted:
                log.warning("stopped at step %d for preemption; checkpoint saved", step)
                break
        if previous is not None:
            check_skips(previous, int(config.train.max_consecutive_skips))
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close()
        writer.close()
        data.close()
    return RunResult(step, last, preempted, os.fspath(checkpoints.directory / str(step)))


def _progress(total: int, start: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------- config files and overrides


def load_config(path: str) -> ml_collections.ConfigDict:
    """configs/X.py or configs/X.py:ARG → X.get_config() or X.get_config(ARG)."""
    file, _, arg = path.partition(":")
    if not os.path.exists(file):
        raise FileNotFoundError(f"config file {file!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(file)[:-3]}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Sets "path.to.field=value" entries (ml_collections config_flags style); values are
    Python literals (numbers, tuples, True/False, None) or else strings. Unknown fields are errors."""
    for override in overrides:
        name, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"--config.{override}: expected --config.path.to.field=value")
        *parents, field = name.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"--config.{name}: the config has no field {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if field not in node:
            raise ValueError(f"--config.{name}: the config has no field {name!r}")
        value = _parse_value(text)
        current = node[field]
        if isinstance(current, str) and not isinstance(value, str):
            value = text  # a string field keeps the text as written ("1e-4" stays a string there)
        elif isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
            value = (value,)
        try:
            node[field] = value
        except TypeError as error:
            raise ValueError(f"--config.{name}={text}: {error}") from None
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` sub-command's arguments; --config.path=value overrides land in `args.overrides`."""
    add_config_argument(parser, "configs/X.py (or X.py:ARG); override any field with --config.path.to.field=value")
    parser.add_argument("--workdir", required=True, help="checkpoints, tokenizer, event files and samples go here")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint when WORKDIR has none: a training run or checkpoint "
                             "(e.g. stage 2's workdir) or an inference checkpoint (converted weights)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_config_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--config FILE[:ARG] plus any --config.path=value overrides, which land in `args.overrides`."""
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help=help)
    # argparse cannot declare "--config.<any path>": take the overrides out before it parses
    # (argparse calls a sub-command parser's parse_known_args with that command's arguments).
    parse_known_args = parser.parse_known_args

    def with_overrides(args=None, namespace=None):
        rest, overrides = split_overrides(args if args is not None else [])
        namespace, unknown = parse_known_args(rest, namespace)
        namespace.overrides = overrides
        return namespace, unknown

    parser.parse_known_args = with_overrides


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, "path=value" overrides) from argv's --config.path=value / --config.path value."""
    rest, overrides, args = [], [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(args):
                    raise ValueError(f"{arg} needs a value")
                body, i = f"{body}={args[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def run(args: argparse.Namespace) -> int:
    config = apply_overrides(run_defaults(load_config(args.config)), args.overrides)
    result = train_and_evaluate(config, args.workdir, init=args.init, progress=not args.no_progress)
    how = "stopped for preemption" if result.preempted else "done"
    print(f"{how} at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a training run's workdir, checkpoints/ or a step in it")
    parser.add_argument("--out", required=True, help="inference checkpoint directory to write")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if an EMA was kept")


def run_export(args: argparse.Namespace) -> int:
    step = ckpt_lib.export(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(f"exported step {step} to {args.out}")
    return 0


def register(commands) -> None:
    """Adds `train` and `export` to the CLI's sub-commands (cli.py)."""
    train = commands.add_parser("train", help="train from a config (resumes WORKDIR; SIGTERM saves and exits)")
    add_arguments(train)
    train.set_defaults(run=run)
    export = commands.add_parser("export", help="a training checkpoint → an inference checkpoint for edit/Editor")
    add_export_arguments(export)
    export.set_defaults(run=run_export)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fireedit_jax.train.run --config ... --workdir ... [--config.x=y ...]`."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="fireedit-jax train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
