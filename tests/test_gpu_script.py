"""benchmarks/gpu.sh, the GPU benchmark command, runs every piece at the test model's sizes on the CPU
(--small), so that the command a GPU machine gets cannot rot: the edit against diffusers, the train
step's MFU through launch/gpu_single.sh, the grounded edit's overhead."""

import os
import re
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_small_runs_every_piece(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the GPU run has one GPU
    env.update(PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")  # fmt: skip
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--small", "--out", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-2000:]
    assert "installing" not in out  # the tests' interpreter has every module: nothing to install
    assert re.search(r"^  ours \(jitted lax.scan loop\) +median wall +[0-9.]+ s", out, re.M)
    assert re.search(r"^  diffusers pipeline +median wall +[0-9.]+ s", out, re.M) and "ratio ours / theirs" in out
    assert re.search(r"^IP2P train step, tiny .*\n  step [0-9.]+ ms .* model TFLOP/s per device +MFU n/a", out, re.M)
    for name in ("plain", "grounded", "diffedit"):
        assert re.search(rf"^  {name} +[0-9.]+ s +[0-9.]+× plain", out, re.M)
    assert sorted(os.listdir(tmp_path)) == ["edit.log", "grounded.log", "train.log"]
