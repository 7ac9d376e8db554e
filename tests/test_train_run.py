"""The training run (train/run.py) and its checkpoints (train/checkpoints.py).

Runs of configs/tiny.py (ShapeEdit made on the fly, 16 px, batch 8) in subprocesses of
one device each, sharing the tests' persistent compilation cache:
  full      8 steps uninterrupted, checkpoints every 2, a sample grid at step 8
  killed    the same command, SIGKILLed once a checkpoint exists; then resumed
  sigterm   SIGTERM after the first step: a final checkpoint and exit code 0
Then in this process: a checkpoint saved on a 2×2×2 mesh restored on 8×1×1 and on one
device, export → Editor, a half-written checkpoint, the event files.
"""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from fireedit_jax.pipeline import Editor, load_tokenizer
from fireedit_jax.train import checkpoints as ckpt_lib
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train import run
from fireedit_jax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.checkpoint.every=2", "--config.logging.every=1",
             "--config.resolution=16", f"--config.logging.sample_every={STEPS}", "--config.logging.sample_count=2",
             "--config.logging.sample_steps=2"]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    return env


def _start(workdir: str, *extra: str) -> subprocess.Popen:
    """`fireedit-jax train` of configs/tiny.py in a subprocess; its output goes to WORKDIR.log."""
    command = [sys.executable, "-m", "fireedit_jax.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
               "--workdir", workdir, "--no-progress", *OVERRIDES, *extra]  # fmt: skip
    with open(f"{workdir}.log", "a") as log:
        return subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, workdir: str) -> str:
    process.wait(timeout=900)
    with open(f"{workdir}.log") as log:
        return log.read()


