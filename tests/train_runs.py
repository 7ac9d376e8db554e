"""The subprocess training runs that tests/test_train_run.py and tests/test_storage.py share.

Runs of configs/tiny.py (ShapeEdit made on the fly, 16 px, batch 8) in subprocesses of
one device each, sharing the tests' persistent compilation cache; `runs` (session-scoped,
registered in conftest.py) holds:
  full      8 steps uninterrupted, checkpoints every 2, a sample grid at step 8
  killed    the same command, SIGKILLed once a checkpoint exists; then resumed
  sigterm   SIGTERM after the first step: a final checkpoint and exit code 0
A workdir may be gs:// (the storage emulator's): the helpers read it through storage.py.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import pytest

from fireedit_jax import storage
from fireedit_jax.train import checkpoints as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.checkpoint.every=2", "--config.logging.every=1",
             "--config.resolution=16", f"--config.logging.sample_every={STEPS}", "--config.logging.sample_count=2",
             "--config.logging.sample_steps=2"]  # fmt: skip


def env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))  # fmt: skip
    return env


def start(workdir: str, *extra: str, log: str | None = None) -> subprocess.Popen:
    """`fireedit-jax train` of configs/tiny.py in a subprocess (this checkout's fireedit_jax);
    its output goes to `log` (default WORKDIR.log)."""
    command = [sys.executable, "-m", "fireedit_jax.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
               "--workdir", workdir, "--no-progress", *OVERRIDES, *extra]  # fmt: skip
    with open(log or f"{workdir}.log", "a") as out:
        return subprocess.Popen(command, env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: str) -> str:
    """Waits for the run; its output (`log`: the file `start` wrote to, or its workdir)."""
    process.wait(timeout=900)
    with open(log if log.endswith(".log") else f"{log}.log") as out:
        return out.read()


def logged(workdir: str) -> list[dict]:
    path = storage.as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{"full", "killed", "sigterm"}: the subprocess runs (concurrent: each pays JAX's start-up
    and tracing, which the two cores share better than one process alone)."""
    base = tmp_path_factory.mktemp("runs")
    full, killed, sigterm = (str(base / name) for name in ("full", "killed", "sigterm"))
    first = start(full)
    to_kill = start(killed, "--config.logging.sample_every=0")
    to_stop = start(sigterm, "--config.logging.sample_every=0", "--config.checkpoint.every=100")
    # SIGTERM after the first step; SIGKILL as soon as a checkpoint is complete (renamed from
    # its temporary directory); whichever comes first
    logged_before, resumed, stopping = None, None, False
    while resumed is None or to_stop.poll() is None:
        if not stopping and logged(sigterm):
            to_stop.send_signal(signal.SIGTERM)
            stopping = True
        if resumed is None and ckpt_lib.find_training_checkpoint(killed) is not None:
            to_kill.send_signal(signal.SIGKILL)
            to_kill.wait()
            assert to_kill.returncode == -signal.SIGKILL
            logged_before = len(logged(killed))
            resumed = start(killed, "--config.logging.sample_every=0")
        if to_kill.poll() not in (None, -signal.SIGKILL) or (to_stop.poll() is not None and not stopping):
            raise AssertionError(f"a run ended early:\n{finish(to_kill, killed)}\n{finish(to_stop, sigterm)}")
        time.sleep(0.02)
    out_sigterm = finish(to_stop, sigterm)
    out_full, out_resumed = finish(first, full), finish(resumed, killed)
    assert first.returncode == 0, out_full
    assert resumed.returncode == 0, out_resumed
    return {"full": (full, out_full), "killed": (killed, logged_before),
            "sigterm": (sigterm, to_stop.returncode, out_sigterm)}  # fmt: skip


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of tensorboard event files (TFRecords of Event protos), parsed by hand."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, []
    for path in storage.as_path(directory).glob("events.out.tfevents.*"):
        data = path.read_bytes()
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
