"""SmartEdit's Q-Former: BLIP-2's querying transformer from LLM [IMG] states to 77 CLIP-like tokens.

Shapes: B batch, Q query tokens (77), S encoder tokens (the 32 [IMG] states), E encoder
width (4096, the LLM's), D width (768), N heads, H head dim (D/N), F FFN width, L layers.

A BERT encoder without word/position embeddings or text FFN (LAVIS' Qformer as SmartEdit
builds it, transformers' Blip2QFormerModel with `query_embeds`): learnable query tokens
→ LayerNorm → L post-LN layers of
  x = LN(x + SelfAttn(x));  x = LN(x + CrossAttn(x, encoder)) every `cross_attention_freq`
  layers (0, 2, 4);  x = LN(x + FFN_query(x)),
and the last hidden state is the output (no pooler, no projection). The six layers
alternate in structure and are few, so they are unrolled (`layers_0` … `layers_5`).

Dropout (BERT's 0.1) applies to the embeddings and after each sublayer's output
projection when `deterministic=False` (needs a "dropout" rng); attention-probability
dropout is not reproduced, since the shared attention kernel has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.linear import dense, partitioned
from fireedit_jax.nn.multihead import MultiHeadAttention
from fireedit_jax.nn.norms import LayerNorm

Dtype = Any

# Ours ← transformers' Blip2QFormerConfig name, then the BertConfig name LAVIS / SmartEdit set.
_HF_NAMES = {
    "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",),
    "num_heads": ("num_attention_heads",),
    "intermediate_size": ("intermediate_size",),
    "cross_attention_freq": ("cross_attention_frequency", "cross_attention_freq"),
    "encoder_width": ("encoder_hidden_size", "encoder_width"),
    "layer_norm_eps": ("layer_norm_eps",),
    "dropout": ("hidden_dropout_prob",),
}
# transformers' Blip2QFormerConfig defaults, for fields a config dict leaves out.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_freq": 2,
    "encoder_width": 1408,
    "layer_norm_eps": 1e-12,
    "dropout": 0.1,
}


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Q-Former dimensions; the defaults are SmartEdit's (bert-base, 6 layers, 77 queries, LLaMA-7B input)."""

    num_queries: int = 77
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2  # cross-attention in layers 0, freq, 2·freq, …
    encoder_width: int = 4096
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden dropout, active only with deterministic=False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_heads} heads")
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be ≥ 1, got {self.cross_attention_freq}")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    @classmethod
    def smartedit(cls, **overrides) -> QFormerConfig:
        """SmartEdit's / FireEdit's Q-Former (LLaMA-7B [IMG] states → 77 × 768)."""
        return cls(**overrides)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> QFormerConfig:
        """From a transformers Blip2QFormerConfig dict, a Blip2Config dict (its `qformer_config`
        and `num_query_tokens`), or the BertConfig dict LAVIS / SmartEdit build
        (`encoder_width`, `cross_attention_freq`, `query_length`). `ours` sets or overrides fields.
        """
        qformer = dict(config.get("qformer_config") or config)
        fields = {}
        for name, aliases in _HF_NAMES.items():
            found = [qformer[a] for a in aliases if a in qformer]
            fields[name] = found[0] if found else _HF_DEFAULTS[name]
        num_queries = config.get("num_query_tokens", qformer.get("query_length"))
        if num_queries is not None:
            fields["num_queries"] = num_queries
        if qformer.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {qformer['hidden_act']!r} not supported: the Q-Former uses exact GELU")
        return cls(**{**fields, **ours})


class QFormerLayer(nn.Module):
    """Self-attention, cross-attention to the encoder (if `cross`), query FFN; each a post-LN residual.

    Params: self_attention/{query,key,value,output}, self_attention_norm, cross_attention/…,
    cross_attention_norm, ffn_in, ffn_out, ffn_norm.
    """

    config: QFormerConfig
    cross: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, encoder_states, encoder_mask, deterministic: bool = True):
        """x: float[B, Q, D]; encoder_states: float[B, S, E]; encoder_mask: bool[B, S] | None → float[B, Q, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def residual(name, x, update):  # BERT's LN(x + dropout(update))
            update = nn.Dropout(cfg.dropout)(update, deterministic=deterministic)
            return LayerNorm(cfg.layer_norm_eps, name=f"{name}_norm", **kw)(x + update)

        def attend(name, x, context, mask):
            return MultiHeadAttention(cfg.num_heads, attention=self.attention, name=name, **kw)(x, context, mask)

        x = residual("self_attention", x, attend("self_attention", x, x, None))
        if self.cross:
            x = residual("cross_attention", x, attend("cross_attention", x, encoder_states, encoder_mask))
        h = jax.nn.gelu(dense(cfg.intermediate_size, ("embed", "mlp"), name="ffn_in", **kw)(x), approximate=False)
        return residual("ffn", x, dense(cfg.hidden_size, ("mlp", "embed"), name="ffn_out", **kw)(h))


class QFormer(nn.Module):
    """Learnable query tokens → LayerNorm → L QFormerLayers (`layers_{i}`); params also
    `query_tokens` [Q, D] (N(0, 0.02)) and `embed_norm`."""

    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, encoder_states, encoder_mask=None, *, deterministic: bool = True):
        """Maps encoder states to Q query outputs.

        Args:
          encoder_states: float[B, S, E], e.g. the LLM's final hidden states at the 32 [IMG]
            positions (or all positions with `encoder_mask` selecting the [IMG] ones, as
            SmartEdit's training does).
          encoder_mask: bool[B, S], True where the cross-attention may look; None = everywhere.
            Each row needs at least one True.
          deterministic: False turns hidden dropout on (needs a "dropout" rng).
        Returns:
          float[B, Q, D]: the last hidden state.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = encoder_states.shape[0]
        if encoder_states.shape[-1] != cfg.encoder_width:
            raise ValueError(
                f"encoder states are {encoder_states.shape[-1]} wide, the Q-Former expects {cfg.encoder_width}"
            )
        queries = self.param("query_tokens", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                             (cfg.num_queries, cfg.hidden_size), self.param_dtype)
        x = LayerNorm(cfg.layer_norm_eps, name="embed_norm", **kw)(jnp.broadcast_to(queries, (b, *queries.shape)))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        encoder_states = encoder_states.astype(self.dtype)
        for i in range(cfg.num_layers):
            layer = QFormerLayer(cfg, cfg.has_cross_attention(i), attention=self.attention, name=f"layers_{i}", **kw)
            x = layer(x, encoder_states, encoder_mask, deterministic)
        return x


def example_inputs(config: QFormerConfig, batch: int = 1, length: int = 32):
    """Zero encoder states, e.g. for `jax.eval_shape(QFormer(cfg).init, rng, *example_inputs(cfg))`."""
    return (jnp.zeros((batch, length, config.encoder_width), jnp.float32),)
