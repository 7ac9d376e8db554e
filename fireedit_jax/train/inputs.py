"""The training run's data: `config.data` → a grain pipeline → the loss's batches.

config.data (configs add it; see configs/tiny.py):
  sources      {name: {kind, weight, ...}}: the training mixture, one entry per source;
               kind and its fields:
                 shapes   split, num_samples, view ("edits", or "captions": caption records,
                          no target image, for learnable regions) and the ShapesConfig
                          fields (size, seed, min_objects, max_objects, box_jitter,
                          distractor_boxes, …) (data/shapes.py, made on the fly)
                 instructpix2pix, magicbrush, ultraedit, captions, jsonl, wds, llava, tfds
                          path (and split, image_root), as `data.sources.open_source`
                          (captions, wds: caption records)
                 latents  path (a `fireedit-jax cache-latents` data set), split: VAE latents
                          instead of pixels, so the loss skips the VAE encoder. Every source of
                          the mixture is then a cache (a batch holds latents or pixels), made
                          at config.resolution with the model's VAE; FireEdit's VLM reads the
                          source images the cache keeps.
               Paths may be local or gs:// (storage.py).
  eval         one pixel source spec (same fields): the fixed validation examples of the sample grids
  tokenizer    a tokenizer directory, or "builtin:<name>" (BUILTIN_TOKENIZERS); a checkpoint's
               own tokenizer (resume, --init) takes precedence
  length_buckets, box_buckets   the VLM sequence's static lengths and box counts (vlm conditioner)
  clip_tokenizer  FireEdit stage 1: the CLIP tokenizer of the captions (same forms as tokenizer)
  num_workers  grain worker processes (0: decode in the training process)
  flip_probability  horizontal flips (texts get left ↔ right)

The pipeline's batch (data/pipeline.py: uint8 images, bucketed ids and boxes) becomes
the loss's batch in `model_batch`: images as float32 in [-1, 1] and only the entries the
loss reads (`flops.loss_inputs`), so bucket sizes the loss ignores never cause a recompilation.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from PIL import Image

from fireedit_jax import storage
from fireedit_jax.data import pipeline, sources, transforms
from fireedit_jax.data.records import EditRecord, Task
from fireedit_jax.data.tokenizer import add_new_tokens
from fireedit_jax.data.vlm_inputs import DEFAULT_BOX_BUCKETS, DEFAULT_LENGTH_BUCKETS, VLMTemplate
from fireedit_jax.train import losses

IMAGE_KEYS = ("source", "target", "vlm_source")


def _clip_chars():
    from fireedit_jax.convert.reference import clip_tokenizer

    return clip_tokenizer()


def _shape_words():
    from fireedit_jax.data.shapes import build_tokenizer

    return build_tokenizer()


# Tokenizers built offline, for tiny models trained from scratch (saved with every checkpoint).
BUILTIN_TOKENIZERS = {"clip_chars": _clip_chars, "shape_words": _shape_words}


class ShapeEditRecords:
    """`data.shapes.ShapeEditSource` as a source of `EditRecord`s (images PNG-encoded, boxes kept).

    view: "edits" (source, target, edit mask, instruction) or "captions": caption records
    (the scene, its caption, the instruction, the caption of the edited scene) for the
    learnable-region method, which never sees the edited scene or its mask.
    """

    VIEWS = ("edits", "captions")

    def __init__(self, name: str, split: str = "train", num_samples: int = 10_000, view: str = "edits",
                 **shapes_config):  # fmt: skip
        from fireedit_jax.data.shapes import ShapeEditSource, ShapesConfig

        if view not in self.VIEWS:
            raise ValueError(f"shapes source {name!r}: view={view!r}; choose one of {', '.join(self.VIEWS)}")
        self.name, self.view = name, view
        self._source = ShapeEditSource(split, num_samples, ShapesConfig(**shapes_config))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> EditRecord:
        sample = self._source[index]
        common = dict(key=f"shapes/{self._source.split}#{index}", source_image=_png(sample["source"]),
                      instruction=sample["instruction"], boxes=sample["boxes"])  # fmt: skip
        if self.view == "captions":
            return EditRecord(**common, source_caption=sample["caption"], target_caption=sample["target_caption"],
                              task=Task.CAPTION)  # fmt: skip
        return EditRecord(**common, target_image=_png(sample["target"]),
                          mask_image=_png(sample["mask"].astype(np.uint8) * 255))  # fmt: skip

    def __repr__(self) -> str:
        return f"ShapeEditRecords({self.name!r}, {self.view!r}, {self._source!r})"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def data_specs(config) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, spec) of every source config.data names: the training mixture's, then "eval"."""
    data = config.get("data") or {}
    specs = list((data.get("sources") or {}).items())
    return specs + ([("eval", data["eval"])] if data.get("eval") else [])


