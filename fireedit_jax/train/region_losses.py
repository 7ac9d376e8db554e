"""Beyond Editing Pairs' losses for the learnable edit region (§3.3, Eq. 4-11), in float32.

Shapes: B batch, E the CLIP joint embedding width, P image patches, D patch-feature width.

Pure functions of embeddings the caller has already computed (the frozen CLIP encoders, the
region predictor's g): text embeddings e(c_src), e(c_tgt) float[B, E]; global image embeddings
E_img(I), E_img(I') float[B, E]; CLIP patch features of I and I' float[B, P, D]. Every loss
is a float32 scalar averaged over the batch; d_cos(a, b) = 1 − cos(a, b).

  L_sa   = d_cos(g(F_fused), e(c_tgt)) + d_cos(g(F_I), e(c_src))               Eq. 4-6
  L_clip = λ_g·d_cos(E_img(I'), e(c_tgt))                                      Eq. 7
         + λ_d·d_cos(E_img(I') − E_img(I), e(c_tgt) − e(c_src))                Eq. 8
         + λ_s·mean((S(I) − S(I'))²),  S = pairwise patch cosine similarities  Eq. 9, 10
  L      = λ_sa·L_sa + λ_clip·L_clip                                           Eq. 11

The paper gives none of the λ; they default to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8  # the smallest norm a vector is divided by (torch's cosine_similarity eps)


def _unit(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, EPS) along the last axis, in float32; a zero vector stays zero (and has finite gradients)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), EPS**2))


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """d_cos(a, b) = 1 − cos(a, b) along the last axis (the paper's distance in Eq. 4-8).

    a, b: float[..., E] → float32[...] in [0, 2]; 1 when either vector is zero.
    """
    return 1.0 - jnp.sum(_unit(a) * _unit(b), axis=-1)


def semantic_alignment(g_fused: jax.Array, g_image: jax.Array, text_target: jax.Array,
                       text_source: jax.Array) -> jax.Array:  # fmt: skip
    """L_sa (Eq. 6) = mean over B of d_cos(g(F_fused), e(c_tgt)) (Eq. 4) + d_cos(g(F_I), e(c_src)) (Eq. 5).

    g_fused, g_image: float[B, E], the semantic projection of the fused and the source
    features; text_target, text_source: float[B, E] → float32 scalar in [0, 4].
    """
    return jnp.mean(cosine_distance(g_fused, text_target) + cosine_distance(g_image, text_source))


def clip_guidance(image_edit: jax.Array, text_target: jax.Array) -> jax.Array:
    """L_guide (Eq. 7) = mean over B of d_cos(E_img(I'), e(c_tgt)).

    image_edit: float[B, E], the edited image's CLIP embedding; text_target: float[B, E] → float32 scalar.
    """
    return jnp.mean(cosine_distance(image_edit, text_target))


def directional(image_source: jax.Array, image_edit: jax.Array, text_source: jax.Array,
                text_target: jax.Array) -> jax.Array:  # fmt: skip
    """L_dir (Eq. 8, StyleGAN-NADA's directional loss) = mean over B of
    d_cos(E_img(I') − E_img(I), e(c_tgt) − e(c_src)).

    image_source, image_edit, text_source, text_target: float[B, E] → float32 scalar; an
    unchanged image or identical captions (a zero direction) give 1.
    """
    image_change = image_edit.astype(jnp.float32) - image_source.astype(jnp.float32)
    text_change = text_target.astype(jnp.float32) - text_source.astype(jnp.float32)
    return jnp.mean(cosine_distance(image_change, text_change))


def self_similarity(patches: jax.Array) -> jax.Array:
    """S_ij = cos(f_i, f_j), the pairwise cosine similarities of one image's patches (Eq. 9).

    patches: float[B, P, D] → float32[B, P, P], symmetric, 1 on the diagonal (0 for a zero patch).
    """
    unit = _unit(patches)
    return jnp.einsum("bpd,bqd->bpq", unit, unit)


def structural(patches_source: jax.Array, patches_edit: jax.Array) -> jax.Array:
    """L_struct (Eq. 9): the "L2 distance" between the source's and the edit's self-similarity
    matrices, taken as the mean of squared differences over B·P·P entries (as Splice and
    Plug-and-Play do).

    patches_source, patches_edit: float[B, P, D], CLIP patch features of I and I' → float32 scalar.
    """
    return jnp.mean(jnp.square(self_similarity(patches_source) - self_similarity(patches_edit)))


def region_loss_parts(
    *,
    g_fused: jax.Array,
    g_image: jax.Array,
    text_source: jax.Array,
    text_target: jax.Array,
    image_source: jax.Array,
    image_edit: jax.Array,
    patches_source: jax.Array,
    patches_edit: jax.Array,
    lambda_sa: float = 1.0,
    lambda_clip: float = 1.0,
    lambda_guidance: float = 1.0,
    lambda_directional: float = 1.0,
    lambda_structural: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = λ_sa·L_sa + λ_clip·(λ_guidance·L_guide + λ_directional·L_dir + λ_structural·L_struct) (Eq. 10, 11).

    g_fused, g_image: float[B, E] (the region predictor's g); text_source, text_target: float[B, E]
    (CLIP text embeddings of c_src, c_tgt); image_source, image_edit: float[B, E] (CLIP image
    embeddings of I, I'); patches_source, patches_edit: float[B, P, D] (CLIP patch features of I, I').
    Returns (L, parts): float32 scalars "semantic_alignment", "clip_guidance", "directional",
    "structural" (unweighted) and "clip" (L_clip, weighted by the λ of its parts).
    """
    parts = {
        "semantic_alignment": semantic_alignment(g_fused, g_image, text_target, text_source),
        "clip_guidance": clip_guidance(image_edit, text_target),
        "directional": directional(image_source, image_edit, text_source, text_target),
        "structural": structural(patches_source, patches_edit),
    }
    parts["clip"] = (lambda_guidance * parts["clip_guidance"] + lambda_directional * parts["directional"]
                     + lambda_structural * parts["structural"])  # fmt: skip
    return lambda_sa * parts["semantic_alignment"] + lambda_clip * parts["clip"], parts


def contrastive(image_embeds: jax.Array, text_embeds: jax.Array, temperature: float) -> jax.Array:
    """CLIP's symmetric InfoNCE over a batch of matching pairs: the mean of the image→text and
    text→image cross-entropies of cos(image_i, text_j) / temperature, the pair (i, i) the label.

    image_embeds, text_embeds: float[B, E] → float32 scalar.
    """
    logits = _unit(image_embeds) @ _unit(text_embeds).T / temperature
    labels = jnp.arange(logits.shape[0])
    image_to_text = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
    text_to_image = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    return (image_to_text + text_to_image) / 2
