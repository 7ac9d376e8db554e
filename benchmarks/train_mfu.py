"""The SD1.5 IP2P train step's model FLOP utilisation, from a run started as launch/gpu_single.sh starts one.

    python benchmarks/train_mfu.py [--small] [--steps 40] [--batch 64] [--workers N]   # benchmarks/gpu.sh runs it

Runs `launch/gpu_single.sh --config benchmarks/train_mfu.py[:small] --workdir TMP ...` (with
PYTHON=this interpreter, so nothing is installed), then reads the run's metrics.jsonl: the
step time of every logged interval after the first (which holds the compilation), examples/s,
model TFLOP/s per device (train/flops.py's count for the run's own config) and MFU against the
device's dense bfloat16 peak (PEAK_TFLOPS; "n/a" for a device not in the table, e.g. the CPU).

The config (`get_config` below, so the run reads it as any config file): configs/ip2p_sd15.py
as it is (SD1.5 UNet, 860M, remat, bfloat16 compute, EMA, AdamW, from pixels: the VAE encoder
runs in the step) at 256 px, one device, --batch examples per step in one micro-batch, on
ShapeEdit scenes made on the fly (no data files, no network): drawn at 64 px and resized to
256 by the transform, since drawing and PNG-coding a 256 px scene costs ~20 ms of a CPU core,
which would make the step wait for its data. The tokenizer is the built-in character-level
CLIP one (the text encoder's 77 positions either way). `:small` is configs/tiny.py (the test
model, 32 px, float32) with the same data, for the CPU check (benchmarks/gpu.sh --small).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense (no sparsity) bfloat16 tensor-core peaks, TFLOP/s, by jax's device_kind.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100": 989.4, "NVIDIA H200": 989.4,
               "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0}  # fmt: skip


def get_config(arg: str = ""):
    """configs/ip2p_sd15.py at 256 px on ShapeEdit scenes (arg "small": configs/tiny.py, 32 px)."""
    import ml_collections

    from fireedit_jax.train.run import load_config

    small = arg == "small"
    config = load_config(os.path.join(ROOT, "configs", "tiny.py" if small else "ip2p_sd15.py"))
    config.resolution = 32 if small else 256
    shapes = dict(kind="shapes", split="train", num_samples=100_000, size=min(64, int(config.resolution)))
    config.data = ml_collections.ConfigDict(dict(
        sources={"shapes": shapes}, tokenizer="builtin:clip_chars", num_workers=0,
    ))  # fmt: skip
    train = config.train
    # bfloat16 (the GPU run's) makes XLA:CPU compile the tiny step for minutes: the CPU check keeps float32
    train.update(batch_size=4 if small else 64, grad_accum=1, steps=4 if small else 40,
                 dtype="float32" if small else "bfloat16")
    config.checkpoint = ml_collections.ConfigDict(dict(every=10**9, keep=1))  # the run saves once, at its end
    config.logging = ml_collections.ConfigDict(dict(every=2 if small else 10, sample_every=0, sample_count=0,
                                                    sample_steps=0))  # fmt: skip
    return config


def device_kind(python: str) -> str:
    """jax's device_kind of the first device, in a process of its own (this one must not hold the GPU)."""
    code = "import jax; print(jax.devices()[0].device_kind)"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the tiny model on the CPU (benchmarks/gpu.sh --small)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 40; 4 with --small)")
    parser.add_argument("--batch", type=int, help="examples per step (default 64; 4 with --small)")
    parser.add_argument("--every", type=int, help="steps per logged interval (default 10; 2 with --small)")
    parser.add_argument("--workers", type=int, default=max(0, min(14, (os.cpu_count() or 1) - 2)),
                        help="grain worker processes drawing the scenes (default: the cores but two, at most 14)")
    parser.add_argument("--workdir", help="the run's workdir (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    overrides = [f"--config.data.num_workers={args.workers}"]
    for name, value in (("train.steps", args.steps), ("train.batch_size", args.batch), ("logging.every", args.every)):
        if value is not None:
            overrides.append(f"--config.{name}={value}")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or os.path.join(scratch, "run")
        command = ["bash", os.path.join(ROOT, "launch", "gpu_single.sh"),
                   "--config", os.path.join(ROOT, "benchmarks", "train_mfu.py") + (":small" if args.small else ""),
                   "--workdir", workdir, "--no-progress", *overrides]  # fmt: skip
        print("$ PYTHON=" + shlex.quote(sys.executable) + " " + shlex.join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "PYTHON": sys.executable})
        with open(os.path.join(workdir, "metrics.jsonl")) as lines:
            logged = [json.loads(line) for line in lines]
    timed = [entry for entry in logged if "step_time" in entry]
    if not timed:
        raise SystemExit("the run logged no timed interval: give more --steps than two logging intervals")
    kind = device_kind(sys.executable)
    peak = PEAK_TFLOPS.get(kind)
    seconds = statistics.median(entry["step_time"] for entry in timed)
    tflops = statistics.median(entry.get("tflops_per_device", float("nan")) for entry in timed)
    batch = timed[0]["examples_per_second"] * timed[0]["step_time"]
    model, dtype = ("tiny (configs/tiny.py)", "float32") if args.small else ("SD1.5 (configs/ip2p_sd15.py)", "bfloat16")
    print(f"IP2P train step, {model}, {dtype}, batch {batch:.0f}, one {kind}: median of {len(timed)} logged "
          f"intervals (steps {', '.join(str(entry['step']) for entry in timed)})")  # fmt: skip
    print(f"  step {seconds * 1e3:.1f} ms   {batch / seconds:.1f} examples/s   {tflops:.2f} model TFLOP/s per device   "
          f"MFU {f'{tflops / peak:.1%} of {peak:g}' if peak else 'n/a (no peak known for this device)'}")
    times = ", ".join(f"{entry['step_time'] * 1e3:.1f}" for entry in timed)
    print(f"  step times {times} ms")


if __name__ == "__main__":
    main()
