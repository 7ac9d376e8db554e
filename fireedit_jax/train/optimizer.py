"""AdamW with warm-up, global-norm clipping, and an optional EMA of the trained weights.

The optimizer only ever sees the trainable leaves (`masks.split`), so frozen networks
(VAE, text encoder, the LLM's base weights) hold no Adam moments at all.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def warmup_steps(train) -> int:
    """⌈warmup_ratio · steps⌉, as transformers' `get_warmup_steps`."""
    return math.ceil(float(train.warmup_ratio) * int(train.steps))


def learning_rate_schedule(train) -> optax.Schedule:
    """Linear warm-up from 0 (transformers' convention: the first update has lr 0 when
    warming up), then constant or cosine decay to 0 at `train.steps`."""
    if train.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={train.schedule!r}; choose one of {SCHEDULES}")
    peak, warm = float(train.learning_rate), warmup_steps(train)
    if train.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps=max(1, int(train.steps) - warm))
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm(train.clip_norm) (off when 0 or None) then AdamW; returns it with its schedule."""
    schedule = learning_rate_schedule(train)
    adamw = optax.adamw(
        schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps, weight_decay=train.weight_decay
    )
    if train.clip_norm:
        return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw), schedule
    return adamw, schedule


def ema_decay(updates: jax.Array, decay: float) -> jax.Array:
    """diffusers' EMAModel decay after `updates` optimizer updates: min(decay, (1 + n) / (10 + n)),
    n = updates − 1, and 0 (copy the weights) for the first update."""
    n = jnp.asarray(updates, jnp.float32) - 1.0
    return jnp.where(n <= 0, 0.0, jnp.minimum(decay, (1.0 + n) / (10.0 + n)))


def update_ema(ema, params, updates: jax.Array, decay: float):
    """ema ← d·ema + (1 − d)·params, d = ema_decay(updates, decay); None leaves stay None."""
    d = ema_decay(updates, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
