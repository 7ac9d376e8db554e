"""LLaMA state dicts → our Llama params (models/llama.py).

Accepted layouts (the language model only; vision towers and projectors are ignored):
  transformers LlamaForCausalLM and original LLaVA / Vicuna checkpoints:
      model.embed_tokens, model.layers.{i}.…, model.norm, lm_head
      (LLaVA's model.mm_projector.* and model.vision_tower.* are ignored)
  llava-hf LlavaForConditionalGeneration, transformers 4:
      language_model.model.{embed_tokens, layers.{i}.…, norm}, language_model.lm_head
  llava-hf LlavaForConditionalGeneration, transformers 5:
      model.language_model.{embed_tokens, layers.{i}.…, norm}, lm_head

`model.layers.3.self_attn.q_proj.weight` → params/layers/q_proj/kernel[3] (transposed),
`….input_layernorm.weight` → params/layers/input_layernorm/scale[3], `model.embed_tokens.weight`
→ params/embed_tokens, `lm_head.weight` → params/lm_head (transposed, [D, V]). The LoRA
adapters and the new token rows are not in these checkpoints: they are initialised fresh
(A as PEFT, B = 0; new rows at the mean of the base rows).
"""

from __future__ import annotations

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.llama import LORA_PATTERNS, NEW_ROW_PATTERNS, Llama, LlamaConfig, hf_fields, init_new_rows

FRESH = LORA_PATTERNS + NEW_ROW_PATTERNS
IGNORE = (
    r"rotary_emb\.inv_freq$",
    r"(^|\.)mm_projector\.",
    r"(^|\.)vision_tower\.",
    r"(^|\.)multi_modal_projector\.",
)
# Prefixes of the language model's modules in each layout, longest first.
_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
_LM_HEADS = ("language_model.lm_head.", "lm_head.")
# Fields that change the weights; max_position_embeddings only bounds the input length.
_ARCHITECTURE = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
)


def flax_path(key: str) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform); layers as `layers_{i}` (stacked later), or None."""
    for head in _LM_HEADS:
        if key == head + "weight":
            return ("params", "lm_head"), core.linear
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    else:
        return None
    if key == "embed_tokens.weight":
        return ("params", "embed_tokens"), core.identity
    if key == "norm.weight":
        return ("params", "norm", "scale"), core.identity
    match = re.fullmatch(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.weight", key)
    if match:
        return ("params", f"layers_{match[1]}", match[2], "kernel"), core.linear
    match = re.fullmatch(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", key)
    if match:
        return ("params", f"layers_{match[1]}", match[2], "scale"), core.identity
    return None


def _stack(path):
    match = re.fullmatch(r"layers_(\d+)", path[1])
    return (("params", "layers", *path[2:]), int(match[1])) if match else None


def abstract_params(config: LlamaConfig, param_dtype=jnp.float32):
    """The model's boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(Llama(config, param_dtype=param_dtype).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def convert_llama(state_dict, config: LlamaConfig, *, param_dtype=np.float32, seed: int = 0) -> dict:
    """A LLaMA / LLaVA / Vicuna state dict (see the module docstring) → complete {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key, every parameter
    without a source key and every shape mismatch. Base weights are cast to
    `param_dtype` (numpy, e.g. `jnp.bfloat16`); the fresh LoRA adapters and new rows
    are float32 jax arrays (A from `seed`).
    """
    expected = abstract_params(config)
    ignore = IGNORE + ((r"(^|\.)lm_head\.weight$",) if config.tie_word_embeddings else ())
    converted = core.convert(
        state_dict,
        lambda key, value: flax_path(key),
        expected,
        ignore=ignore,
        fresh=FRESH,
        stack=_stack,
        what="LLaMA checkpoint",
    )
    converted = jax.tree.map(lambda x: np.asarray(x, param_dtype), converted)
    flat = flax.traverse_util.flatten_dict(converted)
    flat.update(flax.traverse_util.flatten_dict(fresh_params(config, seed)))
    return init_new_rows(flax.traverse_util.unflatten_dict(flat))


def fresh_params(config: LlamaConfig, seed: int = 0) -> dict:
    """The leaves no checkpoint holds (LoRA adapters, new rows) as the model initialises them.

    Runs `init` under jit and returns only these leaves, so XLA drops the base
    weights' initialisation: cheap even for 7B.
    """
    return _fresh_init(config)(jax.random.key(seed))


@functools.lru_cache(maxsize=4)
def _fresh_init(config: LlamaConfig):
    model = Llama(config)

    def init(rng):
        params = flax.linen.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32)))
        flat = flax.traverse_util.flatten_dict(params)
        keep = {p: v for p, v in flat.items() if any(re.search(f, "/".join(p)) for f in FRESH)}
        return flax.traverse_util.unflatten_dict(keep)

    return jax.jit(init)


def check_hf_config(hf_config: dict, config: LlamaConfig, what: str = "LLaMA checkpoint") -> None:
    """Raises `core.ConversionError` naming every architecture field where config.json and ours
    differ, then ValueError if the checkpoint uses a feature this model lacks (see `LlamaConfig.from_hf`)."""
    theirs = hf_fields(hf_config)
    core.check_config(what, {name: (theirs[name], getattr(config, name)) for name in _ARCHITECTURE})
    LlamaConfig.from_hf(hf_config)


def load_llama(path: str, config: LlamaConfig, *, param_dtype=np.float32, seed: int = 0) -> dict:
    """Reads a checkpoint directory (config.json + weights, sharded or not) or weights file → params.

    A config.json beside the weights is checked against `config` first (original
    LLaVA directories have one too; their extra multimodal fields are ignored).
    """
    beside = core.config_beside(path)
    if beside is not None:
        check_hf_config(beside, config, what=f"checkpoint {path!r}")
    return convert_llama(core.load_state_dict(path), config, param_dtype=param_dtype, seed=seed)


def verify_llama(torch_model, params, config: LlamaConfig, seed: int = 0, *, batch: int = 2, length: int = 16) -> float:
    """Max abs difference of the base-vocabulary logits between a torch model and ours.

    Args:
      torch_model: a transformers LlamaForCausalLM or LlavaForConditionalGeneration
        (text only), or a directory saved by one.
      params: our params ({"params": ...}); LoRA adapters are applied as `config` says
        (freshly converted ones have B = 0 and change nothing).
    The batch is right-padded (the second row is 3/4 real tokens).
    """
    import torch

    if isinstance(torch_model, str):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        kind = AutoConfig.from_pretrained(torch_model, local_files_only=True).model_type
        loader = AutoModelForImageTextToText if kind == "llava" else AutoModelForCausalLM
        torch_model = loader.from_pretrained(torch_model, local_files_only=True)
    torch_model = torch_model.float().eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    mask = np.ones((batch, length), bool)
    mask[1:, (3 * length) // 4:] = False
    with torch.no_grad():
        want = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, ids, mask)
    got = np.asarray(got)[..., : config.vocab_size]
    return float(np.max(np.abs(got[mask] - want[mask][..., : config.vocab_size])))


@functools.lru_cache(maxsize=8)
def _forward(config: LlamaConfig):
    model = Llama(config)
    return jax.jit(lambda params, ids, mask: model.apply(params, ids, attention_mask=mask).logits)
