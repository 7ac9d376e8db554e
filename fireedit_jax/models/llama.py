"""LLaMA (transformers' LlamaForCausalLM) with LoRA and new vocabulary rows, no KV cache.

Shapes: B batch, T tokens, D width, N query heads, K key/value heads (grouped-query
attention when K < N), H head dim, F MLP width, V base vocabulary, E new token rows,
L layers.

The layers run under `nn.scan` (params stacked on a leading `layers` axis). The frozen
base may be stored in bfloat16 (`param_dtype`); the LoRA adapters (`lora_a`, `lora_b`
beside the adapted kernels, see nn/lora.py) and the new token rows are always float32.

New tokens (FireEdit's [IMG_i] tokens and template delimiters, see data/tokenizer.py)
take ids V … V+E−1. Their rows live in their own leaves, `new_embed` [E, D] and
`new_lm_head` [D, E], so an optimizer mask can train them alone; logits are
[B, T, V+E] with the new tokens' columns last.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import partitioned
from fireedit_jax.nn.lora import LoRADense
from fireedit_jax.nn.norms import RMSNorm

Dtype = Any

ACTIVATION_AXES = ("activation_batch", None, "activation_embed")

# Path regexes ('/'-joined, see train/masks.py) of the leaves FireEdit trains in the LLM.
LORA_PATTERNS = (r"/lora_[ab]$",)
NEW_ROW_PATTERNS = (r"^params/new_(embed|lm_head)$",)

# transformers' LlamaConfig defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# Ours ← transformers' name.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA dimensions (defaults: Vicuna-7B v1.5, the LLM of LLaVA-1.5-7B) and FireEdit's LoRA.

    `num_kv_heads` None means N (no grouping). The LoRA defaults are FireEdit's
    (r 8, α 16, dropout 0.05 on q_proj and v_proj); `lora_rank=0` turns LoRA off.
    `lora_targets` name any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_new_tokens: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into num_heads {self.num_heads}, "
                f"a multiple of num_kv_heads {self.num_kv_heads}"
            )
        unknown = set(self.lora_targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} not among {PROJECTIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def llama_7b(cls, **overrides) -> LlamaConfig:
        """LLaMA-7B as in Vicuna-7B v1.5 / LLaVA-1.5-7B (6,738,415,616 base params)."""
        return cls(**overrides)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> LlamaConfig:
        """From a transformers LlamaConfig dict (config.json), or a Llava one (its `text_config`).

        Raises ValueError naming a field this model does not implement (another
        activation, biases, RoPE scaling, a head_dim other than D/N). `ours` sets our
        own fields (num_new_tokens, lora_*, remat).
        """
        config = _text_config(config)
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (config.get("attention_bias", False), False),
            "mlp_bias": (config.get("mlp_bias", False), False),
            "rope type": (scaling.get("rope_type", scaling.get("type", "default")), "default"),
        }
        bad = [f"{k}={theirs!r} (supported: {want!r})" for k, (theirs, want) in unsupported.items() if theirs != want]
        fields = hf_fields(config)
        heads, hidden = fields["num_heads"], fields["hidden_size"]
        if config.get("head_dim") not in (None, hidden // heads):
            bad.append(f"head_dim={config['head_dim']!r} (supported: hidden_size / num_attention_heads = {hidden // heads})")
        if bad:
            raise ValueError("LLaMA config not supported: " + "; ".join(bad))
        return cls(**fields, **ours)


def _text_config(config: Mapping[str, Any]) -> dict:
    return dict(config.get("text_config") or config)


def hf_fields(config: Mapping[str, Any]) -> dict:
    """Our dimension fields from a transformers Llama (or Llava) config dict, defaults filled in."""
    config = _text_config(config)
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    fields = {ours: config.get(hf, _HF_DEFAULTS[hf]) for ours, hf in _HF_NAMES.items()}
    fields["num_kv_heads"] = fields["num_kv_heads"] or fields["num_heads"]
    return fields


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rotary_tables(positions, head_dim: int, theta: float):
    """cos, sin: float32[B, T, H] for integer positions [B, T] (HF's duplicated-half layout)."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """x: float[B, T, N, H] rotated by position with HF's rotate_half convention, in float32."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-RMSNorm self-attention (RoPE, GQA, causal + padding mask) and SwiGLU MLP."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    def projection(self, name: str, features: int, axes):
        cfg = self.config
        return LoRADense(
            features,
            axes,
            rank=cfg.lora_rank if name in cfg.lora_targets else 0,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x, mask, cos, sin, deterministic: bool = True):
        """x: float[B, T, D]; mask: bool[B, 1, 1, T] | None; cos, sin: float32[B, T, H].

        Returns (x, x): the new carry and this layer's output (the scan stacks it).
        """
        cfg, det = self.config, deterministic
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        b, t, _ = x.shape
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def attention_block(y):
            q = self.projection("q_proj", n * h, ("embed", "heads"))(y, det).reshape(b, t, n, h)
            key = self.projection("k_proj", k * h, ("embed", "heads"))(y, det).reshape(b, t, k, h)
            v = self.projection("v_proj", k * h, ("embed", "heads"))(y, det).reshape(b, t, k, h)
            q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
            out = dot_product_attention(q, key, v, mask=mask, is_causal=True, implementation=self.attention)
            return self.projection("o_proj", cfg.hidden_size, ("heads", "embed"))(out.reshape(b, t, n * h), det)

        def mlp_block(y):
            gate = self.projection("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(y, det)
            up = self.projection("up_proj", cfg.intermediate_size, ("embed", "mlp"))(y, det)
            return self.projection("down_proj", cfg.hidden_size, ("mlp", "embed"))(nn.silu(gate) * up, det)

        x = x + nn.with_logical_constraint(attention_block(norm("input_layernorm")(x)), ACTIVATION_AXES)
        x = x + nn.with_logical_constraint(mlp_block(norm("post_attention_layernorm")(x)), ACTIVATION_AXES)
        return x, x


@flax.struct.dataclass
class LlamaOutput:
    """logits: float32[B, T, V+E]; last_hidden_state: float[B, T, D] (after the final norm);
    hidden_states: float[L+1, B, T, D] or None — HF's semantics: [0] the input embeddings,
    [i] the output of layer i, [L] the final normed states (= last_hidden_state)."""

    logits: jax.Array
    last_hidden_state: jax.Array
    hidden_states: jax.Array | None = None


def _mean_rows_init(axis: int):
    """Init for new vocabulary rows: the mean of the existing rows (passed as `table`), float32."""

    def init(rng, shape, table):
        del rng
        mean = jnp.mean(jnp.asarray(table, jnp.float32), axis=axis, keepdims=True)
        return jnp.broadcast_to(mean, shape).astype(jnp.float32)

    return init


class Llama(nn.Module):
    """LlamaForCausalLM: embeddings (+ new rows), L scanned decoder layers, RMSNorm, LM head (+ new rows)."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    def setup(self):
        cfg = self.config
        d, v, e = cfg.hidden_size, cfg.vocab_size, cfg.num_new_tokens
        self.embed_tokens = self.param(
            "embed_tokens", partitioned(nn.initializers.normal(0.02), ("vocab", "embed")), (v, d), self.param_dtype
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", partitioned(nn.initializers.normal(0.02), ("embed", "vocab")), (d, v), self.param_dtype
            )
        if e:
            self.new_embed = self.param(
                "new_embed", partitioned(_mean_rows_init(0), (None, "embed")), (e, d), self.embed_tokens
            )
            if not cfg.tie_word_embeddings:
                self.new_lm_head = self.param(
                    "new_lm_head", partitioned(_mean_rows_init(1), ("embed", None)), (d, e), self.lm_head
                )
        # `deterministic` (argument 5, counting self) is a Python bool: static under remat.
        layer = nn.remat(DecoderLayer, prevent_cse=False, static_argnums=(5,)) if cfg.remat else DecoderLayer
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 4,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.param_dtype, self.attention)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        """int[B, T] → float[B, T, D]: base rows for ids < V, new rows for V ≤ id < V+E."""
        v = self.config.vocab_size
        x = jnp.take(self.embed_tokens, jnp.clip(input_ids, 0, v - 1), axis=0).astype(self.dtype)
        if self.config.num_new_tokens:
            new = jnp.take(self.new_embed, jnp.clip(input_ids - v, 0, self.config.num_new_tokens - 1), axis=0)
            x = jnp.where((input_ids >= v)[..., None], new.astype(self.dtype), x)
        return x

    def logits(self, x):
        """float[B, T, D] (normed) → float32[B, T, V+E]."""
        cfg = self.config
        x = x.astype(self.dtype)
        head = self.embed_tokens.T if cfg.tie_word_embeddings else self.lm_head
        heads = [head]
        if cfg.num_new_tokens:
            heads.append(self.new_embed.T if cfg.tie_word_embeddings else self.new_lm_head)
        return jnp.concatenate([jnp.einsum("btd,dv->btv", x, w.astype(self.dtype)) for w in heads], -1).astype(jnp.float32)

    def __call__(
        self,
        input_ids=None,
        *,
        inputs_embeds=None,
        attention_mask=None,
        positions=None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ):
        """Runs the LM on token ids or on ready embeddings (e.g. with image tokens spliced in).

        Args:
          input_ids: int[B, T], or None when `inputs_embeds` is given.
          inputs_embeds: float[B, T, D] (e.g. `embed(ids)` with rows replaced).
          attention_mask: bool[B, T], True on real tokens (right padding); None = all real.
          positions: int[B, T] RoPE positions; default 0…T−1 (as transformers).
          output_hidden_states: also return the [L+1, B, T, D] stack.
          deterministic: False turns LoRA dropout on (needs a "dropout" rng).
        Returns:
          LlamaOutput.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t, _ = x.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed max_position_embeddings {self.config.max_position_embeddings}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        out, per_layer = self.layers(x, mask, cos, sin, deterministic)
        last = self.norm(out)
        hidden = None
        if output_hidden_states:
            hidden = jnp.concatenate([x[None], per_layer[:-1], last[None]], axis=0)
        return LlamaOutput(logits=self.logits(last), last_hidden_state=last, hidden_states=hidden)


def init_new_rows(params):
    """Sets `new_embed` / `new_lm_head` to the mean of the base rows (float32), e.g. after conversion.

    params: {"params": {...}} unboxed; returned as a new dict, other leaves shared.
    """
    p = dict(params["params"])
    if "new_embed" not in p:
        return params
    e = p["new_embed"].shape[0]
    p["new_embed"] = _mean_rows_init(0)(None, (e, p["embed_tokens"].shape[1]), p["embed_tokens"])
    if "new_lm_head" in p:
        p["new_lm_head"] = _mean_rows_init(1)(None, (p["lm_head"].shape[0], e), p["lm_head"])
    return {**params, "params": p}
