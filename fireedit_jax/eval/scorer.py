"""Per-sample editing metrics with the metric encoders the user has on disk.

    scorer = Scorer.from_paths(clip="weights/clip-vit-base-patch32", dino="weights/dino-vits16")
    records = scorer.score(outputs, targets, captions=local_captions, oracle=True)   # MagicBrush
    records = scorer.score(outputs, inputs, captions=output_captions,                 # Emu Edit
                           sources=inputs, source_captions=input_captions)

Encoders are optional. L1 and L2 need none; CLIP-I, CLIP-T (and its oracle) and CLIP-dir
need `clip` (a transformers CLIPModel directory: config.json, weights, tokenizer files);
DINO needs `dino` (a transformers ViTModel directory, or DINO's own `.pth` file, read as
ViT-S/16); LPIPS needs a torchvision trunk state dict and the lpips package's linear
heads (by default the file the installed lpips package bundles). A metric whose encoder
is missing is skipped, and `describe()` says which metrics are computed with which
model, and why the others are not.

Formulas and preprocessing are eval/metrics.py's and eval/preprocess.py's: MagicBrush's
(REFERENCES.md §8) — CLIP inputs by OpenAI CLIP's preprocess (shorter side 224 bicubic,
centre crop), DINO inputs Resize(256) + CenterCrop(224), L1/L2/LPIPS on [0, 1] images
with the output resized to the reference's size. `clip_preprocess="ip2p"` uses
InstructPix2Pix's CLIP input instead (224×224 bicubic, no crop).

Metric names in the records: l1, l2, lpips, clip_i, dino (output vs reference),
clip_t (output vs caption; Emu Edit's CLIP-out), clip_t_oracle (reference vs caption),
clip_dir (cos(î_out − î_src, t̂_caption − t̂_src_caption)).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from fireedit_jax.eval import metrics, preprocess

IMAGE_METRICS = ("l1", "l2", "lpips", "clip_i", "dino")
ALL_METRICS = (*IMAGE_METRICS, "clip_t", "clip_t_oracle", "clip_dir")


def _pad_to(arrays: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch axis with copies of the last row (fixed shapes: one compilation)."""
    extra = size - len(arrays)
    return np.concatenate([arrays, np.repeat(arrays[-1:], extra, axis=0)]) if extra else arrays


def _batched(fn, arrays: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size chunks of the leading axis → stacked float32 numpy results."""
    out = [np.asarray(fn(_pad_to(arrays[i: i + batch_size], batch_size)))[: len(arrays[i: i + batch_size])]
           for i in range(0, len(arrays), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class ClipEncoder:
    """CLIP image and text embeddings (projected) from a transformers CLIPModel directory."""

    def __init__(self, directory: str, batch_size: int = 8, preprocess_name: str = "clip"):
        from transformers import AutoTokenizer

        from fireedit_jax.convert.clip import load_clip_text, load_clip_vision
        from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--clip {directory!r}: no config.json "
                                    "(expected a transformers CLIPModel directory)")
        hf = _read_json(config_path)
        if "text_config" not in hf or "vision_config" not in hf:
            raise ValueError(f"--clip {directory!r} is not a CLIPModel directory "
                             "(its config has no text and vision towers)")
        self.text_config = CLIPTextConfig.from_hf(hf, with_projection=True)
        self.vision_config = CLIPVisionConfig.from_hf(hf, with_projection=True)
        self.text_params = load_clip_text(directory, self.text_config)
        self.vision_params = load_clip_vision(directory, self.vision_config)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.batch_size, self.preprocess_name = batch_size, preprocess_name
        choices = {"clip": preprocess.clip_pixels, "ip2p": preprocess.ip2p_clip_pixels}
        if preprocess_name not in choices:
            raise ValueError(f"CLIP preprocessing {preprocess_name!r} unknown: one of {', '.join(choices)}")
        pixels = choices[preprocess_name]
        self._pixels = functools.partial(pixels, size=self.vision_config.image_size)
        vision, text = CLIPVisionModel(self.vision_config), CLIPTextModel(self.text_config)
        self._image_fn = jax.jit(lambda pixels: vision.apply(self.vision_params, pixels).embeds)
        self._text_fn = jax.jit(lambda ids, mask: text.apply(self.text_params, ids, mask).embeds)
        v = self.vision_config
        self.description = (f"CLIP {directory} (vision {v.num_layers}×{v.hidden_size}, patch {v.patch_size}, "
                            f"{v.image_size}px, {preprocess_name} preprocessing; projection {v.projection_dim})")

    def images(self, images) -> np.ndarray:
        """PIL images → float32[B, E]."""
        return _batched(self._image_fn, np.stack([self._pixels(im) for im in images]), self.batch_size)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions → float32[B, E] (truncated to the tower's length, as CLIP's tokenize(truncate=True))."""
        length = self.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True)
        ids, mask = np.asarray(tokens.input_ids, np.int32), np.asarray(tokens.attention_mask, np.int32)
        both = np.concatenate([ids, mask], axis=1)
        return _batched(lambda x: self._text_fn(x[:, :length], x[:, length:]), both, self.batch_size)


