"""T5 / FLAN-T5 encoder (transformers' T5EncoderModel).

Shapes: B batch, T tokens, D width (d_model), N heads, H head dim (d_kv; N·H need not be D),
F feed-forward width (d_ff), L layers, V vocabulary, R relative-position buckets.

Pre-norm residual layers: x += Attn(norm(x)); x += FFN(norm(x)), then a final norm. The
norms are T5's (RMS: no mean subtraction, no bias, in float32). Attention is unscaled (no
1/√H) and adds a learnt relative-position bias [N, T, T]: transformers keeps its table in
layer 0 only and reuses layer 0's bias in every layer, so here it is computed once, before
the layers, from one table [R, N]. The FFN is FLAN-T5's gated GELU (tanh approximation,
wi_0 gating wi_1) or the original T5's ReLU. The L layers run under `nn.scan` (params
stacked on a leading `layers` axis). No dropout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fireedit_jax.nn.attention import dot_product_attention
from fireedit_jax.nn.linear import dense, partitioned
from fireedit_jax.nn.norms import RMSNorm

Dtype = Any

ACTIVATION_AXES = ("activation_batch", None, "activation_embed")
# feed_forward_proj → (gated, activation). "gated-gelu" is transformers' gelu_new (tanh approximation).
FEED_FORWARD = {
    "gated-gelu": (True, lambda x: jax.nn.gelu(x, approximate=True)),
    "relu": (False, jax.nn.relu),
}
# transformers' T5Config defaults (its names are ours), for fields a config.json leaves out.
_HF_DEFAULTS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """T5 encoder dimensions; defaults are google/flan-t5-base's."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            supported = sorted(FEED_FORWARD)
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} not supported: one of {supported}")

    @classmethod
    def flan_t5_base(cls, **overrides) -> T5EncoderConfig:
        """google/flan-t5-base's encoder (109,628,544 params)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> T5EncoderConfig:
        """For tests: 32 wide, 2 layers of 4 heads of 8."""
        fields = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20)  # fmt: skip
        return cls(**{**fields, **overrides})

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **ours) -> T5EncoderConfig:
        """From a transformers T5Config dict (config.json of a T5EncoderModel, T5Model or
        T5ForConditionalGeneration); `ours` sets our own fields (remat)."""
        return cls(**{name: config.get(name, default) for name, default in _HF_DEFAULTS.items()}, **ours)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32[T, S]: T5's bidirectional bucket of each (query, key) offset.

    Half the buckets per direction; in each, exact offsets below a quarter of `num_buckets`,
    then logarithmically wider ones up to `max_distance`, beyond which all share the last.
    Computed in float32 in transformers' order of operations, so boundaries round as there.
    """
    offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.abs(offset)
    exact = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) at offset 0, which is exact
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    spread = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + np.where(exact, 0, spread).astype(np.int64), half - 1)
    return ((offset > 0) * half + np.where(exact, distance, large)).astype(np.int32)


class EncoderLayer(nn.Module):
    """Self-attention with the shared position bias, then the feed-forward block, both pre-norm."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    def projection(self, features: int, axes, name: str):
        return dense(features, axes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def norm(self, name: str):
        return RMSNorm(self.config.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, position_bias, mask):
        """x: float[B, T, D]; position_bias: float32[1, N, T, T]; mask: bool[B, 1, 1, T] | None → (x, None)."""
        cfg = self.config
        b, t, d = x.shape
        n, h, f = cfg.num_heads, cfg.d_kv, cfg.d_ff

        y = self.norm("attention_norm")(x)
        q, k, v = (self.projection(n * h, ("embed", "heads"), p)(y).reshape(b, t, n, h) for p in "qkv")
        y = dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0, implementation=self.attention)
        y = self.projection(d, ("heads", "embed"), "o")(y.reshape(b, t, n * h))
        x = x + nn.with_logical_constraint(y, ACTIVATION_AXES)

        y = self.norm("mlp_norm")(x)
        gated, activation = FEED_FORWARD[cfg.feed_forward_proj]
        if gated:  # act(wi_0·y) gates wi_1·y
            gate = activation(self.projection(f, ("embed", "mlp"), "wi_0")(y))
            y = gate * self.projection(f, ("embed", "mlp"), "wi_1")(y)
        else:
            y = activation(self.projection(f, ("embed", "mlp"), "wi")(y))
        x = x + nn.with_logical_constraint(self.projection(d, ("mlp", "embed"), "wo")(y), ACTIVATION_AXES)
        return x, None


class T5Encoder(nn.Module):
    """Shared token embedding, relative position bias, L scanned EncoderLayers, final norm."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Encodes token ids.

        Args:
          input_ids: int[B, T].
          attention_mask: bool/int[B, T], true on real tokens (padded keys are not attended
            to); None = all real.
        Returns:
          float[B, T, D]: the last hidden states, after the final norm.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = input_ids.shape[1]
        # T5 does not scale its embeddings, so they are initialised at unit scale (as transformers).
        shared = self.param("shared", partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                            (cfg.vocab_size, cfg.d_model), self.param_dtype)  # fmt: skip
        r = cfg.relative_attention_num_buckets
        table_init = partitioned(nn.initializers.normal(cfg.d_model**-0.5), (None, None))  # tiny [R, N]: replicated
        table = self.param("relative_attention_bias", table_init, (r, cfg.num_heads), self.param_dtype)
        buckets = relative_position_buckets(t, t, r, cfg.relative_attention_max_distance)  # static: T is a shape
        position_bias = jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)[None]  # [1, N, T, T]

        x = nn.with_logical_constraint(jnp.take(shared, input_ids, axis=0).astype(self.dtype), ACTIVATION_AXES)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        layer = nn.remat(EncoderLayer, prevent_cse=False) if cfg.remat else EncoderLayer
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, attention=self.attention, name="layers", **kw)
        x, _ = layers(x, position_bias, mask)
        return RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x)