def make_source(name: str, spec: Mapping[str, Any]):
    """One source from its config entry {kind, weight (ignored here), ...}: "shapes" takes
    ShapeEditRecords' fields, "latents" `LatentSource`'s (path, split), the other kinds
    `data.sources.open_source`'s (path, split, image_root)."""
    fields = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
    kind = fields.pop("kind", None)
    fields.pop("weight", None)
    kinds = ("shapes", "latents", *sources.SOURCE_KINDS)
    if kind not in kinds:
        raise ValueError(f"config.data source {name!r}: kind={kind!r}; choose one of {', '.join(kinds)}")
    try:
        if kind == "shapes":
            return ShapeEditRecords(name, **fields)
        if kind == "latents":
            from fireedit_jax.data.latent_cache import LatentSource

            return LatentSource(fields.pop("path"), **fields, name=name)
        return sources.open_source(kind, name=name, **fields)
    except (TypeError, KeyError) as error:
        raise ValueError(f"config.data source {name!r} (kind {kind!r}): {error}") from None


def make_tokenizer(spec: str | None):
    """config.data.tokenizer → a tokenizer (None if unset)."""
    if not spec:
        return None
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_TOKENIZERS:
            raise ValueError(f"config.data.tokenizer={spec!r}: built-in tokenizers are {sorted(BUILTIN_TOKENIZERS)}")
        return BUILTIN_TOKENIZERS[name]()
    from fireedit_jax.pipeline import load_tokenizer

    return load_tokenizer(storage.local_copy(spec))


def make_transform(config, model, tokenizer) -> transforms.EditTransform:
    """Record → example for this model and loss.

    clip_text: the instruction as CLIP ids (`input_ids`). vlm: the VLM sequence
    (`vlm_*`, data/vlm_inputs.py) from the LLM tokenizer, boxes in config.data.box_buckets;
    FireEdit's stage 1 reads the target caption instead (no image, no regions) and the
    CLIP ids of that caption (`clip_ids`, tokenizer config.data.clip_tokenizer).
    """
    data = config.data
    if tokenizer is None:
        raise ValueError("the model needs a tokenizer: set config.data.tokenizer, or start from a checkpoint "
                         "with a tokenizer/ directory (--init)")  # fmt: skip
    loss = config.train.loss
    common = dict(resolution=int(config.resolution), min_crop_scale=float(data.get("min_crop_scale", 1.0)),
                  flip_probability=float(data.get("flip_probability", 0.5)), mask=loss in ("mask_edit", "grounded"),
                  difference_masks=loss == "grounded" and bool(data.get("difference_masks", True)))  # fmt: skip
    own_region = loss in losses.REGION_LOSSES or (loss == "grounded" and model.region is not None)
    region = region_text_fields(config, model, tokenizer) if own_region else ()
    if model.conditioner == "clip_text":
        source = "instruction"
        if region:  # the region loss's edit: the generator reads the instruction or the target caption
            source = config.model.learnable_region.get("generator_text", "instruction")
        field = transforms.clip_text_field(tokenizer, name="input", source=source, length=model.max_text_length)
        return transforms.EditTransform(texts=(field, *region), **common)
    from fireedit_jax.train.losses import fireedit_stage

    captions = config.train.loss == "fireedit" and fireedit_stage(config) == 1
    vlm = model.vlm
    grid = model.vlm_image_size // vlm.vision.patch_size // vlm.merge
    box_buckets = tuple(data.get("box_buckets", DEFAULT_BOX_BUCKETS))
    template = VLMTemplate.from_tokenizer(
        tokenizer, add_new_tokens(tokenizer, vlm.llm.vocab_size), num_image_tokens=0 if captions else grid * grid,
        regions=vlm.regions is not None and not captions, box_buckets=box_buckets,
        length_buckets=tuple(data.get("length_buckets", DEFAULT_LENGTH_BUCKETS)),
    )  # fmt: skip
    texts = transforms.vlm_text_fields(tokenizer, template, captions=captions) + region
    if captions:
        clip = make_tokenizer(data.get("clip_tokenizer"))
        if clip is None:
            raise ValueError("FireEdit's stage 1 aligns to CLIP text states of the captions: set "
                             "config.data.clip_tokenizer (a CLIP tokenizer directory)")  # fmt: skip
        texts += (transforms.clip_text_field(clip, length=model.max_text_length),)
    return transforms.EditTransform(texts=texts, vlm=template, box_buckets=box_buckets, **common)


