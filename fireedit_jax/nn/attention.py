"""The one attention entry point; the kernel behind it is a config choice.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads
(N a multiple of K: grouped-query attention), H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# Most scores one block of the xla kernel holds: on CPU a block that fits in cache, elsewhere large.
CPU_BLOCK_SCORES, ACCELERATOR_BLOCK_SCORES = 2**20, 2**28


def default_implementation() -> str:
    """cuDNN flash attention on GPUs, the chunked XLA kernel elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
    query_chunk: int | None = None,
) -> jax.Array:
    """softmax(scale·q·kᵀ + bias, masked)·v.

    Args:
      q: float[B, T, N, H]; k, v: float[B, S, K, H].
      bias: float, broadcastable to [B, N, T, S], added to the scores (e.g. T5's relative positions).
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
      is_causal: additionally mask keys after the query position.
      scale: multiplies q·kᵀ; default 1/√H (T5 uses 1).
      implementation: "xla", "cudnn", "splash" or None (per backend).
      query_chunk: query rows per block of the xla kernel (default: per backend, `chunked_attention`).
    Returns:
      float[B, T, N, H] in q's dtype.
    """
    implementation = implementation or default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation == "cudnn" and _cudnn_supports(q, k, v, bias):
        scores_shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if mask is not None:
            mask = jnp.broadcast_to(mask, scores_shape)
        if bias is not None:
            bias = jnp.broadcast_to(bias, scores_shape).astype(q.dtype)
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation="cudnn"
        )
    if implementation == "splash":
        raise NotImplementedError(
            "Pallas splash attention is not wired in yet; use attention='xla' on TPU."
        )
    return chunked_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, query_chunk=query_chunk
    )


def _cudnn_supports(q, k, v, bias) -> bool:
    # cuDNN's fused kernel: 16-bit inputs, head dim a multiple of 8 up to 128 (256 on Hopper);
    # its backward pass with a bias needs even query and key lengths.
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
        and (bias is None or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0))
    )


def chunked_attention(q, k, v, *, bias=None, mask=None, is_causal=False, scale=None, query_chunk=None,
                      max_scores=None):
    """Exact attention computed block by block: a few heads × a chunk of queries at a time.

    Heads go first ([B·K, G·T, H], the G query heads sharing a key/value head folded
    into the query rows), and at most `max_scores` scores exist at once: on CPU a
    block fits in cache (CPU_BLOCK_SCORES: one head × 256 queries at 4,096 keys), which
    is what makes long sequences fast there; elsewhere blocks are large.
    Softmax (and the bias) run in float32; its normalisation is applied after the product with v.

    Args:
      bias, mask, is_causal, scale: as `dot_product_attention`.
      query_chunk: query rows per block (default: as many as `max_scores` allows).
      max_scores: the most scores in one block.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if n % kv_heads:
        raise ValueError(f"{n} query heads are not a multiple of {kv_heads} key/value heads")
    groups = n // kv_heads
    z, rows = b * kv_heads, groups * t  # heads and query rows per head, after folding
    max_scores = max_scores or (CPU_BLOCK_SCORES if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_SCORES)
    chunk = min(query_chunk or max(1, max_scores // s), rows)
    chunks = -(-rows // chunk)
    heads = max(d for d in range(1, z + 1) if z % d == 0 and (d == 1 or d * chunk * s <= max_scores))

    def heads_first(x, lead):  # [B, L, K, lead·H] → [B·K, lead·L, H] (lead query heads per kv head)
        x = x.reshape(b, x.shape[1], kv_heads, lead, h).transpose(0, 2, 3, 1, 4)
        return x.reshape(z, lead * x.shape[-2], h)

    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = heads_first(q * jnp.asarray(scale, q.dtype), groups)
    k, v = heads_first(k, 1), heads_first(v, 1)
    pad = chunks * chunk - rows
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(z // heads, heads, chunks, chunk, h)
    k, v = (x.reshape(z // heads, heads, s, h) for x in (k, v))

    def score_blocks(x, fill):  # broadcastable to [B, N, T, S] → blocked as q's rows
        x = jnp.broadcast_to(x, (b, n, t, s)).reshape(z, rows, s)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)), constant_values=fill)
        return x.reshape(z // heads, heads, chunks, chunk, s)

    bias = None if bias is None else score_blocks(bias, 0)
    mask = None if mask is None else score_blocks(mask, True)
    positions = (jnp.arange(chunks * chunk) % t).reshape(chunks, chunk)  # each row's query position

    def attend(q_block, k_block, v_block, bias_block, mask_block, position):
        # q_block: [heads, chunk, H]; k/v_block: [heads, S, H]; bias/mask_block: [heads, chunk, S] or None.
        scores = jnp.einsum("zch,zsh->zcs", q_block, k_block, preferred_element_type=jnp.float32)
        if bias_block is not None:
            scores = scores + bias_block.astype(jnp.float32)
        keep = mask_block
        if is_causal:
            causal = position[:, None] >= jnp.arange(s)[None, :]
            keep = causal if keep is None else keep & causal
        if keep is not None:
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("zcs,zsh->zch", probs.astype(v.dtype), v_block, preferred_element_type=jnp.float32)
        return (out / jnp.sum(probs, axis=-1, keepdims=True)).astype(v.dtype)

    def chunks_first(x):
        return None if x is None else jnp.moveaxis(x, 1, 0)

    def head_block(xs):
        q_heads, k_heads, v_heads, bias_heads, mask_heads = xs
        return jax.lax.map(
            lambda ys: attend(ys[0], k_heads, v_heads, ys[1], ys[2], ys[3]),
            (chunks_first(q_heads), chunks_first(bias_heads), chunks_first(mask_heads), positions),
        )  # [chunks, heads, chunk, H]

    out = jax.lax.map(head_block, (q, k, v, bias, mask))  # [z / heads, chunks, heads, chunk, H]
    out = out.swapaxes(1, 2).reshape(z, chunks * chunk, h)[:, :rows]
    out = out.reshape(b, kv_heads, groups, t, h).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, h)
