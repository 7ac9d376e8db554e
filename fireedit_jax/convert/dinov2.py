"""transformers Dinov2Model / Dinov2WithRegistersModel state dicts → our DINOv2 params (models/dinov2.py).

Accepted layouts (both models, optionally under a `dinov2.` / `dinov2_with_registers.`
prefix, as in *ForImageClassification, whose `classifier.` is ignored):
  saved files (the hub's, and what transformers 5 `save_pretrained` writes):
      encoder.layer.{i}.attention.attention.query|key|value, attention.output.dense,
      mlp.weights_in (SwiGLU gate and up, fused along the output axis), mlp.weights_out
  transformers 5 modules' own state_dict():
      encoder.layer.{i}.attention.q_proj|k_proj|v_proj|o_proj, mlp.gate_proj|up_proj|down_proj
`embeddings.mask_token` (masked-image pre-training only) is ignored.

`encoder.layer.3.attention.attention.query.weight` → params/layers/q_proj/kernel[3] (transposed),
`encoder.layer.3.norm1.weight` → params/layers/norm1/scale[3], `….layer_scale1.lambda1` →
params/layers/layer_scale1[3], `embeddings.patch_embeddings.projection.weight` →
params/patch_embedding/kernel (HWIO), `embeddings.position_embeddings` [1, 1+g², D] →
params/position_embeddings [1+g², D], `layernorm.weight` → params/layernorm/scale.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.dinov2 import DINOv2Config, DINOv2Model, example_inputs

_IGNORED = (r"(^|\.)mask_token$", r"^classifier\.")
_PREFIX = re.compile(r"^(dinov2|dinov2_with_registers)\.")
# Saved-file module names → transformers 5's (and ours).
_SAVED_NAMES = {
    "attention.attention.query": "q_proj",
    "attention.attention.key": "k_proj",
    "attention.attention.value": "v_proj",
    "attention.output.dense": "o_proj",
    "attention.q_proj": "q_proj",
    "attention.k_proj": "k_proj",
    "attention.v_proj": "v_proj",
    "attention.o_proj": "o_proj",
    "mlp.weights_out": "down_proj",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_TOP = {
    "embeddings.cls_token": (("cls_token",), lambda a: a.reshape(a.shape[-1])),
    "embeddings.register_tokens": (("register_tokens",), lambda a: a.reshape(a.shape[-2:])),
    "embeddings.position_embeddings": (("position_embeddings",), lambda a: a.reshape(a.shape[-2:])),
    "embeddings.patch_embeddings.projection.weight": (("patch_embedding", "kernel"), core.conv2d),
    "embeddings.patch_embeddings.projection.bias": (("patch_embedding", "bias"), core.identity),
    "layernorm.weight": (("layernorm", "scale"), core.identity),
    "layernorm.bias": (("layernorm", "bias"), core.identity),
}
# Fields that change the weights or the outputs; layerscale_value (an initial value) and remat do neither.
_ARCHITECTURE = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "hidden_act", "layer_norm_eps", "image_size",
                 "patch_size", "num_channels", "qkv_bias", "use_swiglu_ffn", "num_register_tokens", "antialias")


def _split_fused_swiglu(state):
    """`mlp.weights_in` [2F, …] → `mlp.gate_proj` (first half) and `mlp.up_proj`, as transformers 5 loads it."""
    out = {}
    for key, value in state.items():
        if ".mlp.weights_in." in key:
            gate, up = np.split(np.asarray(value), 2, axis=0)
            out[key.replace("weights_in", "gate_proj")] = gate
            out[key.replace("weights_in", "up_proj")] = up
        else:
            out[key] = value
    return out


def flax_path(key: str, ndim: int) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key (prefix removed) → (our param path, transform); layers as `layers_{i}` (stacked later), or None."""
    if key in _TOP:
        path, transform = _TOP[key]
        return ("params", *path), transform
    match = _LAYER.match(key)
    if match is None:
        return None
    layer, module, leaf = match.groups()
    module = _SAVED_NAMES.get(module, module.removeprefix("mlp."))
    if leaf == "lambda1":
        return ("params", f"layers_{layer}", module), core.identity
    if leaf == "bias":
        return ("params", f"layers_{layer}", module, "bias"), core.identity
    if ndim == 1:  # norms
        return ("params", f"layers_{layer}", module, "scale"), core.identity
    return ("params", f"layers_{layer}", module, "kernel"), core.linear