def _logged(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"full", "killed", "sigterm"}: the subprocess runs (concurrent: each pays JAX's start-up
    and tracing, which the two cores share better than one process alone)."""
    base = tmp_path_factory.mktemp("runs")
    full, killed, sigterm = (str(base / name) for name in ("full", "killed", "sigterm"))
    first = _start(full)
    to_kill = _start(killed, "--config.logging.sample_every=0")
    to_stop = _start(sigterm, "--config.logging.sample_every=0", "--config.checkpoint.every=100")
    # SIGTERM after the first step; SIGKILL as soon as a checkpoint is complete (renamed from
    # its temporary directory); whichever comes first
    logged_before, resumed, stopping = None, None, False
    while resumed is None or to_stop.poll() is None:
        if not stopping and _logged(sigterm):
            to_stop.send_signal(signal.SIGTERM)
            stopping = True
        if resumed is None and ckpt_lib.find_training_checkpoint(killed) is not None:
            to_kill.send_signal(signal.SIGKILL)
            to_kill.wait()
            assert to_kill.returncode == -signal.SIGKILL
            logged_before = len(_logged(killed))
            resumed = _start(killed, "--config.logging.sample_every=0")
        if to_kill.poll() not in (None, -signal.SIGKILL) or (to_stop.poll() is not None and not stopping):
            raise AssertionError(f"a run ended early:\n{_finish(to_kill, killed)}\n{_finish(to_stop, sigterm)}")
        time.sleep(0.02)
    out_sigterm = _finish(to_stop, sigterm)
    out_full, out_resumed = _finish(first, full), _finish(resumed, killed)
    assert first.returncode == 0, out_full
    assert resumed.returncode == 0, out_resumed
    return {"full": (full, out_full), "killed": (killed, logged_before),
            "sigterm": (sigterm, to_stop.returncode, out_sigterm)}  # fmt: skip


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(runs):
    full = {line["step"]: line["loss"] for line in _logged(runs["full"][0])}
    assert sorted(full) == list(range(1, STEPS + 1))
    workdir, logged_before = runs["killed"]
    lines = _logged(workdir)
    before, after = lines[:logged_before], lines[logged_before:]
    assert after, "the resumed run logged nothing"
    assert after[0]["step"] > 1, "the resumed run did not start from a checkpoint"
    assert after[-1]["step"] == STEPS
    assert before[-1]["step"] < STEPS, "the run finished before it was killed"
    for line in before + after:  # exact equality, step for step
        assert line["loss"] == full[line["step"]], line["step"]


def test_sigterm_saves_a_final_checkpoint_and_exits_0(runs):
    workdir, returncode, out = runs["sigterm"]
    assert returncode == 0, out
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    last = _logged(workdir)[-1]["step"]
    assert steps == [last] and last < STEPS  # only the preemption checkpoint (every=100)
    assert "stopped for preemption" in out


def _read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of tensorboard event files (TFRecords of Event protos), parsed by hand."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, []
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.append((event.step, value.tag))
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    scalars["<images>"] = images
    return scalars


def test_event_files_hold_the_scalars_and_the_sample_grid(runs):
    workdir, _ = runs["full"]
    events = _read_events(os.path.join(workdir, "tensorboard"))
    for tag in ("loss", "diffusion", "learning_rate", "grad_norm", "param_norm", "update_norm",
                "step_time", "examples_per_second", "data/read/shapes"):  # fmt: skip
        assert tag in events, sorted(events)
    assert [step for step, _ in events["loss"]] == list(range(1, STEPS + 1))
    logged = {line["step"]: line for line in _logged(workdir)}
    for step, value in events["loss"]:
        assert value == pytest.approx(logged[step]["loss"], rel=1e-6)
    assert events["data/read/shapes"][-1] == (STEPS, 8.0 * STEPS)
    assert "tflops_per_device" in events
    assert events["<images>"] == [(STEPS, "samples")]
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_0000008.png")))
    assert grid.shape == (2 * 16, 3 * 16, 3)  # 2 examples × (source | edit | target)


@pytest.fixture(scope="module")
def tiny():
    config = run.run_defaults(run.load_config(os.path.join(ROOT, "configs", "tiny.py")))
    config.resolution = 16
    return config


def test_half_written_checkpoint_is_skipped_with_a_warning(runs, tiny, tmp_path):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(runs["full"][0], "checkpoints"), directory)
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    assert steps[-1] == STEPS and len(steps) == 3  # keep = 3
    # the newest: its params data files truncated to half; and an unfinished temporary save
    for path in glob.glob(os.path.join(directory, str(STEPS), "params", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 1000:
            os.truncate(path, os.path.getsize(path) // 2)
    shutil.copytree(os.path.join(directory, str(steps[0])), os.path.join(directory, f"{STEPS + 2}.orbax-checkpoint-tmp-1"))
    trainer = Trainer.from_config(tiny, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    checkpoints = ckpt_lib.Checkpoints(directory)
    with pytest.warns(UserWarning, match=f"checkpoint .*/{STEPS} cannot be restored"):
        restored = checkpoints.restore_latest(abstract)
    checkpoints.close()
    assert restored.step == steps[-2] and int(restored.state["step"]) == steps[-2]
    assert restored.data_state is not None and restored.config.train.steps == STEPS
    assert os.path.isdir(os.path.join(directory, f"{STEPS}.broken"))


def test_export_edits_like_the_merged_training_weights(runs, tiny, tmp_path):
    workdir, _ = runs["full"]
    out = str(tmp_path / "export")
    step = ckpt_lib.export(workdir, out)
    assert step == STEPS
    assert sorted(os.listdir(out)) == ["config.json", "params", "tokenizer"]  # no optimizer state
    exported = Editor.from_pretrained(out)
    # the reference: the training checkpoint's own params with the EMA's trained leaves
    trainer = Trainer.from_config(tiny, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    restored = checkpoints.restore(STEPS, abstract)
    checkpoints.close()
    merged = ckpt_lib.ema_params(restored.state["params"], restored.state["ema"])
    tokenizer = load_tokenizer(restored.tokenizer_dir)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    instructions = ["make the red circle blue", "remove the square"]
    got = np.asarray(exported.edit_arrays(pixels, instructions, steps=3, seed=1))
    assert exported.tokenizer.get_vocab() == tokenizer.get_vocab()
    exported.params = merged  # the same compiled edit, with the training checkpoint's weights
    want = np.asarray(exported.edit_arrays(pixels, instructions, steps=3, seed=1))
    np.testing.assert_array_equal(got, want)
    unet_ema = restored.state["ema"]["unet"]["conv_in"]["kernel"]
    assert not np.array_equal(unet_ema, restored.state["params"]["unet"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(exported.params["unet"]["conv_in"]["kernel"], unet_ema)


def test_checkpoint_moves_between_meshes(runs, tiny, tmp_path):
    """A checkpoint saved on 2×2×2 restores on 8×1×1 and on one device; the next step's loss agrees.

    The step programs are test_sharding.py's (same config and batch shapes): with its
    entries in the persistent compilation cache nothing compiles here.
    """
    config = tiny.copy_and_resolve_references()
    rng = np.random.default_rng(0)
    batches = [{"source": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                "target": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                "input_ids": rng.integers(0, 514, (8, 77)).astype(np.int32)} for _ in range(2)]  # fmt: skip

    def trainer_on(shape, grad_accum):
        config.train.grad_accum = grad_accum  # 2 on 2×2×2: micro-batches of 4, one row per (data, fsdp) device
        mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), jax.devices()[: int(np.prod(shape))])
        trainer = Trainer.from_config(config, mesh=mesh)
        return trainer, ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)

    trainer, abstract = trainer_on((2, 2, 2), 2)
    full = ckpt_lib.Checkpoints(os.path.join(runs["full"][0], "checkpoints"), read_only=True)
    state = full.restore(STEPS, abstract).state  # the one-device run's checkpoint, onto 2×2×2
    full.close()
    state, _ = trainer.step(state, trainer.shard_batch(batches[0]))
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    checkpoints.save(STEPS + 1, state, config=config, force=True)
    checkpoints.wait()
    _, metrics = trainer.step(state, trainer.shard_batch(batches[1]))
    want = float(metrics["loss"])
    for shape in ((8, 1, 1), (1, 1, 1)):
        other, abstract = trainer_on(shape, 1)
        restored = checkpoints.restore(STEPS + 1, abstract)
        leaf = restored.state["params"]["unet"]["conv_in"]["kernel"]
        assert leaf.sharding.mesh.devices.shape == shape and int(restored.state["step"]) == STEPS + 1
        _, metrics = other.step(restored.state, other.shard_batch(batches[1]))
        assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), shape
    checkpoints.close()


def test_export_merges_lora_into_the_kernels(tmp_path):
    """A FireEdit training checkpoint (random weights, LoRA on the LLM) → export: no adapter
    leaves, W + (α/r)·A·B in their place, lora_rank 0 in the config, and Editor loads it."""
    from fireedit_jax.data.shapes import build_tokenizer
    from fireedit_jax.models.fireedit import EditModel

    config = run.run_defaults(run.load_config(os.path.join(ROOT, "configs", "tiny_fireedit.py")))
    model = EditModel.from_config(config.model)
    rng = np.random.default_rng(0)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    state = {"step": np.int32(5), "skipped": np.int32(0), "consecutive_skips": np.int32(0), "params": params,
             "opt_state": {}}  # fmt: skip
    tokenizer_dir = str(tmp_path / "tokenizer")
    build_tokenizer().save_pretrained(tokenizer_dir)
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "run" / "checkpoints"))
    checkpoints.save(5, state, config=config, tokenizer_dir=tokenizer_dir, force=True)
    checkpoints.close()
    out = str(tmp_path / "export")
    assert ckpt_lib.export(str(tmp_path / "run"), out) == 5
    editor = Editor.from_pretrained(out)
    assert editor.config.model.llm.lora_rank == 0
    q_proj = params["vlm"]["llm"]["layers"]["q_proj"]
    merged = editor.params["vlm"]["llm"]["layers"]["q_proj"]
    assert set(merged) == {"kernel"} and {"lora_a", "lora_b"} <= set(q_proj)
    scale = config.model.llm.lora_alpha / config.model.llm.lora_rank
    want = q_proj["kernel"] + scale * np.einsum("lir,lro->lio", q_proj["lora_a"], q_proj["lora_b"])
    np.testing.assert_allclose(merged["kernel"], want, rtol=1e-5, atol=1e-5)
