"""Examples per second of the whole input pipeline (read, JPEG decode, crop, flip,
tokenise, batch) on this machine, by storage format and number of grain worker processes.

    .venv/bin/python benchmarks/input_pipeline.py [--rows 512] [--size 256] [--resolution 256]
        [--batch-size 32] [--batches 24] [--workers 0 1 2]

Writes a synthetic InstructPix2Pix-layout parquet (JPEG source/target pairs, image
structs {bytes, path}, row groups of 100) to a temporary directory and the same records
as ArrayRecord (tfds_builder.build_triplets), then times `make_iterator` over each with
shuffling and augmentation on, after one warm-up batch (whose time, worker start-up
included, is printed apart). The first line is the per-example transform alone in this
process (records already read, no grain), for reference.

With --step CONFIG, instead: the input pipeline next to the train step of that config
(configs/tiny.py: the tiny IP2P model, resolution 64, batch 8), with and without a latent
cache, all in one run:

    .venv/bin/python benchmarks/input_pipeline.py --step configs/tiny.py [--rows 512] [--steps 5]

  pipeline, pixels    make_iterator over the parquet: read, JPEG decode, crop, flip, CLIP ids
  pipeline, latents   make_iterator over a cache of the same rows (cache_latents with the
                      model's random VAE): read latents, CLIP ids
  step, pixels        Trainer.step on one pipeline batch (VAE encode + UNet forward/backward)
  step, latents       Trainer.step on one cached batch (no VAE)
  loop, pixels/latents  pipeline (in this process) → float32 → shard_batch → step, waiting for
                      each step's loss as train/run.py's skip check does

All in examples/s (steps after one compiling step; pipelines after one warm-up batch).
The pipeline keeps up when its rate exceeds the step's and the loop matches the step.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image

from fireedit_jax.data.pipeline import make_iterator
from fireedit_jax.data.parquet_source import instructpix2pix_source
from fireedit_jax.data.tfds_builder import TFDSSource, build_triplets
from fireedit_jax.data.transforms import EditTransform, TextField

WORDS = "make the left right cup red blue a photo of turn sky into night add hat".split()


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    # smooth colour fields plus noise: compresses like a photo, not like pure noise
    low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_parquet(path: str, rows: int, size: int) -> float:
    """Returns the mean JPEG size in KiB."""
    rng = np.random.default_rng(0)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("original_prompt", pa.string()), ("original_image", image), ("edit_prompt", pa.string()),
         ("edited_prompt", pa.string()), ("edited_image", image)]
    )  # fmt: skip
    records = []
    for i in range(rows):
        words = " ".join(rng.choice(WORDS, 8))
        records.append(
            {
                "original_prompt": f"a photo of {words}",
                "original_image": {"bytes": _jpeg(rng, size), "path": f"{i}_0.jpg"},
                "edit_prompt": f"make the left {words}",
                "edited_prompt": f"a photo of {words} red",
                "edited_image": {"bytes": _jpeg(rng, size), "path": f"{i}_1.jpg"},
            }
        )
    pq.write_table(pa.Table.from_pylist(records, schema), path, row_group_size=100)
    return np.mean([len(r["original_image"]["bytes"]) for r in records]) / 1024


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the JPEGs written")
    parser.add_argument("--resolution", type=int, default=256, help="side of the training crops")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=16, help="reading threads per process")
    parser.add_argument("--step", metavar="CONFIG", default=None,
                        help="compare with the train step of this config (e.g. configs/tiny.py)")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per setting (with --step)")
    args = parser.parse_args()
    print("$ " + " ".join([os.path.relpath(sys.executable)] + sys.argv))
    tfds.disable_progress_bar()
    if args.step:
        compare_with_step(args)
        return

    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "train-00000-of-00001.parquet")
        start = time.perf_counter()
        kib = write_parquet(path, args.rows, args.size)
        print(f"wrote {args.rows} rows of two {args.size}² JPEGs (mean {kib:.0f} KiB) in {time.perf_counter() - start:.1f} s")
        source = instructpix2pix_source(path)
        start = time.perf_counter()
        array_record = TFDSSource(build_triplets(os.path.join(root, "tfds"), {"train": source}), name="array_record")
        print(f"converted to ArrayRecord in {time.perf_counter() - start:.1f} s")
        texts = (TextField("instruction", _tokenizer(), (16, 32)),)
        transform = EditTransform(resolution=args.resolution, texts=texts)

        rng = np.random.default_rng(0)
        records = [source[i] for i in range(64)]
        start = time.perf_counter()
        for record in records:
            transform(record, rng)
        alone = len(records) / (time.perf_counter() - start)
        print(f"transform alone, in process: {alone:7.1f} examples/s")

        for data, workers in [(data, workers) for data in (source, array_record) for workers in args.workers]:
            iterator = make_iterator(
                [data], transform, batch_size=args.batch_size, seed=0,
                shard=grain.sharding.NoSharding(), num_workers=workers,
                read_options=grain.ReadOptions(num_threads=args.threads),
            )  # fmt: skip
            start = time.perf_counter()
            next(iterator)
            warm_up = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.batches):
                next(iterator)
            rate = args.batches * args.batch_size / (time.perf_counter() - start)
            iterator.close()
            print(
                f"{type(data).__name__:>13}, {workers} worker process(es): {rate:7.1f} examples/s "
                f"(first batch {warm_up:.1f} s, batch {args.batch_size}, {args.threads} threads, {os.cpu_count()} CPUs)"
            )


def _rate(batches, count: int, batch_size: int) -> tuple[float, float]:
    """(examples/s over `count` batches after the first, seconds of the first)."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start), first


