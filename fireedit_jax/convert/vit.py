"""ViT state dicts → our ViTModel params (models/vit.py).

Accepted layouts (an optional `vit.` prefix is stripped; the pooler, a classifier or
head and a mask token are ignored):
  transformers 5 in memory:   layers.{i}.attention.q_proj, .attention.o_proj, .layernorm_before, .mlp.fc1, …
  transformers' files:        encoder.layer.{i}.attention.attention.query, .attention.output.dense,
                              .intermediate.dense, .output.dense, .layernorm_before, …
  facebookresearch/dino (`dino_deitsmall16_pretrain.pth`, torch.hub `dino_vits16`):
                              blocks.{i}.norm1, .attn.qkv (fused, split here), .attn.proj, .mlp.fc1, …,
                              cls_token, pos_embed, patch_embed.proj, norm

`encoder.layer.3.attention.attention.query.weight` → params/encoder/layers/q_proj/kernel[3]
(transposed), `….layernorm_before.weight` → …/layer_norm1/scale[3],
`embeddings.patch_embeddings.projection.weight` → params/patch_embedding/kernel (HWIO),
`embeddings.cls_token` [1, 1, D] → params/cls_token [D].
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.vit import ViTConfig, ViTModel, example_inputs

_IGNORED = (r"^(vit\.)?pooler\.", r"^classifier\.", r"^head\.", r"(^|\.)mask_token$", r"(^|\.)position_ids$")
# Our module ← every source name of it.
_TOP = {
    "cls_token": ("embeddings.cls_token", "cls_token"),
    "position_embedding": ("embeddings.position_embeddings", "pos_embed"),
    "patch_embedding": ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    "layernorm": ("layernorm", "norm"),
}
_LAYER = {
    "layer_norm1": ("layernorm_before", "norm1"),
    "q_proj": ("attention.q_proj", "attention.attention.query", "attn.q"),
    "k_proj": ("attention.k_proj", "attention.attention.key", "attn.k"),
    "v_proj": ("attention.v_proj", "attention.attention.value", "attn.v"),
    "out_proj": ("attention.o_proj", "attention.output.dense", "attn.proj"),
    "layer_norm2": ("layernorm_after", "norm2"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}
_TOP_BY_SOURCE = {source: ours for ours, sources in _TOP.items() for source in sources}
_LAYER_BY_SOURCE = {source: ours for ours, sources in _LAYER.items() for source in sources}
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers|blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
                 "num_channels", "hidden_act", "layer_norm_eps")


def _split_fused_qkv(state) -> dict:
    """DINO's `blocks.{i}.attn.qkv` [3D, …] → `attn.q`, `attn.k`, `attn.v`, the rows in that order."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.attn\.)qkv\.(weight|bias)", key)
        if match:
            for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
                out[f"{match[1]}{name}.{match[2]}"] = part
        else:
            out[key] = value
    return out


def flax_path(key: str, ndim: int) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform); layers as `layers_{i}` (stacked later), or None."""
    key = key.removeprefix("vit.")
    if key in _TOP_BY_SOURCE:  # the class token and position embeddings drop their leading 1s
        ours = _TOP_BY_SOURCE[key]
        return ("params", ours), lambda w: w.reshape(w.shape[-2:] if ours == "position_embedding" else w.shape[-1:])
    match = _LAYER_KEY.fullmatch(key)
    if match:
        module, leaf = _LAYER_BY_SOURCE.get(match[2]), match[3]
        prefix = ("params", "encoder", f"layers_{match[1]}")
    else:
        module_name, _, leaf = key.rpartition(".")
        module, prefix = _TOP_BY_SOURCE.get(module_name), ("params",)
    if module is None:
        return None
    if leaf == "bias":
        return (*prefix, module, "bias"), core.identity
    if ndim == 1:
        return (*prefix, module, "scale"), core.identity
    return (*prefix, module, "kernel"), core.conv2d if ndim == 4 else core.linear


def _stack(path):
    match = re.fullmatch(r"layers_(\d+)", path[2]) if len(path) > 2 and path[1] == "encoder" else None
    return (("params", "encoder", "layers", *path[3:]), int(match[1])) if match else None


def abstract_params(config: ViTConfig):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(ViTModel(config).init, jax.random.key(0), *example_inputs(config))


def convert_vit(state_dict, config: ViTConfig) -> dict:
    """A ViTModel (transformers) or DINO state dict → our ViTModel {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every parameter
    without a source key and every shape mismatch.
    """
    state = _split_fused_qkv(state_dict)
    return core.convert(state, lambda k, v: flax_path(k, np.ndim(v)), abstract_params(config),
                        ignore=_IGNORED, stack=_stack, what="ViT checkpoint")


def check_hf_config(hf_config: dict, config: ViTConfig, what: str = "ViT checkpoint") -> None:
    """Raises `core.ConversionError` naming every field where a transformers ViTConfig dict and ours differ."""
    theirs = ViTConfig.from_hf(hf_config)
    core.check_config(what, {name: (getattr(theirs, name), getattr(config, name)) for name in _ARCHITECTURE})


def load_vit(path: str, config: ViTConfig) -> dict:
    """A transformers ViT directory (config.json + weights), or a weights file (e.g. DINO's .pth) → params.

    A config.json beside the weights is checked against `config` first.
    """
    beside = core.config_beside(path)
    if beside is not None:
        check_hf_config(beside, config, what=f"checkpoint {path!r}")
    return convert_vit(core.load_state_dict(path), config)


def verify_vit(torch_model, params, config: ViTConfig, seed: int = 0, *, batch: int = 2,
               size: int | tuple[int, int] | None = None) -> float:
    """Max abs difference of every hidden state and the final states between transformers and ours.

    Args:
      torch_model: a transformers ViTModel, or a directory saved by one.
      params: our converted params ({"params": ...}).
      size: image side or (height, width); by default the configured one (others
        interpolate the position embeddings).
    """
    import torch
    import transformers

    if isinstance(torch_model, str):
        torch_model = transformers.ViTModel.from_pretrained(torch_model, add_pooling_layer=False, local_files_only=True)
    torch_model = torch_model.float().eval()
    check_hf_config(torch_model.config.to_dict(), config, what="the torch ViT model")
    height, width = (size, size) if isinstance(size, int) else size or (config.image_size,) * 2
    pixels = np.random.default_rng(seed).normal(size=(batch, height, width, config.num_channels)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True,
                          output_hidden_states=True)
    want = [*out.hidden_states, out.last_hidden_state]
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, pixels)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs to compare with {len(want)} from transformers")
    return max(float(np.max(np.abs(np.asarray(g) - w.numpy()))) for g, w in zip(got, want))


@functools.lru_cache(maxsize=8)
def _forward(config: ViTConfig):
    model = ViTModel(config)

    def forward(params, pixels):
        out = model.apply(params, pixels, hidden_layers=tuple(range(config.num_layers + 1)))
        return [*out.hidden_states, out.last_hidden_state]

    return jax.jit(forward)