class DinoEncoder:
    """DINO class-token features from a transformers ViTModel directory or a DINO `.pth` (ViT-S/16)."""

    def __init__(self, path: str, batch_size: int = 8):
        from fireedit_jax.convert.vit import load_vit
        from fireedit_jax.models.vit import ViTConfig, ViTModel

        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"--dino {path!r}: no config.json (expected a transformers ViTModel directory)")
            self.config = ViTConfig.from_hf(_read_json(config_path))
        elif os.path.isfile(path):
            self.config = ViTConfig.dino_vits16()
        else:
            raise FileNotFoundError(f"--dino {path!r} does not exist")
        self.params = load_vit(path, self.config)
        model = ViTModel(self.config)
        self._fn = jax.jit(lambda pixels: model.apply(self.params, pixels).class_token)
        self.batch_size = batch_size
        c = self.config
        self.description = (f"DINO {path} (ViT {c.num_layers}×{c.hidden_size}, patch {c.patch_size}; "
                            "Resize 256, crop 224)")

    def images(self, images) -> np.ndarray:
        return _batched(self._fn, np.stack([preprocess.dino_pixels(im) for im in images]), self.batch_size)


def bundled_lpips_heads(net: str) -> str | None:
    """The lpips package's linear-head weights for `net` (weights/v0.1/<net>.pth), if installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", f"{net}.pth")
    return path if os.path.isfile(path) else None


class LpipsScorer:
    """LPIPS from a torchvision trunk state dict and the lpips package's linear heads."""

    def __init__(self, trunk: str, heads: str | None = None, net: str = "alex"):
        from fireedit_jax.convert.lpips import load_lpips
        from fireedit_jax.models.lpips import LPIPSConfig

        heads = heads or bundled_lpips_heads(net)
        if heads is None:
            raise FileNotFoundError(f"LPIPS needs the linear heads for {net!r}: "
                                    "install the lpips package or pass their path")
        for what, path in (("trunk", trunk), ("heads", heads)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LPIPS {what} weights {path!r} do not exist")
        self.config = LPIPSConfig(net)
        self.params = load_lpips(trunk, heads, self.config)
        self.description = f"LPIPS v0.1 {net} (trunk {trunk}, heads {heads})"

    def distance(self, generated: np.ndarray, reference: np.ndarray) -> float:
        """[0, 1] float[H, W, 3] pair → LPIPS."""
        return float(metrics.lpips_distance(self.params, generated[None], reference[None], self.config)[0])


@dataclasses.dataclass
class Scorer:
    """Per-sample metrics; encoders left None are skipped (see the module docstring)."""

    clip: ClipEncoder | None = None
    dino: DinoEncoder | None = None
    lpips: LpipsScorer | None = None

    @classmethod
    def from_paths(cls, *, clip: str | None = None, dino: str | None = None, lpips_trunk: str | None = None,
                   lpips_heads: str | None = None, lpips_net: str = "alex", clip_preprocess: str = "clip",
                   batch_size: int = 8) -> Scorer:
        """Loads the encoders given (the CLI's --clip, --dino, --lpips-trunk/--lpips-heads/--lpips-net)."""
        return cls(
            clip=ClipEncoder(clip, batch_size, clip_preprocess) if clip else None,
            dino=DinoEncoder(dino, batch_size) if dino else None,
            lpips=LpipsScorer(lpips_trunk, lpips_heads, lpips_net) if lpips_trunk else None,
        )

    def describe(self) -> dict:
        """{"metrics": names computed, "models": {encoder: description}, "skipped": {metric: why}}."""
        computed = ["l1", "l2"]
        skipped = {}
        models = {}
        encoders = (("lpips", self.lpips, ("lpips",), "--lpips-trunk"),
                    ("clip", self.clip, ("clip_i", "clip_t", "clip_t_oracle", "clip_dir"), "--clip"),
                    ("dino", self.dino, ("dino",), "--dino"))
        for name, encoder, names, flag in encoders:
            if encoder is None:
                skipped.update({metric: f"no {flag} given" for metric in names})
            else:
                computed += names
                models[name] = encoder.description
        return {"metrics": computed, "models": models, "skipped": skipped}

    def score(self, outputs, references, *, captions: Sequence[str | None] | None = None,
              sources=None, source_captions: Sequence[str | None] | None = None,
              oracle: bool = False) -> list[dict]:
        """One dict of metrics per sample.

        Args:
          outputs: edited PIL images.
          references: what outputs are compared with (MagicBrush: the targets; Emu Edit: the inputs).
          captions: per sample, the caption of the intended result (None: no CLIP-T for it).
          sources, source_captions: the inputs and their captions, for CLIP-dir (both needed).
          oracle: also score the references against the captions (MagicBrush's CLIP-T oracle).
        """
        n = len(outputs)
        if len(references) != n:
            raise ValueError(f"{n} outputs but {len(references)} references")
        records = [{} for _ in range(n)]
        for record, output, reference in zip(records, outputs, references):
            generated, ref = preprocess.distance_pair(output, reference)
            record["l1"] = float(metrics.l1_distance(generated, ref))
            record["l2"] = float(metrics.l2_distance(generated, ref))
            if self.lpips is not None:
                record["lpips"] = self.lpips.distance(generated, ref)
        if self.dino is not None:
            values = metrics.dino_score(self.dino.images(outputs), self.dino.images(references))
            for record, value in zip(records, values):
                record["dino"] = float(value)
        if self.clip is not None:
            self._clip_metrics(records, outputs, references, captions, sources, source_captions, oracle)
        return records

    def _clip_metrics(self, records, outputs, references, captions, sources, source_captions, oracle):
        out_embeds = self.clip.images(outputs)
        ref_embeds = self.clip.images(references)
        for record, value in zip(records, metrics.clip_i(out_embeds, ref_embeds)):
            record["clip_i"] = float(value)
        if captions is None:
            return
        has_caption = [c is not None for c in captions]
        text_embeds = self.clip.texts([c or "" for c in captions])
        columns = {"clip_t": (metrics.clip_t(out_embeds, text_embeds), has_caption)}
        if oracle:
            columns["clip_t_oracle"] = (metrics.clip_t(ref_embeds, text_embeds), has_caption)
        if sources is not None and source_captions is not None:
            source_embeds = ref_embeds if sources is references else self.clip.images(sources)
            source_text = self.clip.texts([c or "" for c in source_captions])
            both = [a and b is not None for a, b in zip(has_caption, source_captions)]
            columns["clip_dir"] = (metrics.clip_direction(source_embeds, out_embeds, source_text, text_embeds), both)
        for name, (values, present) in columns.items():
            for record, value, ok in zip(records, np.asarray(values), present):
                record[name] = float(value) if ok else None
