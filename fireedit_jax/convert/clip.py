"""transformers CLIP state dicts → our CLIP text / vision tower params (models/clip.py).

Accepted layouts, for either tower:
  CLIPTextModel / CLIPVisionModel, transformers 5:   embeddings.…, encoder.layers.{i}.…, …
  the same saved by transformers 4, *WithProjection, and a full CLIPModel:
      text_model.… / vision_model.…, text_projection.weight / visual_projection.weight
The other tower, `logit_scale`, `position_ids` buffers and (without `with_projection`)
the projection are ignored.

`text_model.encoder.layers.3.self_attn.q_proj.weight` → params/encoder/layers/q_proj/kernel[3]
(transposed), `….mlp.fc1.bias` → params/encoder/layers/fc1/bias[3], `….layer_norm1.weight` →
…/layer_norm1/scale[3], `embeddings.token_embedding.weight` → params/token_embedding,
`embeddings.patch_embedding.weight` → params/patch_embedding/kernel (HWIO),
`vision_model.pre_layrnorm` → params/pre_layernorm.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    example_inputs,
)



@dataclasses.dataclass(frozen=True)
class _Tower:
    config: type
    prefix: str  # of the tower's keys in two-tower layouts
    projection: str  # the projection's module name, in checkpoints and in our params
    other_tower: tuple[str, ...]  # regexes of the other tower's keys


_TOWERS = {
    "text": _Tower(CLIPTextConfig, "text_model.", "text_projection", (r"^vision_model\.", r"^visual_projection\.")),
    "vision": _Tower(CLIPVisionConfig, "vision_model.", "visual_projection", (r"^text_model\.", r"^text_projection\.")),
}
_ALWAYS_IGNORED = (r"(^|\.)position_ids$", r"^logit_scale$")
_EMBEDDINGS = ("token_embedding", "position_embedding", "class_embedding")
# Fields that change the weights or the outputs; remat does neither.
_ARCHITECTURE = {
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings",
             "hidden_act", "layer_norm_eps", "eos_token_id"),
    "vision": ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
               "num_channels", "hidden_act", "layer_norm_eps"),
}


def flax_path(key: str, ndim: int, tower: str) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform); layers as `layers_{i}` (stacked later), or None."""
    spec = _TOWERS[tower]
    if key == f"{spec.projection}.weight":
        return ("params", spec.projection, "kernel"), core.linear
    key = key.removeprefix(spec.prefix).removeprefix("embeddings.")
    key = re.sub(r"^encoder\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?", r"encoder.layers_\1.", key)
    key = key.replace("pre_layrnorm.", "pre_layernorm.")
    *modules, leaf = key.split(".")
    if (modules and modules[-1] in _EMBEDDINGS and leaf == "weight") or (not modules and leaf in _EMBEDDINGS):
        return ("params", *modules[:-1], modules[-1] if modules else leaf), core.identity
    if leaf == "bias":
        return ("params", *modules, "bias"), core.identity
    if leaf != "weight":
        return None
    if ndim == 1:
        return ("params", *modules, "scale"), core.identity
    return ("params", *modules, "kernel"), core.conv2d if ndim == 4 else core.linear


def _stack(path):
    match = re.fullmatch(r"layers_(\d+)", path[2]) if len(path) > 2 and path[1] == "encoder" else None
    return (("params", "encoder", "layers", *path[3:]), int(match[1])) if match else None


def abstract_params(config: CLIPTextConfig | CLIPVisionConfig):
    """The tower's boxed parameter tree as shapes only (nothing is allocated)."""
    model = (CLIPTextModel if isinstance(config, CLIPTextConfig) else CLIPVisionModel)(config)
    return jax.eval_shape(model.init, jax.random.key(0), *example_inputs(config))


def _convert_tower(state_dict, config, tower: str) -> dict:
    spec = _TOWERS[tower]
    expected = abstract_params(config)
    known = core.flat_shapes(expected)
    ignore = _ALWAYS_IGNORED + spec.other_tower + (() if config.with_projection else (rf"^{spec.projection}\.",))

    def rename(key, value):
        target = flax_path(key, np.ndim(value), tower)
        if target is None:
            return None
        stacked = _stack(target[0])
        # Keys whose path the model lacks are reported as unexpected, under their own name.
        return target if (stacked[0] if stacked else target[0]) in known else None

    return core.convert(state_dict, rename, expected, ignore=ignore, stack=_stack, what=f"CLIP {tower} checkpoint")


def convert_clip_text(state_dict, config: CLIPTextConfig) -> dict:
    """A CLIPTextModel(WithProjection) or CLIPModel state dict → our CLIPTextModel {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every parameter
    without a source key (e.g. text_projection when `with_projection` and the checkpoint
    has none) and every shape mismatch.
    """
    return _convert_tower(state_dict, config, "text")


def convert_clip_vision(state_dict, config: CLIPVisionConfig) -> dict:
    """A CLIPVisionModel(WithProjection) or CLIPModel state dict → our CLIPVisionModel {"params": ...}; strict as above."""
    return _convert_tower(state_dict, config, "vision")


