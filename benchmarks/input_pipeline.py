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
from fireedit_jax.data.sources import instructpix2pix_source
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
    args = parser.parse_args()
    print("$ " + " ".join([os.path.relpath(sys.executable)] + sys.argv))
    tfds.disable_progress_bar()

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


if __name__ == "__main__":
    main()