def region_text_fields(config, model, tokenizer) -> tuple[transforms.TextField, ...]:
    """The region model's texts, tokenised by the run's tokenizer (the checkpoint keeps one): the
    instruction for its T5 (`region_ids` / `region_mask`, config.data.region_length tokens with the
    special ones, as `Editor.region_tokens`) and, for the caption-trained losses, the source and
    target captions for its CLIP (`caption_ids`, `target_caption_ids`)."""
    from fireedit_jax.models.learnable_region import INSTRUCTION_TOKENS

    pad = getattr(tokenizer, "pad_token_id", None) or 0
    words = transforms.TextField("region", tokenizer, (int(config.data.get("region_length", INSTRUCTION_TOKENS)),),
                                 "instruction", pad, add_special_tokens=True, keep_last=True, required=True)  # fmt: skip
    if config.train.loss not in losses.REGION_LOSSES:
        return (words,)
    length = model.region.clip_text.config.max_position_embeddings
    return (words, transforms.clip_text_field(tokenizer, name="caption", source="source_caption", length=length),
            transforms.clip_text_field(tokenizer, name="target_caption", source="target_caption", length=length))  # fmt: skip


def make_train_iterator(config, transform: transforms.EditTransform, batch_size: int) -> pipeline.DataIterator:
    """This process's iterator over the training mixture (`batch_size` examples per batch)."""
    specs = config.data.sources
    if not specs:
        raise ValueError("config.data.sources is empty: name at least one training source")
    built = [make_source(name, spec) for name, spec in specs.items()]
    weights = [float(spec.get("weight", 1.0)) for spec in specs.values()]
    if losses.uses_latent_cache(config):
        transform = _latent_transform(config, built, transform)
    elif any(spec.get("kind") == "latents" for spec in specs.values()):
        raise ValueError("config.data.sources mixes latent caches with pixel sources: a batch holds latents or "
                         "pixels, so make every source a cache (`fireedit-jax cache-latents`) or none")  # fmt: skip
    return pipeline.make_iterator(
        built, transform, batch_size=batch_size, seed=int(config.seed), weights=weights,
        num_workers=int(config.data.get("num_workers", 0)),
    )  # fmt: skip


def _latent_transform(config, caches, transform: transforms.EditTransform):
    """The LatentTransform for these caches, after checking they were made for this model."""
    from fireedit_jax.config_dataclass import dataclass_from_dict
    from fireedit_jax.data.latent_cache import LatentTransform
    from fireedit_jax.models.vae import VAEConfig
    from fireedit_jax.train.flops import loss_inputs

    source_pixels = "source" in loss_inputs(config)  # FireEdit's VLM and HVCA read the source image
    vae = _plain(dataclasses.asdict(dataclass_from_dict(VAEConfig, config.model.vae)))
    for cache in caches:
        problems = []
        if int(cache.metadata["resolution"]) != int(config.resolution):
            problems.append(f"resolution {cache.metadata['resolution']} (config.resolution {config.resolution})")
        if _plain(cache.metadata["vae"]) != vae:
            problems.append("another VAE than config.model.vae")
        if source_pixels and not cache.has_source_images:
            problems.append("no source images (an older cache-latents), which the VLM reads")
        if problems:
            raise ValueError(f"config.data source {cache.name!r}: the latent cache has {'; '.join(problems)}: "
                             "write it again with `fireedit-jax cache-latents` for this config")  # fmt: skip
    return LatentTransform(transform, source_pixels=source_pixels)


def _plain(tree) -> Any:
    """JSON values (tuples → lists), so a config and a cache's metadata compare."""
    return json.loads(json.dumps(tree))


def model_batch(batch: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The pipeline's batch → the loss's (`keys`, from `flops.loss_inputs(config)`): uint8
    images → float32 in [-1, 1], the mask → float32 in {0, 1}; other entries dropped."""
    missing = sorted(set(keys) - batch.keys())
    if missing:
        raise ValueError(f"the loss reads {missing}, which the input pipeline does not give (it gives {sorted(batch)})")

    def convert(key):
        if key in IMAGE_KEYS:
            return batch[key].astype(np.float32) / 127.5 - 1.0
        return batch[key].astype(np.float32) if key == "mask" else batch[key]

    return {key: convert(key) for key in keys}


def eval_examples(config, transform: transforms.EditTransform, count: int):
    """The first `count` records of config.data.eval (no augmentation): (source uint8[N, S, S, 3],
    target uint8[N, S, S, 3], instructions, boxes list of float32[R, 4])."""
    if config.data.eval.get("kind") == "latents":
        raise ValueError("config.data.eval: the sample grids edit images, so it must be a pixel source, not latents")
    source = make_source("eval", config.data.eval)
    examples, instructions, boxes = [], [], []
    for i in range(min(count, len(source))):
        record = source[i]
        example, _ = transform(record)
        examples.append(example)
        instructions.append(record.instruction)
        boxes.append(example["boxes"])
    stack = lambda key: np.stack([e[key] for e in examples])  # noqa: E731
    return stack("source"), stack("target"), instructions, boxes