def check_hf_config(hf_config: dict, config: CLIPTextConfig | CLIPVisionConfig, what: str = "CLIP checkpoint") -> None:
    """Raises `core.ConversionError` naming every field where a transformers config dict and ours differ.

    `hf_config` is a tower's config or a full CLIPConfig's; projection_dim is compared
    only when `config.with_projection`.
    """
    tower = "text" if isinstance(config, CLIPTextConfig) else "vision"
    theirs = _TOWERS[tower].config.from_hf(hf_config)
    names = _ARCHITECTURE[tower] + (("projection_dim",) if config.with_projection else ())
    core.check_config(what, {name: (getattr(theirs, name), getattr(config, name)) for name in names})


def _load(path: str, config, convert) -> dict:
    beside = core.config_beside(path)
    if beside is not None:
        check_hf_config(beside, config, what=f"checkpoint {path!r}")
    return convert(core.load_state_dict(path), config)


def load_clip_text(path: str, config: CLIPTextConfig) -> dict:
    """A transformers CLIP directory (config.json + weights) or weights file → text tower params.

    A config.json beside the weights is checked against `config` first.
    """
    return _load(path, config, convert_clip_text)


def load_clip_vision(path: str, config: CLIPVisionConfig) -> dict:
    """As `load_clip_text`, for the vision tower."""
    return _load(path, config, convert_clip_vision)


def _torch_tower(torch_model, tower: str, config):
    """(the transformers tower module, its projection Linear or None) of any accepted model or directory."""
    if isinstance(torch_model, str):
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(torch_model, local_files_only=True)
        architecture = (hf_config.architectures or ["CLIPModel"])[0]
        torch_model = getattr(transformers, architecture).from_pretrained(torch_model, local_files_only=True)
    torch_model = torch_model.float().eval()
    spec = _TOWERS[tower]
    module = getattr(torch_model, spec.prefix.rstrip("."), torch_model)
    projection = getattr(torch_model, spec.projection, None)
    hf_config = module.config.to_dict()
    if projection is not None:
        hf_config["projection_dim"] = projection.out_features
    check_hf_config(hf_config, config, what=f"the torch CLIP {tower} model")
    if config.with_projection and projection is None:
        raise core.ConversionError(f"the torch model has no {spec.projection}, but config.with_projection is set")
    return module, projection


def _max_error(got, want) -> float:
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs to compare with {len(want)} from transformers")
    return max(float(np.max(np.abs(np.asarray(g) - w.numpy()))) for g, w in zip(got, want))


def verify_clip_text(torch_model, params, config: CLIPTextConfig, seed: int = 0, *, batch: int = 2,
                     length: int | None = None) -> float:
    """Max abs difference of last_hidden_state, pooled output (and text embeds) between transformers and ours.

    Args:
      torch_model: a transformers CLIPTextModel, CLIPTextModelWithProjection or CLIPModel,
        or a directory saved by one.
      params: our converted params ({"params": ...}).
    Random token ids, right-padded (row i has length − 3i real tokens, ending in EOS).
    """
    import torch

    module, projection = _torch_tower(torch_model, "text", config)
    length = length or min(16, config.max_position_embeddings)
    rng = np.random.default_rng(seed)
    eos = config.vocab_size - 1 if config.eos_token_id == 2 else config.eos_token_id
    ids = rng.integers(0, config.vocab_size - 1, size=(batch, length))
    ids[ids >= eos] += 1  # no stray EOS before the real one
    real = np.maximum(length - 3 * np.arange(batch), 2)
    mask = np.arange(length)[None, :] < real[:, None]
    ids[np.arange(batch), real - 1] = eos
    ids = np.where(mask, ids, eos)
    with torch.no_grad():
        out = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long())
        want = [out.last_hidden_state, out.pooler_output]
        if config.with_projection:
            want.append(projection(out.pooler_output))
    with jax.default_matmul_precision("highest"):
        got = _text_forward(config)(params, ids, mask)
    return _max_error(got, want)


def verify_clip_vision(torch_model, params, config: CLIPVisionConfig, seed: int = 0, *, batch: int = 2,
                       size: int | None = None) -> float:
    """Max abs difference of every hidden state, the pooled output (and image embeds) between transformers and ours.

    Args:
      torch_model: a transformers CLIPVisionModel, CLIPVisionModelWithProjection or CLIPModel,
        or a directory saved by one.
      params: our converted params ({"params": ...}).
      size: image side; by default the configured one (others interpolate the position embeddings).
    """
    import torch

    module, projection = _torch_tower(torch_model, "vision", config)
    size = size or config.image_size
    pixels = np.random.default_rng(seed).normal(size=(batch, size, size, config.num_channels)).astype(np.float32)
    with torch.no_grad():
        out = module(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True, output_hidden_states=True
        )
        want = [*out.hidden_states, out.pooler_output]
        if config.with_projection:
            want.append(projection(out.pooler_output))
    with jax.default_matmul_precision("highest"):
        got = _vision_forward(config)(params, pixels)
    return _max_error(got, want)


@functools.lru_cache(maxsize=8)
def _text_forward(config: CLIPTextConfig):
    model = CLIPTextModel(config)

    def forward(params, ids, mask):
        out = model.apply(params, ids, mask)
        return [out.last_hidden_state, out.pooler_output] + ([out.embeds] if config.with_projection else [])

    return jax.jit(forward)


@functools.lru_cache(maxsize=8)
def _vision_forward(config: CLIPVisionConfig):
    model = CLIPVisionModel(config)

    def forward(params, pixels):
        out = model.apply(params, pixels, hidden_layers=tuple(range(config.num_layers + 1)))
        return [*out.hidden_states, out.pooler_output] + ([out.embeds] if config.with_projection else [])

    return jax.jit(forward)