def compare_with_step(args) -> None:
    import importlib.util

    import flax
    import jax

    from fireedit_jax import checkpoint
    from fireedit_jax.convert.reference import clip_tokenizer
    from fireedit_jax.data.latent_cache import LatentSource, LatentTransform, cache_latents
    from fireedit_jax.data.transforms import clip_text_field
    from fireedit_jax.models.fireedit import LATENT_FIELDS
    from fireedit_jax.train.step import Trainer

    spec = importlib.util.spec_from_file_location("step_config", args.step)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    trainer = Trainer.from_config(config)
    batch_size, resolution = int(config.train.batch_size), int(config.resolution)
    params = flax.linen.meta.unbox(jax.jit(trainer.model.init)(jax.random.key(0)))
    text = clip_text_field(clip_tokenizer(), name="input", source="instruction", length=trainer.model.max_text_length)
    pixels = EditTransform(resolution=resolution, texts=(text,))
    print(f"{args.step}: resolution {resolution}, batch {batch_size}, {trainer.trainable_count():,} trainable "
          f"params, {jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs")  # fmt: skip

    def step_inputs(batch) -> dict:
        """The pipeline's batch → the IP2P loss's (images to float32 in [-1, 1])."""
        keys = [*LATENT_FIELDS, "input_ids"] if LATENT_FIELDS[0] in batch else ["source", "target", "input_ids"]
        out = {key: batch[key] for key in keys}
        for key in ("source", "target"):
            if key in out:
                out[key] = out[key].astype(np.float32) / 127.5 - 1.0
        return out

    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "train-00000-of-00001.parquet")
        kib = write_parquet(path, args.rows, args.size)
        print(f"wrote {args.rows} rows of two {args.size}² JPEGs (mean {kib:.0f} KiB)")
        source = instructpix2pix_source(path)
        checkpoint.save(os.path.join(root, "ckpt"), params, config)
        start = time.perf_counter()
        cache, _ = cache_latents(source, os.path.join(root, "ckpt"), os.path.join(root, "latents"),
                                 batch_size=32, progress=False)  # fmt: skip
        print(f"cache-latents: {args.rows} records in {time.perf_counter() - start:.1f} s (compile included)")
        data = {"pixels": (source, pixels), "latents": (LatentSource(cache), LatentTransform(pixels))}

        def iterator(kind: str, workers: int):
            return make_iterator(
                [data[kind][0]], data[kind][1], batch_size=batch_size, seed=0, shard=grain.sharding.NoSharding(),
                num_workers=workers, read_options=grain.ReadOptions(num_threads=args.threads),
            )  # fmt: skip

        rates, notes = {}, {}
        for kind in ("pixels", "latents"):
            for workers in args.workers:
                batches = iterator(kind, workers)
                name = f"pipeline, {kind}, {workers} worker(s)"
                rates[name], first = _rate(batches, args.batches, batch_size)
                batches.close()
                notes[name] = f"first batch {first:.1f} s"

            batches = iterator(kind, 0)
            fixed = trainer.shard_batch(step_inputs(next(batches)))
            batches.close()
            state = trainer.init_state(params=params)

            def steps(batch_of):
                nonlocal state
                while True:
                    state, metrics = trainer.step(state, batch_of())
                    yield jax.block_until_ready(metrics["loss"])

            name = f"step, {kind} (one fixed batch)"
            rates[name], first = _rate(steps(lambda: fixed), args.steps, batch_size)
            notes[name] = f"{batch_size / rates[name]:.2f} s/step; first step {first:.1f} s (compile)"
            batches = iterator(kind, 0)  # decoding in the training process: it competes with the step
            name = f"loop, {kind}, 0 workers"
            rates[name], first = _rate(steps(lambda: trainer.shard_batch(step_inputs(next(batches)))), args.steps,
                                       batch_size)  # fmt: skip
            batches.close()
            notes[name] = f"{batch_size / rates[name]:.2f} s/step"
        for name, rate in rates.items():
            print(f"{name:34s} {rate:9.3g} examples/s   ({notes[name]})")
        for kind in ("pixels", "latents"):
            step = rates[f"step, {kind} (one fixed batch)"]
            best = max(rates[f"pipeline, {kind}, {workers} worker(s)"] for workers in args.workers)
            print(f"{kind}: pipeline / step {best / step:.0f}x, loop / step {rates[f'loop, {kind}, 0 workers'] / step:.2f}")
        print(f"step with cached latents / with pixels: "
              f"{rates['step, latents (one fixed batch)'] / rates['step, pixels (one fixed batch)']:.2f}x")

if __name__ == "__main__":
    main()
