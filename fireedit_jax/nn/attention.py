"""The one attention entry point; the kernel behind it is a config choice.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads
(N a multiple of K: grouped-query attention), H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def default_implementation() -> str:
    """cuDNN flash attention on GPUs, the chunked XLA kernel elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str | None = None,
    query_chunk: int = 1024,
) -> jax.Array:
    """softmax(q·kᵀ/√H + mask)·v.

    Args:
      q: float[B, T, N, H]; k, v: float[B, S, K, H].
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
      is_causal: additionally mask keys after the query position.
      implementation: "xla", "cudnn", "splash" or None (per backend).
      query_chunk: the xla kernel handles this many queries at a time.
    Returns:
      float[B, T, N, H] in q's dtype.
    """
    implementation = implementation or default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation == "cudnn" and _cudnn_supports(q, k, v):
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn"
        )
    if implementation == "splash":
        raise NotImplementedError(
            "Pallas splash attention is not wired in yet; use attention='xla' on TPU."
        )
    return chunked_attention(q, k, v, mask=mask, is_causal=is_causal, query_chunk=query_chunk)


def _cudnn_supports(q, k, v) -> bool:
    # cuDNN's fused kernel: 16-bit inputs, head dim a multiple of 8 up to 128 (256 on Hopper).
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )


def chunked_attention(q, k, v, *, mask=None, is_causal=False, query_chunk=1024):
    """Exact attention computed query-chunk by query-chunk.

    Only a [B, N, chunk, S] block of scores exists at a time, which keeps it in
    cache on CPUs and bounds memory for long sequences. Softmax runs in float32.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if n % kv_heads:
        raise ValueError(f"{n} query heads are not a multiple of {kv_heads} key/value heads")
    groups = n // kv_heads
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    q = q.reshape(b, t, kv_heads, groups, h)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kv_heads, groups, t, s)

    def attend(q_chunk, mask_chunk, start):
        # q_chunk: [B, C, K, G, H]; mask_chunk: [B, K, G, C, S] or None.
        scores = jnp.einsum("bckgh,bskh->bkgcs", q_chunk, k, preferred_element_type=jnp.float32)
        keep = mask_chunk
        if is_causal:
            rows = start + jnp.arange(q_chunk.shape[1])[:, None]
            causal = rows >= jnp.arange(s)[None, :]
            keep = causal if keep is None else keep & causal
        if keep is not None:
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgcs,bskh->bckgh", probs, v)

    if t <= query_chunk:
        out = attend(q, mask, 0)
        return out.reshape(b, t, n, h)

    chunks = -(-t // query_chunk)
    pad = chunks * query_chunk - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q = q.reshape(b, chunks, query_chunk, kv_heads, groups, h).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad), (0, 0)), constant_values=True)
        mask = mask.reshape(b, kv_heads, groups, chunks, query_chunk, s)
        mask = jnp.moveaxis(mask, 3, 0)
    starts = jnp.arange(chunks) * query_chunk
    out = jax.lax.map(lambda xs: attend(*xs), (q, mask, starts))
    out = out.swapaxes(0, 1).reshape(b, chunks * query_chunk, n, h)
    return out[:, :t]
