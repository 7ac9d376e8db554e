"""Two processes on loopback (`jax.distributed.initialize`, gloo CPU collectives) train the
micro config on a data=1 × fsdp=2 mesh, one device each, each feeding its half of the
global batch; they must agree with the same mesh in one process.

Run as a script, this file is one of the two workers: `python test_multiprocess.py ID PORT OUT`.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from micro import micro_config

MESH = "data=1,fsdp=2,tensor=1"
STEPS, BATCH = 3, 8
WORKER_TIMEOUT = 900  # seconds


def global_batch(step: int, config) -> dict:
    rng = np.random.default_rng(step)
    size, vocab = int(config.resolution), int(config.model.text_encoder.vocab_size)
    pixels = lambda: rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)  # noqa: E731
    return {"source": pixels(), "target": pixels(), "input_ids": rng.integers(0, vocab, (BATCH, 77), dtype=np.int32)}


def train(devices, rows: slice) -> tuple[np.ndarray, dict]:
    """STEPS steps over `devices`, this process feeding `rows` of each global batch →
    (loss and gradient norm per step, params gathered to the host)."""
    from fireedit_jax.train import mesh as mesh_lib
    from fireedit_jax.train.step import Trainer

    config = micro_config(MESH)
    trainer = Trainer.from_config(config, mesh=mesh_lib.make_mesh(config.mesh, devices))
    state, losses = trainer.init_state(), []
    for step in range(STEPS):
        local = {k: v[rows] for k, v in global_batch(step, config).items()}
        state, metrics = trainer.step(state, trainer.shard_batch(local))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    return np.asarray(losses), jax.tree.map(np.asarray, params)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    port, env = free_port(), dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    workers = [
        subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / f"out{i}.npz")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for i in range(2)
    ]
    losses, params = train(jax.devices()[:2], slice(None))  # meanwhile: one process, 2 devices
    for worker in workers:
        out, _ = worker.communicate(timeout=WORKER_TIMEOUT)
        assert worker.returncode == 0, out[-3000:]
    for i in range(2):
        result = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_allclose(result["losses"], losses, rtol=1e-5, atol=1e-6)
        reference = flat(params)
        assert sorted(k for k in result.files if k != "losses") == sorted(reference)
        for key, value in reference.items():
            np.testing.assert_allclose(result[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert losses[-1, 0] != losses[0, 0]  # the steps did change the params


def worker(process_id: int, port: int, out: str) -> None:
    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("FIREEDIT_JAX_CACHE", cache))  # as conftest
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # a worker can lag minutes behind its peer on a loaded CPU: wait as long as the test does
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=WORKER_TIMEOUT, shutdown_timeout_seconds=WORKER_TIMEOUT)
    # gloo gives a peer 30 s to join the first collective: meet while both are still in step
    multihost_utils.sync_global_devices("initialized")
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    half = BATCH // 2
    losses, params = train(jax.devices(), slice(process_id * half, (process_id + 1) * half))
    np.savez(out, losses=losses, **flat(params))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