def _stack(path):
    match = re.fullmatch(r"layers_(\d+)", path[1])
    return (("params", "layers", *path[2:]), int(match[1])) if match else None


def abstract_params(config: DINOv2Config):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(DINOv2Model(config).init, jax.random.key(0), *example_inputs(config))


def convert_dinov2(state_dict, config: DINOv2Config) -> dict:
    """A Dinov2Model / Dinov2WithRegistersModel state dict (either layout above) → our {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every parameter
    without a source key (e.g. register_tokens when the checkpoint has none) and every
    shape mismatch.
    """
    state = _split_fused_swiglu({_PREFIX.sub("", k): v for k, v in state_dict.items()})
    expected = abstract_params(config)
    known = core.flat_shapes(expected)

    def rename(key, value):
        target = flax_path(key, np.ndim(value))
        if target is None:
            return None
        stacked = _stack(target[0])
        # Keys whose path the model lacks are reported as unexpected, under their own name.
        return target if (stacked[0] if stacked else target[0]) in known else None

    return core.convert(state, rename, expected, ignore=_IGNORED, stack=_stack, what="DINOv2 checkpoint")


def check_hf_config(hf_config: dict, config: DINOv2Config, what: str = "DINOv2 checkpoint") -> None:
    """Raises `core.ConversionError` naming every field where a transformers config dict and ours differ."""
    theirs = DINOv2Config.from_hf(hf_config)
    core.check_config(what, {name: (getattr(theirs, name), getattr(config, name)) for name in _ARCHITECTURE})


def load_dinov2(path: str, config: DINOv2Config) -> dict:
    """A transformers DINOv2 directory (config.json + weights) or weights file → our params.

    A config.json beside the weights is checked against `config` first.
    """
    beside = core.config_beside(path)
    if beside is not None:
        check_hf_config(beside, config, what=f"checkpoint {path!r}")
    return convert_dinov2(core.load_state_dict(path), config)


def _torch_model(torch_model, config: DINOv2Config):
    """The transformers Dinov2Model / Dinov2WithRegistersModel of a module or directory, its config checked."""
    if isinstance(torch_model, str):
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(torch_model, local_files_only=True)
        torch_model = transformers.AutoModel.from_pretrained(torch_model, config=hf_config, local_files_only=True)
    for base in ("dinov2", "dinov2_with_registers"):  # *ForImageClassification holds the model
        torch_model = getattr(torch_model, base, torch_model)
    check_hf_config(torch_model.config.to_dict(), config, what="the torch DINOv2 model")
    return torch_model.float().eval()


def verify_dinov2(torch_model, params, config: DINOv2Config, seed: int = 0, *, batch: int = 2,
                  size: tuple[int, int] | None = None) -> float:
    """Max abs difference of every hidden state and last_hidden_state between transformers and ours.

    Args:
      torch_model: a transformers Dinov2Model / Dinov2WithRegistersModel (or a model holding
        one as `.dinov2` / `.dinov2_with_registers`), or a directory saved by one.
      params: our converted params ({"params": ...}).
      size: (height, width) of the random images; by default the configured image size.
    """
    import torch

    module = _torch_model(torch_model, config)
    height, width = size or (config.image_size, config.image_size)
    pixels = np.random.default_rng(seed).normal(size=(batch, height, width, config.num_channels)).astype(np.float32)
    with torch.no_grad():
        out = module(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    want = [*out.hidden_states, out.last_hidden_state]
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, pixels)
    return max(float(np.max(np.abs(np.asarray(g) - w.numpy()))) for g, w in zip(got, want, strict=True))


@functools.lru_cache(maxsize=8)
def _forward(config: DINOv2Config):
    model = DINOv2Model(config)

    def forward(params, pixels):
        out = model.apply(params, pixels, hidden_layers=tuple(range(config.num_layers + 1)))
        return [*out.hidden_states, out.last_hidden_state]

    return jax.jit(forward)
