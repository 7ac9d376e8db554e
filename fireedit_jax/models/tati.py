"""FireEdit's Time-Aware Target Injection (TATI): ELLA's time-aware perceiver resampler.

Shapes: B batch, S input tokens (the Q-Former's 77), I input width, Q latents (77),
D width (768), N heads, H head dim (D/N), C sinusoidal channels (320), T time-embedding width.

ELLA's TSC connector (TencentQQGYLab/ELLA model.py; REFERENCES.md §3), run at every
denoising step on the edit representation e:

  t_emb   = TimestepMLP(sinusoidal(t, C, [cos, sin], shift 0))            [B, T]
  latents = latents₀ + time_aware_linear(SiLU(t_emb))                      [B, Q, D]
  x       = proj_in(x)                                                     [B, S, D]
  per block (pre-norm; AdaLN(y) = LN(y)·(1 + scale) + shift, (shift, scale) from a
  zero-initialised Linear(SiLU(t_emb)), so at initialisation blocks ignore t):
    l̂ = AdaLN_1(latents);  latents += MHA(q = l̂, kv = [l̂ ‖ AdaLN_2(x)])
    latents += W₂·relu(W₁·AdaLN_ff(latents))²                              (4× wide)
  output: latents, [B, Q, D] — no proj_out (ELLA passes output_dim=None).

MHA is torch's nn.MultiheadAttention: biased q/k/v/output projections, N heads. FireEdit
does not give N; `fireedit()` takes ELLA's 8 (head dim 96) for width 768. The 2 blocks
are unrolled (`blocks_0`, `blocks_1`): too few to gain from a scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fireedit_jax.nn.multihead import MultiHeadAttention
from fireedit_jax.nn.embeddings import TimestepMLP, sinusoidal_embedding
from fireedit_jax.nn.linear import dense, partitioned
from fireedit_jax.nn.norms import AdaLayerNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TATIConfig:
    """TATI dimensions; the defaults are FireEdit's (2 blocks, 77 latents, width 768, ELLA's 8 heads)."""

    num_blocks: int = 2
    num_latents: int = 77
    width: int = 768
    num_heads: int = 8
    input_dim: int = 768  # the Q-Former's output width
    time_channel: int = 320
    time_embed_dim: int = 768
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} does not split into {self.num_heads} heads")

    @classmethod
    def fireedit(cls, **overrides) -> TATIConfig:
        """FireEdit's TATI: N = 2 blocks, 77 latents, width 768 on the 77 × 768 Q-Former output."""
        return cls(**overrides)


class TATIBlock(nn.Module):
    """ELLA's PerceiverAttentionBlock. Params: ln_1, ln_2, ln_ff (AdaLN), attention, mlp_in, mlp_out."""

    config: TATIConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, latents, t_emb):
        """x: float[B, S, D]; latents: float[B, Q, D]; t_emb: float[B, T] → float[B, Q, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ada = lambda name, y: AdaLayerNorm(cfg.layer_norm_eps, name=name, **kw)(y, t_emb)  # noqa: E731
        normed = ada("ln_1", latents)
        context = jnp.concatenate([normed, ada("ln_2", x)], axis=1)
        latents = latents + MultiHeadAttention(cfg.num_heads, attention=self.attention, name="attention", **kw)(
            normed, context
        )
        h = dense(cfg.mlp_ratio * cfg.width, ("embed", "mlp"), name="mlp_in", **kw)(ada("ln_ff", latents))
        return latents + dense(cfg.width, ("mlp", "embed"), name="mlp_out", **kw)(jnp.square(jax.nn.relu(h)))


class TATI(nn.Module):
    """Time embedding, time-shifted learnable latents, proj_in, `num_blocks` TATIBlocks.

    Params: time_embedding/{linear_1,linear_2}, latents [Q, D] (N(0, D^-1/2)),
    time_aware_linear, proj_in, blocks_{i}.
    """

    config: TATIConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, timesteps):
        """Resamples the edit representation for one diffusion timestep.

        Args:
          x: float[B, S, I], the Q-Former output (or the null text embedding).
          timesteps: float[B] (or a scalar, shared by the batch): the raw scheduler
            timestep (0 … 999), as the UNet receives it.
        Returns:
          float[B, Q, D].
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = x.shape[0]
        if x.shape[-1] != cfg.input_dim:
            raise ValueError(f"inputs are {x.shape[-1]} wide, TATI expects {cfg.input_dim}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        t = sinusoidal_embedding(timesteps, cfg.time_channel, flip_sin_to_cos=True, freq_shift=0.0)
        t_emb = TimestepMLP(cfg.time_embed_dim, name="time_embedding", **kw)(t.astype(self.dtype))

        latents = self.param("latents", partitioned(nn.initializers.normal(cfg.width**-0.5), (None, "embed")),
                             (cfg.num_latents, cfg.width), self.param_dtype)
        shift = dense(cfg.width, ("embed", "mlp"), name="time_aware_linear", **kw)(nn.silu(t_emb))
        latents = latents.astype(self.dtype)[None] + shift[:, None, :]
        x = dense(cfg.width, ("embed", "mlp"), name="proj_in", **kw)(x.astype(self.dtype))
        for i in range(cfg.num_blocks):
            latents = TATIBlock(cfg, attention=self.attention, name=f"blocks_{i}", **kw)(x, latents, t_emb)
        return latents


def example_inputs(config: TATIConfig, batch: int = 1, length: int = 77):
    """Zero inputs, e.g. for `jax.eval_shape(TATI(cfg).init, rng, *example_inputs(cfg))`."""
    return jnp.zeros((batch, length, config.input_dim), jnp.float32), jnp.zeros((batch,), jnp.float32)
