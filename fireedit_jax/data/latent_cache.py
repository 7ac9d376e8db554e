"""Precomputed VAE latents of edit triplets: write once, train without the VAE encoder.

    fireedit-jax cache-latents --checkpoint CKPT --source instructpix2pix --data /data/ip2p \\
        --out /data/ip2p_latents [--resolution 256] [--batch-size 64] [--workers 2]

reads every record of a source (sources.open_source), crops it as evaluation does (the
centred square at the resolution, no flip: a latent cannot be flipped exactly), encodes
source and target with the checkpoint's VAE (jitted, the batch split over the local
devices) and writes a TFDS ArrayRecord data set (built without TensorFlow, as
tfds_builder.py). Per record it stores what the IP2P loss needs (models/fireedit.py
`LATENT_FIELDS`): the source's posterior mode, the image condition, and the target's
posterior mean and log-variance, from which the loss draws a fresh sample each step.
Texts, task and the boxes (on the crop) are kept as they are; tokenisation happens when
reading, so one cache serves any tokenizer. The source image's file bytes are kept too:
FireEdit's VLM reads the source pixels (the same centred crop, made when reading).
Records that cannot be decoded are skipped and counted, as in training (pipeline.py).

The command runs on one host (its local devices); the cache is read by every host.
--out may be gs://: the data set is built in a local temporary directory, then uploaded
(ArrayRecord writes local files only); reading one from a bucket copies it once per host
into a local cache (storage.local_copy).

Train from it with a source of kind "latents" in config.data.sources (train/inputs.py), or
read it back as a pipeline source, with `LatentTransform` in place of the pixel transform:

    source = LatentSource("/data/ip2p_latents/latent_triplets/1.1.0")
    iterator = make_iterator([source], LatentTransform(EditTransform(texts=...)), batch_size=64)

Its batches carry `LATENT_FIELDS` (float32[B, h, w, C]) instead of "source" / "target",
and the losses then skip the VAE. Storage is float32: 3·h·w·C·4 bytes per record
(192 KiB at 512 px, 48 KiB at 256 px, for SD's 4 latent channels), plus the source file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from fireedit_jax import checkpoint, storage
from fireedit_jax.data.pipeline import DataError, make_iterator
from fireedit_jax.data.records import BadRecord, EditRecord, Task
from fireedit_jax.data.sources import CAPTION_KINDS, SOURCE_KINDS, SchemaError, open_source
from fireedit_jax.data.tfds_builder import decode_texts, encode_texts, image_bytes, split_source, text_features
from fireedit_jax.data.transforms import EditTransform, crop_resize, crop_window, decode_image
from fireedit_jax.models.fireedit import LATENT_FIELDS, EditModel, encode_latents

_NO_BOX_LIMIT = 1 << 30  # the cache keeps every box; the reading transform cuts to its buckets


class LatentTriplets(tfds.core.GeneratorBasedBuilder):
    """Edit triplets as VAE latents (`LATENT_FIELDS`) with their texts, boxes, task and source image."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "the source image's file bytes (FireEdit's VLM reads them)"}

    def __init__(self, *, latent_shape: Sequence[int] = (), metadata: dict | None = None, splits=None, **kwargs):
        self._latent_shape = tuple(latent_shape)
        self._metadata = metadata or {}
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self):
        features = text_features()
        latent = tfds.features.Tensor(shape=self._latent_shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
        features.update({name: latent for name in LATENT_FIELDS})
        features.update(
            index=tfds.features.Tensor(shape=(), dtype=np.int64),
            boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            has_boxes=tfds.features.Tensor(shape=(), dtype=np.bool_),
            task=tfds.features.Tensor(shape=(), dtype=np.int32),
            source_image=tfds.features.Tensor(shape=(), dtype=np.object_),
        )
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # kept in source order (the pipeline shuffles when reading)
        )  # fmt: skip

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(examples) for split, examples in self._splits.items()}

    def _generate_examples(self, examples):
        yield from examples

    # `cache_latents` reports what it wrote: no TFDS download messages on stdout
    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass


@dataclasses.dataclass(frozen=True)
class _CropAndKeep:
    """The writer's pipeline transform: both images at the centred crop (uint8), and the
    record's other fields as they are (boxes on the crop)."""

    pixels: EditTransform

    def __call__(self, record: EditRecord, rng=None):
        if record.task == Task.CAPTION:
            raise BadRecord(f"{record.key}: a caption record has no target image to encode")
        example, _ = self.pixels(record)  # no rng: centred crop, no flip
        kept = encode_texts(record)
        kept.update(boxes=example["boxes"], has_boxes=record.boxes is not None, task=int(record.task),
                    source_image=image_bytes(record.source_image))  # fmt: skip
        return {"source": example["source"], "target": example["target"], "kept": kept}, ()

    @staticmethod
    def collate(examples: Sequence[dict]) -> dict:
        batch = {key: np.stack([e[key] for e in examples]) for key in ("source", "target", "record_index")}
        batch["kept"] = [e["kept"] for e in examples]
        return batch


