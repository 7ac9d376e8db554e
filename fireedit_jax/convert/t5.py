"""transformers T5 state dicts → our T5 encoder params (models/t5.py).

Accepted: a T5EncoderModel, or a full T5Model / T5ForConditionalGeneration (its `decoder.*`
and `lm_head` ignored). The token embedding is `shared.weight`, tied to
`encoder.embed_tokens.weight`: either or both may be present (both must then be equal).

`encoder.block.3.layer.0.SelfAttention.q.weight` → params/layers/q/kernel[3] (transposed),
`….layer.0.layer_norm.weight` → params/layers/attention_norm/scale[3],
`….layer.1.DenseReluDense.wi_0.weight` → params/layers/wi_0/kernel[3],
`….layer.1.layer_norm.weight` → params/layers/mlp_norm/scale[3],
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight` → params/relative_attention_bias,
`encoder.final_layer_norm.weight` → params/final_layer_norm/scale, `shared.weight` → params/shared.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.t5 import T5Encoder, T5EncoderConfig

_IGNORED = (r"^decoder\.", r"^lm_head\.")
_TIED = ("shared.weight", "encoder.embed_tokens.weight")
_TOP = {
    "shared.weight": (("params", "shared"), core.identity),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
        ("params", "relative_attention_bias"), core.identity),
    "encoder.final_layer_norm.weight": (("params", "final_layer_norm", "scale"), core.identity),
}  # fmt: skip
# Key within `encoder.block.{i}.` → our module under params/layers (weights → kernel, norms → scale).
_LAYER = {
    "layer.0.layer_norm": "attention_norm",
    **{f"layer.0.SelfAttention.{p}": p for p in "qkvo"},
    "layer.1.layer_norm": "mlp_norm",
    **{f"layer.1.DenseReluDense.{p}": p for p in ("wi", "wi_0", "wi_1", "wo")},
}
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)\.weight")
# Fields that change the weights or the outputs; remat does neither.
_ARCHITECTURE = tuple(f.name for f in dataclasses.fields(T5EncoderConfig) if f.name != "remat")


def flax_path(key: str) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform); layers as `layers_{i}` (stacked later), or None."""
    if key in _TOP:
        return _TOP[key]
    match = _BLOCK.fullmatch(key)
    if match is None or match[2] not in _LAYER:
        return None
    module = _LAYER[match[2]]
    leaf, transform = ("scale", core.identity) if module.endswith("_norm") else ("kernel", core.linear)
    return ("params", f"layers_{match[1]}", module, leaf), transform


def _stack(path):
    match = re.fullmatch(r"layers_(\d+)", path[1])
    return (("params", "layers", *path[2:]), int(match[1])) if match else None


def abstract_params(config: T5EncoderConfig):
    """The encoder's boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(T5Encoder(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def _untie(state_dict) -> dict:
    """The state dict with the token embedding under `shared.weight` only."""
    state = dict(state_dict)
    embed = state.pop(_TIED[1], None)
    if embed is not None:
        shared = state.setdefault(_TIED[0], embed)
        if not np.array_equal(shared, embed):
            raise core.ConversionError(f"{_TIED[0]} and {_TIED[1]} differ: T5's encoder embeddings are tied")
    return state


def convert_t5(state_dict, config: T5EncoderConfig) -> dict:
    """A T5EncoderModel, T5Model or T5ForConditionalGeneration state dict → our T5Encoder {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key (e.g. `wi` in a
    gated-gelu model), every parameter without a source key and every shape mismatch.
    """
    expected = abstract_params(config)
    known = core.flat_shapes(expected)

    def rename(key, value):
        target = flax_path(key)
        if target is None:
            return None
        stacked = _stack(target[0])
        # Keys whose path the model lacks are reported as unexpected, under their own name.
        return target if (stacked[0] if stacked else target[0]) in known else None

    return core.convert(_untie(state_dict), rename, expected, ignore=_IGNORED, stack=_stack, what="T5 checkpoint")


def check_hf_config(hf_config: dict, config: T5EncoderConfig, what: str = "T5 checkpoint") -> None:
    """Raises `core.ConversionError` naming every field where a transformers config dict and ours differ."""
    theirs = T5EncoderConfig.from_hf(hf_config)
    core.check_config(what, {name: (getattr(theirs, name), getattr(config, name)) for name in _ARCHITECTURE})


def load_t5(path: str, config: T5EncoderConfig) -> dict:
    """A transformers T5 directory (config.json + weights) or weights file → our encoder params.

    A config.json beside the weights is checked against `config` first.
    """
    beside = core.config_beside(path)
    if beside is not None:
        check_hf_config(beside, config, what=f"checkpoint {path!r}")
    return convert_t5(core.load_state_dict(path), config)


def _torch_encoder(torch_model, config: T5EncoderConfig):
    """The transformers T5 encoder stack of a model or directory, its config checked."""
    import transformers

    if isinstance(torch_model, str):  # any T5 checkpoint loads as an encoder (decoder keys are dropped)
        torch_model = transformers.T5EncoderModel.from_pretrained(torch_model, local_files_only=True)
    check_hf_config(torch_model.config.to_dict(), config, what="the torch T5 model")
    return torch_model.float().eval().encoder


def verify_t5(torch_model, params, config: T5EncoderConfig, seed: int = 0, *, batch: int = 2,
              length: int = 16) -> float:
    """Max abs difference of the last hidden states between transformers and ours.

    Args:
      torch_model: a transformers T5EncoderModel, T5Model or T5ForConditionalGeneration, or a
        directory saved by one.
      params: our converted params ({"params": ...}).
    Random token ids, right-padded (row i has length − 3i real tokens); padded positions
    are compared too (both models mask only keys).
    """
    import torch

    encoder = _torch_encoder(torch_model, config)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    mask = np.arange(length)[None, :] < np.maximum(length - 3 * np.arange(batch), 1)[:, None]
    with torch.no_grad():
        want = encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, ids, mask)
    return float(np.max(np.abs(np.asarray(got) - want.numpy())))


@functools.lru_cache(maxsize=8)
def _forward(config: T5EncoderConfig):
    model = T5Encoder(config)
    return jax.jit(lambda params, ids, mask: model.apply(params, ids, mask))
