"""`fireedit-jax train` from a latent cache against the pixel pipeline: one config, one run.

    .venv/bin/python benchmarks/latent_training.py --config configs/tiny.py [--rows 256] [--size 128]
        [--steps 30] [--rounds 2] [--config.path=value ...]

Writes a synthetic InstructPix2Pix-layout parquet (benchmarks/input_pipeline.py's JPEG pairs),
caches its latents with the config's (random) VAE (`cache_latents`), then trains the same
config through `train_and_evaluate` from `config.data.sources` = the parquet (kind
instructpix2pix: decode, random crop, flip, VAE encoder in the step) or the cache (kind
latents: no decoding, no encoder), alternating, `--rounds` times each. Reported: the median
of the run's own logged step_time (data, step and the host's wait for the loss; the first
interval, which compiles, excluded) as steps/s and examples/s, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from input_pipeline import write_parquet  # noqa: E402


def main() -> None:
    from fireedit_jax.train import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run.add_config_argument(parser, "configs/X.py (e.g. configs/tiny.py); --config.path=value overrides")
    parser.add_argument("--rows", type=int, default=256, help="edit pairs written")
    parser.add_argument("--size", type=int, default=128, help="side of the JPEGs written")
    parser.add_argument("--steps", type=int, default=30, help="steps per training run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, alternating")
    args = parser.parse_args(sys.argv[1:])  # explicit: add_config_argument takes the overrides out of them
    print("$ " + " ".join([os.path.relpath(sys.executable)] + sys.argv))

    import flax
    import jax
    import tensorflow_datasets as tfds

    from fireedit_jax import checkpoint
    from fireedit_jax.data.latent_cache import cache_latents
    from fireedit_jax.data.parquet_source import instructpix2pix_source
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train import flops

    tfds.disable_progress_bar()
    config = run.apply_overrides(run.run_defaults(run.load_config(args.config)), args.overrides)
    config.train.steps, config.logging.every, config.logging.sample_every = args.steps, 1, 0
    config.checkpoint.every = 10 * args.steps  # one save, at the end
    with tempfile.TemporaryDirectory() as root:
        parquet = os.path.join(root, "ip2p")
        os.makedirs(parquet)
        write_parquet(os.path.join(parquet, "train-00000-of-00001.parquet"), args.rows, args.size)
        model = EditModel.from_config(config.model)
        params = flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0)))
        checkpoint.save(os.path.join(root, "ckpt"), params, config)
        start = time.perf_counter()
        cache, _ = cache_latents(instructpix2pix_source(parquet), os.path.join(root, "ckpt"),
                                 os.path.join(root, "latents"), progress=False)  # fmt: skip
        print(f"cache-latents: {args.rows} records in {time.perf_counter() - start:.1f} s (compile included)")
        sources = {"pixels": {"kind": "instructpix2pix", "path": parquet}, "latents": {"kind": "latents", "path": cache}}
        batch = int(config.train.batch_size)
        print(f"{args.config}: resolution {config.resolution}, batch {batch}, VAE "
              f"{tuple(config.model.vae.block_out_channels)}, {jax.device_count()} {jax.default_backend()} device(s), "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        for kind, spec in sources.items():
            config.data.sources = {kind: spec}
            gflop = flops.train_flops_per_example(config) / 1e9
            print(f"  {kind}: model train GFLOP per example {gflop:.2f}")
        times = {kind: [] for kind in sources}
        for round_ in range(args.rounds):
            for kind, spec in sources.items():
                config.data.sources = {kind: spec}
                workdir = os.path.join(root, f"run_{kind}_{round_}")
                start = time.perf_counter()
                run.train_and_evaluate(config, workdir, progress=False)
                wall = time.perf_counter() - start
                logged = [line["step_time"] for line in run_lines(workdir) if "step_time" in line]
                times[kind].append(statistics.median(logged))
                print(f"  round {round_ + 1}, {kind:7s}: median step {times[kind][-1]:.3f} s over {len(logged)} steps "
                      f"(run {wall:.1f} s with compilation; load {os.getloadavg()[0]:.1f})")  # fmt: skip
        for kind, seconds in times.items():
            step = statistics.median(seconds)
            print(f"{kind:8s} {1 / step:7.3f} steps/s  {batch / step:8.2f} examples/s  (median of {seconds})")
        ratio = statistics.median(times["pixels"]) / statistics.median(times["latents"])
        print(f"latents / pixels: {ratio:.2f}x the steps per second")


def run_lines(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    main()
