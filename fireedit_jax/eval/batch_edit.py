"""Many edits at once: batches spread over all local devices, per-sample noise, resumable outputs.

`DeviceBatcher` is the engine the benchmark runners (eval/benchmarks.py) share with
the command line's batch modes here:

  edit_folder   every image of a folder, one instruction         → OUT/<stem>.png
  edit_jsonl    {"image": path, "instruction": str} per line      → OUT/<stem>.png
  edit_turns    one image, a list of instructions, each turn
                editing the previous turn's output                → OUT/<stem>_turn<k>.png

Data parallelism: the batch size is rounded up to a multiple of
`jax.local_device_count()`, each batch is placed on a 1-D mesh ("data") over the local
devices with the batch axis sharded, and the params are replicated on that mesh once;
the Editor's jitted encode / denoise / decode then run sharded (XLA propagates the
batch sharding). Images are grouped by working size (one compiled loop per size); a
last, partial batch is padded with copies so shapes never change.

Noise is drawn per sample from (seed, the sample's key), not per batch, so an output
does not depend on the batch size, the device count, its neighbours or on a resumed
run: re-running a benchmark reproduces the same images.

FireEdit's region boxes: a job may carry its own (a JSONL line's "boxes"); otherwise a
proposer (an offline Deformable DETR directory, data/proposals.py) is run once per batch
on the batch's inputs; with neither, no region tokens. IP2P checkpoints ignore boxes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from fireedit_jax import images
from fireedit_jax.diffusion.samplers import make_sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


Proposer = Callable[[list[Image.Image]], list[np.ndarray]]  # images → boxes float[R_i, 4] each


def detector_proposer(detector_dir: str | None) -> Proposer | None:
    """Region proposals from an offline Deformable DETR directory (data/proposals.py), or None."""
    if detector_dir is None:
        return None
    from fireedit_jax.data.proposals import propose

    return lambda batch: propose(detector_dir, batch)


class DatasetError(ValueError):
    """Input data of the wrong layout (missing files or fields); the message names what is missing."""


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """How every edit of a run is made (recorded with benchmark results)."""

    steps: int = 100
    image_guidance: float = 1.5
    text_guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None  # None: the checkpoint's sampler


@dataclasses.dataclass
class EditJob:
    """One edit. `key` names the sample: it seeds its noise and must be unique within a run."""

    key: str
    image: Image.Image  # RGB, any size
    instruction: str
    payload: Any = None  # handed back with the output (targets, captions, …)
    boxes: np.ndarray | None = None  # float[R, 4] normalised xyxy region proposals (FireEdit); None: none / proposed
    mask: np.ndarray | None = None  # bool[H, W] at the image's size, True = edit (masked sampling); None: no mask


def sample_id(key: str) -> int:
    """A stable 31-bit number for a sample key (folded into the run's PRNG key)."""
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


def report(message: str) -> None:
    """A line on stderr that does not break a running tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


class DeviceBatcher:
    """Edits `EditJob`s in batches over all local devices; see the module docstring.

        batcher = DeviceBatcher(editor, EditSettings(steps=50), batch_size=16)
        for batch in batcher.run(jobs):          # jobs: any iterable, drawn lazily
            for job, output in batch:            # output: PIL image at job.image's size
                ...
    """

    def __init__(self, editor, settings: EditSettings = EditSettings(), batch_size: int | None = None,
                 propose: Proposer | None = None, mask_dilation: int = 0, mask_feather: float = 0.0,
                 whole_image: bool = False, mask_from=None):  # fmt: skip
        devices = jax.local_devices()
        n = len(devices)
        self.batch_size = n * max(1, -(-(batch_size or n) // n))  # round up to a multiple of the devices
        self.editor, self.settings, self.propose = editor, settings, propose
        self.mask_dilation, self.mask_feather = mask_dilation, mask_feather
        if whole_image and mask_from is not None:
            raise ValueError("whole_image edits without a region: give no mask_from")
        # a job without a mask: edited where mask_from's region head (another Editor) finds the region,
        # else this checkpoint's if it has one
        self.mask_from = mask_from
        self.find_regions = (bool(editor.region_head) or mask_from is not None) and not whole_image
        self.mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        self._batch = NamedSharding(self.mesh, P("data"))
        self._steps_batch = NamedSharding(self.mesh, P(None, "data"))
        # Replicated once, instead of host params being sent to the devices on every call.
        editor.params = jax.device_put(editor.params, NamedSharding(self.mesh, P()))
        sampler_name = settings.scheduler or editor.config.model.sampler
        self.stochastic = make_sampler(sampler_name, editor.scheduler_config, settings.steps).stochastic
        self._latent_shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        self._draw = jax.jit(self._draw_noise, static_argnums=(2, 3))

    def run(self, jobs: Iterable[EditJob]) -> Iterator[list[tuple[EditJob, Image.Image]]]:
        """Yields each finished batch as [(job, output)], in completion order."""
        buckets: dict[tuple[int, int], list[EditJob]] = {}
        for job in jobs:  # a batch: one working size, and all with a region or none
            key = (self.editor.working_size(*job.image.size), job.mask is not None or self.find_regions)
            bucket = buckets.setdefault(key, [])
            bucket.append(job)
            if len(bucket) == self.batch_size:
                yield self._edit(key[0], buckets.pop(key))
        for key, bucket in buckets.items():
            yield self._edit(key[0], bucket)

    def _edit(self, size: tuple[int, int], jobs: list[EditJob]) -> list[tuple[EditJob, Image.Image]]:
        unboxed = [job for job in jobs if job.boxes is None]
        if self.propose is not None and unboxed:  # one detector pass per batch
            for job, boxes in zip(unboxed, self.propose([job.image for job in unboxed])):
                job.boxes = boxes
        unmasked = [job for job in jobs if job.mask is None]
        if self.find_regions and unmasked:
            found = self.editor.find_regions([job.image for job in unmasked], [job.instruction for job in unmasked],
                                             boxes=[job.boxes for job in unmasked],
                                             mask_from=self.mask_from)  # fmt: skip
            for job, region in zip(unmasked, found):
                job.mask = region
        empty = [job for job in jobs if job.mask is not None and not job.mask.any()]  # found nothing (warned)
        jobs = [job for job in jobs if job not in empty]
        if not jobs:
            return [(job, job.image.copy()) for job in empty]
        padded = jobs + [jobs[-1]] * (self.batch_size - len(jobs))
        extra = {"boxes": [job.boxes for job in padded]} if any(job.boxes is not None for job in jobs) else {}
        if any(job.mask is not None for job in jobs):
            if any(job.mask is None for job in jobs):
                raise ValueError("a batch mixes edits with and without a mask: give every job a mask, or none")
            masks = self.editor.working_masks([job.mask for job in jobs], [job.image.size for job in jobs],
                                              [job.instruction for job in jobs], size, self.mask_dilation,
                                              self.mask_feather)  # fmt: skip
            extra["masks"] = np.concatenate([masks, np.repeat(masks[-1:], len(padded) - len(jobs), axis=0)])
        pixels = np.stack([images.to_model_array(images.to_rgb(job.image), size) for job in padded])
        pixels = jax.device_put(pixels, self._batch)
        ids = np.asarray([sample_id(job.key) for job in padded], np.uint32)
        initial, step = self._draw(jax.random.key(self.settings.seed), ids, self._latent_shape(size, pixels),
                                   self.settings.steps if self.stochastic else 0)
        s = self.settings
        edited = self.editor.edit_arrays(
            pixels, [job.instruction for job in padded], steps=s.steps, image_guidance=s.image_guidance,
            text_guidance=s.text_guidance, scheduler=s.scheduler, initial_noise=initial, step_noise=step, **extra,
        )  # fmt: skip
        edited = np.asarray(edited)
        outputs = [(job, images.restore_edit(job.image, edited[i], job.mask, self.mask_dilation, self.mask_feather))
                   for i, job in enumerate(jobs)]  # fmt: skip
        return outputs + [(job, job.image.copy()) for job in empty]

    def _latent_shape(self, size, pixels) -> tuple[int, ...]:
        if size not in self._latent_shapes:
            shape = jax.eval_shape(self.editor.model.encode_image, self.editor.params, pixels).shape
            self._latent_shapes[size] = tuple(shape[1:])
        return self._latent_shapes[size]

    def _draw_noise(self, key, ids, latent_shape, steps):
        """float[B, h, w, C] initial noise and float[S, B, h, w, C] step noise (None when S = 0), per sample."""

        def one(i):
            k = jax.random.fold_in(key, i)
            initial = jax.random.normal(jax.random.fold_in(k, 0), latent_shape, jnp.float32)
            step = jax.random.normal(jax.random.fold_in(k, 1), (steps, *latent_shape), jnp.float32) if steps else None
            return initial, step

        initial, step = jax.vmap(one)(ids)
        initial = jax.lax.with_sharding_constraint(initial, self._batch)
        if step is not None:
            step = jax.lax.with_sharding_constraint(jnp.swapaxes(step, 0, 1), self._steps_batch)
        return initial, step


# ---------------------------------------------------------------- batch modes for the CLI


@dataclasses.dataclass
class BatchResult:
    """What a batch edit did: files written now, outputs already there (skipped), inputs that failed."""

    written: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, reason)


class BatchItem(NamedTuple):
    """One edit of a batch mode: input image path, instruction, output stem, optional boxes float[R, 4],
    optional region to edit (a mask file, or a normalised box)."""

    image: str
    instruction: str
    stem: str
    boxes: np.ndarray | None = None
    mask: str | None = None
    mask_box: list[float] | None = None


def edit_folder(editor, folder: str, instruction: str, out_dir: str, *, settings: EditSettings = EditSettings(),
                batch_size: int | None = None, overwrite: bool = False, proposer: str | None = None,
                progress: bool = True, whole_image: bool = False, mask_from=None, mask_dilation: int = 0,
                mask_feather: float = 0.0) -> BatchResult:  # fmt: skip
    """Edits every image file directly in `folder` with one instruction → out_dir/<stem>.png.

    Outputs already there are kept (the run resumes) unless `overwrite`. proposer: a
    Deformable DETR directory for FireEdit's region proposals (see data/proposals.py).
    Each image is edited where `mask_from` (an Editor with a region head) finds the region, else
    where this checkpoint's region head does if it has one (unless `whole_image`), else whole;
    mask_dilation / mask_feather grow and soften the region (pixels of each image).
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder {folder!r} does not exist")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise DatasetError(f"{folder!r} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    items = [BatchItem(path, instruction, _stem(path)) for path in paths]
    return _edit_items(editor, items, out_dir, settings, batch_size, overwrite, proposer, progress,
                       dict(whole_image=whole_image, mask_from=mask_from, mask_dilation=mask_dilation,
                            mask_feather=mask_feather))  # fmt: skip


def read_jsonl(path: str) -> list[BatchItem]:
    """The edits of a JSONL file, one {"image": path, "instruction": text} per line.

    Relative image paths are relative to the JSONL's folder. Optional fields: "output"
    (the output's stem; default the image's), "boxes" ([[x1, y1, x2, y2], ...]
    normalised, FireEdit's regions) and the region to edit: "mask" (a mask image's path, white =
    edit, relative as the image's) or "mask_box" ([x0, y0, x1, y1] normalised). Two lines with one output stem (one image, two
    instructions) are an error naming them; so is a line without a required field.
    """
    from fireedit_jax.data.proposals import BoxError, validate_boxes

    if not os.path.isfile(path):
        raise DatasetError(f"JSONL file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    items, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"line {number}: not JSON ({err.msg})")
                continue
            missing = [field for field in ("image", "instruction") if not isinstance(entry, dict) or field not in entry]
            if missing:
                problems.append(f"line {number}: missing field(s) {', '.join(missing)}")
                continue
            image = os.path.join(base, os.path.expanduser(entry["image"]))
            try:
                boxes = validate_boxes(entry["boxes"], None, source=f"line {number}") if "boxes" in entry else None
            except BoxError as err:
                problems.append(str(err))
                continue
            if "mask" in entry and "mask_box" in entry:
                problems.append(f"line {number}: give a \"mask\" or a \"mask_box\", not both")
                continue
            mask = os.path.join(base, os.path.expanduser(entry["mask"])) if "mask" in entry else None
            stem = _stem(entry.get("output") or image)
            items.append(BatchItem(image, str(entry["instruction"]), stem, boxes, mask, entry.get("mask_box")))
    stems: dict[str, list[str]] = {}
    for item in items:
        stems.setdefault(item.stem, []).append(item.image)
    problems += [f"output {stem!r} named by several lines ({', '.join(paths)}): give each an \"output\" stem"
                 for stem, paths in stems.items() if len(paths) > 1]
    if problems:
        shape = '{"image": path, "instruction": text}'
        raise DatasetError(f"{path}: each line must be {shape}:\n  " + "\n  ".join(problems))
    if not items:
        raise DatasetError(f"{path} has no edits")
    return items


def edit_jsonl(editor, jsonl: str, out_dir: str, *, settings: EditSettings = EditSettings(),
               batch_size: int | None = None, overwrite: bool = False, proposer: str | None = None,
               progress: bool = True, whole_image: bool = False, mask_from=None, mask_dilation: int = 0,
               mask_feather: float = 0.0) -> BatchResult:  # fmt: skip
    """Edits the lines of a JSONL file (see `read_jsonl`) → out_dir/<stem>.png; otherwise as `edit_folder`.

    A line's own "boxes" take precedence over the proposer's. A line with a "mask" or "mask_box" is
    edited there (the image kept outside it, pixel for pixel); one without, where `mask_from`'s region
    head finds the region, else this checkpoint's if it has one (unless `whole_image`), else the whole image.
    """
    return _edit_items(editor, read_jsonl(jsonl), out_dir, settings, batch_size, overwrite, proposer, progress,
                       dict(whole_image=whole_image, mask_from=mask_from, mask_dilation=mask_dilation,
                            mask_feather=mask_feather))  # fmt: skip


def edit_turns(editor, image: str | Image.Image, instructions: Sequence[str], out_dir: str, *,
               settings: EditSettings = EditSettings(), stem: str | None = None, proposer: str | None = None,
               progress: bool = True) -> list[str]:
    """Multi-turn editing: turn k edits turn k−1's output (as saved, 8-bit) → out_dir/<stem>_turn<k>.png.

    Returns the written paths in turn order. The noise of turn k is keyed by "<stem>/turn<k>";
    with a proposer, each turn's regions are proposed on that turn's input.
    """
    if not instructions:
        raise ValueError("no instructions given")
    stem = stem or (_stem(image) if isinstance(image, (str, os.PathLike)) else "image")
    current = images.load_image(image)
    batcher = DeviceBatcher(editor, settings, batch_size=1, propose=detector_proposer(proposer))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with progress_bar(len(instructions), progress, "turn") as bar:
        for k, instruction in enumerate(instructions, 1):
            [[(_, output)]] = list(batcher.run([EditJob(f"{stem}/turn{k}", current, instruction)]))
            path = os.path.join(out_dir, f"{stem}_turn{k}.png")
            output.save(path)
            paths.append(path)
            current = images.load_image(path)  # the next turn sees exactly what was saved
            bar.update(1)
    return paths


def _stem(path) -> str:
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _edit_items(editor, items: Sequence[BatchItem], out_dir, settings, batch_size, overwrite, proposer,
                progress, regions: dict) -> BatchResult:  # fmt: skip
    """regions: DeviceBatcher's whole_image, mask_from, mask_dilation and mask_feather."""
    os.makedirs(out_dir, exist_ok=True)
    result = BatchResult()
    todo = []
    for item in items:
        out = os.path.join(out_dir, item.stem + ".png")
        if os.path.exists(out) and not overwrite:
            result.existing.append(out)
        else:
            todo.append((item, out))

    def jobs():
        for item, out in todo:
            try:
                image = images.load_image(item.image)
                mask = (images.load_mask(item.mask, image.size) if item.mask is not None else
                        images.box_mask(item.mask_box, image.size) if item.mask_box is not None else None)  # fmt: skip
                yield EditJob(item.stem, image, item.instruction, payload=out, boxes=item.boxes, mask=mask)
            except images.ImageError as err:
                report(f"skipped: {err}")
                result.failed.append((item.image, str(err)))
                bar.update(1)

    batcher = DeviceBatcher(editor, settings, batch_size, propose=detector_proposer(proposer), **regions)
    with progress_bar(len(todo), progress, "edit") as bar:
        for batch in batcher.run(jobs()):
            for job, output in batch:
                output.save(job.payload)
                result.written.append(job.payload)
            bar.update(len(batch))
    return result


def progress_bar(total: int, enabled: bool, unit: str):
    """A tqdm bar with ETA (a context manager), silent when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True)