def _encoder(model: EditModel):
    """The jitted (params, source uint8[B, S, S, 3], target uint8[...]) → `LATENT_FIELDS`
    float32[B, h, w, C], the batch (a multiple of the local devices) split over them."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))
    rows = NamedSharding(mesh, PartitionSpec("batch"))

    def encode(params, source, target):
        to_float = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
        return encode_latents(model, params, to_float(source), to_float(target))

    return jax.jit(encode, in_shardings=(NamedSharding(mesh, PartitionSpec()), rows, rows), out_shardings=rows)


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    """[n, ...] → [rows, ...] with zero rows (the last batch, so the encoder does not recompile)."""
    return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


def cache_latents(
    source,
    checkpoint_dir: str,
    out_dir: str,
    *,
    split: str = "train",
    resolution: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    max_skip_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[str, dict[str, int]]:
    """Encodes every record of `source` with the checkpoint's VAE into a `LatentTriplets`
    data set under `out_dir` (split `split`).

    resolution: side of the square crops (default: the checkpoint config's `resolution`);
    a multiple of the VAE's downsampling factor. batch_size: rounded up to a multiple of
    the local devices. Returns the data set's directory (for `LatentSource`) and the
    pipeline's counts ({"written", "skipped"}).
    """
    config = checkpoint.load_config(checkpoint_dir)
    model = EditModel.from_config(config.model)
    factor, vae = model.latent_factor, model.vae.config
    resolution = int(resolution or config.get("resolution") or 0)
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"the resolution must be a positive multiple of the VAE's factor {factor}, got {resolution or 'none'} "
            f"(pass --resolution; {checkpoint_dir!r}'s config.json has no usable `resolution`)"
        )
    latent_shape = (resolution // factor, resolution // factor, vae.latent_channels)
    metadata = dict(
        resolution=resolution, latent_shape=list(latent_shape), vae=dataclasses.asdict(vae),
        checkpoint=os.fspath(storage.as_path(checkpoint_dir)), source=source.name, source_records=len(source),
    )  # fmt: skip
    path = storage.check_writable(out_dir, "--out") / LatentTriplets.name / str(LatentTriplets.VERSION)
    if path.exists():
        if not overwrite:
            raise ValueError(f"{os.fspath(path)!r} already holds a latent cache: pass --overwrite to replace it")
        path.rmtree()

    params = checkpoint.load_params(checkpoint_dir, jax.eval_shape(model.init, jax.random.key(0)), only=("vae",))
    devices = jax.local_device_count()
    batch_size = -(-batch_size // devices) * devices
    encode = _encoder(model)
    iterator = make_iterator(
        [source], _CropAndKeep(EditTransform(resolution, box_buckets=(_NO_BOX_LIMIT,))), batch_size=batch_size,
        num_epochs=1, shard=grain.sharding.NoSharding(), shuffle=False, augment=False, num_workers=num_workers,
        max_skip_fraction=max_skip_fraction, drop_remainder=False,
    )  # fmt: skip
    counts = {"written": 0, "skipped": 0}

    def emit(batch, latents):
        latents = jax.device_get(latents)
        for i, kept in enumerate(batch["kept"]):
            index = int(batch["record_index"][i])
            counts["written"] += 1
            yield index, dict(kept, index=index, **{name: latents[name][i] for name in LATENT_FIELDS})

    def examples() -> Iterator[tuple[int, dict]]:
        bar = tqdm(total=len(source), unit="record", desc=f"cache-latents {source.name}", disable=not progress)
        pending = None  # the previous batch: its encoding runs while the next one is read
        for batch in iterator:
            latents = encode(params, _pad(batch["source"], batch_size), _pad(batch["target"], batch_size))
            if pending is not None:
                yield from emit(*pending)
            pending = (batch, latents)
            bar.update(iterator.metrics()[f"data/read/{source.name}"] - bar.n)
        if pending is not None:
            yield from emit(*pending)
        bar.close()
        counts["skipped"] = iterator.metrics()[f"data/skipped/{source.name}"]

    try:
        with storage.staged(out_dir) as local:
            LatentTriplets(splits={split: examples()}, latent_shape=latent_shape, metadata=metadata, data_dir=local,
                           file_format="array_record").download_and_prepare()  # fmt: skip
    finally:
        iterator.close()
    return os.fspath(path), counts


class LatentSource:
    """Records of a `cache_latents` data set, for the pipeline with `LatentTransform`.

    A record is a dict: the `LATENT_FIELDS` (float32[h, w, C]), "boxes" float32[N, 4] (on
    the crop) or None, "task" (records.Task), "index" (the record's index in the cached
    source) and the texts "key", "instruction", "answer", "source_caption",
    "target_caption" (None where absent), and "source_image" (the file's bytes; caches from
    before version 1.1.0 lack it: `has_source_images`). A VQA record's target latents
    encode a blank image (its diffusion weight is 0). `metadata`: resolution, latent_shape,
    vae (its config), checkpoint, source, source_records. A cache in a bucket is read from a
    local copy (storage.local_copy).
    """

    def __init__(self, directory: str, split: str = "train", *, name: str | None = None):
        self.name = name or f"latents_{split}"
        builder = tfds.builder_from_directory(storage.local_copy(directory, cache=True))
        missing = [field for field in LATENT_FIELDS if field not in builder.info.features]
        if missing:
            raise SchemaError(f"{directory!r} is not a latent cache (`fireedit-jax cache-latents`): no {', '.join(missing)}")
        self.metadata = dict(builder.info.metadata)
        self.has_source_images = "source_image" in builder.info.features
        self._data = split_source(builder, directory, split)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        example = self._data[index]
        record = decode_texts(example)
        record.update({name: example[name] for name in LATENT_FIELDS})
        record.update(
            boxes=example["boxes"] if example["has_boxes"] else None, task=Task(int(example["task"])),
            index=int(example["index"]), source_image=example["source_image"] if self.has_source_images else None,
        )  # fmt: skip
        return record

    def __repr__(self) -> str:
        return f"LatentSource({self.name!r}, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class LatentTransform:
    """The pipeline transform for `LatentSource` records: the latents as they are, the
    texts, boxes, task and loss weights as `edit` (an EditTransform: its texts and box
    buckets) makes them, and `edit`'s collation. With `source_pixels`, also "source" (and
    "vlm_source" if `edit` has a vlm_resolution): the source image's centred crop at
    `edit`'s resolution, the crop the latents were made from. No augmentation: the cache
    holds the centred crop."""

    edit: EditTransform
    source_pixels: bool = False

    def __call__(self, record: dict, rng=None) -> tuple[dict, tuple[str, ...]]:
        example = {name: record[name] for name in LATENT_FIELDS}
        if self.source_pixels:
            sides = [side for side in (self.edit.resolution, self.edit.vlm_resolution) if side]
            source = decode_image(record["source_image"], f"{record['key']}: source image", max(sides))
            window = crop_window(*source.size)
            example["source"] = crop_resize(source, window, self.edit.resolution)
            if self.edit.vlm_resolution:
                example["vlm_source"] = crop_resize(source, window, self.edit.vlm_resolution)
        boxes = record["boxes"] if record["boxes"] is not None else np.zeros((0, 4), np.float32)
        texts = {field.source: record[field.source] for field in self.edit.texts}
        return self.edit.finish(example, boxes, texts, record["task"])

    def collate(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        return self.edit.collate(examples)

    def pad_values(self) -> dict[str, int]:
        return self.edit.pad_values()


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cache-latents` sub-command's arguments."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory whose VAE encodes")
    parser.add_argument("--source", required=True, choices=[k for k in SOURCE_KINDS if k not in CAPTION_KINDS],
                        help="the data set's layout (caption layouts have no target to encode)")
    parser.add_argument("--data", required=True,
                        help="its path: parquet directory/glob/file, JSONL folder, LLaVA JSON or TFDS directory")
    parser.add_argument("--image-root", default=None, help="folder of a llava source's images")
    parser.add_argument("--split", default="train", help="the split read (tfds) and written (default train)")
    parser.add_argument("--out", required=True, help="directory to write the cache under (one split per directory)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="side of the centred square crops (default: the checkpoint config's resolution)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes decoding images (default 0)")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01,
                        help="stop if more than this fraction of the records cannot be decoded (default 0.01)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")


def run(args: argparse.Namespace) -> int:
    source = open_source(args.source, args.data, split=args.split, image_root=args.image_root)
    tfds.disable_progress_bar()  # ours counts records
    try:
        path, counts = cache_latents(
            source, args.checkpoint, args.out, split=args.split, resolution=args.resolution,
            batch_size=args.batch_size, num_workers=args.workers, max_skip_fraction=args.max_skip_fraction,
            overwrite=args.overwrite,
        )  # fmt: skip
    except DataError as error:  # too many undecodable records: nothing is written
        print(f"fireedit-jax cache-latents: error: {error}", file=sys.stderr)
        return 2
    skipped = f", skipped {counts['skipped']} that could not be decoded" if counts["skipped"] else ""
    print(f"wrote the latents of {counts['written']} of {len(source)} records to {path}{skipped}")
    print(f"read them with data.latent_cache.LatentSource({path!r}, {args.split!r}) and LatentTransform")
    return 0
