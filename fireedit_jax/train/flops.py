"""Model FLOPs of a train step, counted from the model's own shapes (for TFLOP/s and MFU).

DESIGN.md: model FLOPs are counted analytically, not read from XLA's cost analysis
(which counts rematerialised work, elementwise ops, and nothing inside custom kernels).

What is counted: every matrix product of the forward pass — linear layers, convolutions,
the two attention products q·kᵀ and p·v, the LM head — at 2 FLOPs per multiply-add
(a conv: 2 · output elements · kernel taps · input channels per group; padded taps and a
causal mask's upper triangle included, as computed). Norms, activations, softmax,
embedding lookups and the optimizer are not counted. The products are read off the
traced forward (`jax.make_jaxpr` on abstract inputs, batch 1, attention="xla", no
weights allocated), looking inside scans (×length), remat and jit calls.

Training convention (the backward pass JAX actually runs for `jax.grad` with respect to
the trainable leaves only): a product y = a·b costs its forward F, plus F for the
gradient w.r.t. each operand that depends on a trainable leaf. So
  trained layers (UNet, Q-Former, TATI, HVCA, LoRA)        3F  (activation + weight grads)
  frozen layers the gradient passes through (LLaMA base
  weights under LoRA, the LM head)                         2F  (activation grads only)
  frozen layers upstream of everything trained (VAE
  encoder, CLIP text / vision, DINOv2)                      F   (forward only)
  the first layer of a trained net on data (UNet conv_in)  2F  (no input gradient)
Recomputation by remat is not model FLOPs and is not counted.

The step's work is the registered loss itself (`losses.LOSSES[config.train.loss]`), so
whatever it runs is counted: for IP2P the VAE encoder on target and source (nothing with
cached latents), CLIP text and the UNet; for FireEdit also the VLM (DINOv2, region encoder,
LLaMA + LoRA, LM head), Q-Former, HVCA on CLIP/DINOv2 features and TATI.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public equivalent
from jax.extend import core as jcore

from fireedit_jax.models.fireedit import LATENT_FIELDS, EditModel
from fireedit_jax.models.learnable_region import INSTRUCTION_TOKENS
from fireedit_jax.train import losses, masks

MATMULS = ("dot_general", "conv_general_dilated")


def _product_flops(eqn) -> int:
    """2 · multiply-adds of one dot_general or conv_general_dilated equation."""
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        return 2 * out.size * math.prod(lhs.shape[d] for d in contract)
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    taps = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2 * out.size * taps * rhs.shape[rhs_spec[1]]


def _closed(jaxpr):
    return jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr


def _sub_jaxpr(eqn):
    """The one inner jaxpr whose inputs are the equation's (jit, remat, custom_jvp/vjp, ...)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            return _closed(inner)
    return None


def count_jaxpr(jaxpr, differentiable: Sequence[bool]) -> tuple[int, int, list[bool]]:
    """(forward FLOPs, train FLOPs, which outputs depend on a differentiable input).

    differentiable: per input of `jaxpr`, whether it is (or depends on) a trainable leaf.
    """
    jaxpr = _closed(jaxpr)
    dep = {v: bool(d) for v, d in zip(jaxpr.invars, differentiable)}
    forward = train = 0

    def get(v):
        return isinstance(v, jcore.Var) and dep.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in MATMULS:
            f = _product_flops(eqn)
            forward, train = forward + f, train + f * (1 + ins[0] + ins[1])
            outs = [ins[0] or ins[1]]
        elif name == "stop_gradient":
            outs = [False]
        elif name == "scan":
            f, t, outs = _count_scan(eqn, ins)
            forward, train = forward + f, train + t
        elif name == "cond":
            counts = [count_jaxpr(branch, ins[1:]) for branch in eqn.params["branches"]]
            f, t, outs = max(counts, key=lambda c: c[1])
            outs = [o or ins[0] for o in outs]
            forward, train = forward + f, train + t
        elif name == "while":
            body = eqn.params["body_jaxpr"]
            if count_jaxpr(body, [False] * len(_closed(body).invars))[0]:
                raise NotImplementedError("matrix products inside a while loop: the trip count is unknown")
            outs = [any(ins)] * len(eqn.outvars)
        elif (inner := _sub_jaxpr(eqn)) is not None:
            f, t, outs = count_jaxpr(inner, ins[-len(inner.invars):] if inner.invars else [])
            forward, train = forward + f, train + t
        else:
            outs = [any(ins)] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outs):
            dep[v] = bool(d) and jnp.issubdtype(v.aval.dtype, jnp.inexact)
    return forward, train, [get(v) for v in jaxpr.outvars]


def _count_scan(eqn, ins):
    """A scan's products × its length; carries' dependence iterated to a fixed point."""
    p = eqn.params
    consts, carry, xs = ins[: p["num_consts"]], ins[p["num_consts"] : p["num_consts"] + p["num_carry"]], ins[
        p["num_consts"] + p["num_carry"] :
    ]
    while True:
        f, t, outs = count_jaxpr(p["jaxpr"], consts + carry + xs)
        new_carry = [a or b for a, b in zip(carry, outs[: p["num_carry"]])]
        if new_carry == carry:
            return f * p["length"], t * p["length"], new_carry + outs[p["num_carry"] :]
        carry = new_carry


def count(fn, trainable_args, other_args) -> tuple[int, int]:
    """(forward, train) FLOPs of `fn(trainable_args, other_args)` (pytrees of arrays or
    ShapeDtypeStructs); the gradient is taken w.r.t. `trainable_args`."""
    closed = jax.make_jaxpr(fn)(trainable_args, other_args)
    # tracing keeps work whose result is unused (e.g. CLIP's pooled projection); XLA drops it
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    flags = [True] * len(jax.tree.leaves(trainable_args)) + [False] * len(jax.tree.leaves(other_args))
    forward, train, _ = count_jaxpr(jaxpr, flags)
    return forward, train


def abstract_batch(config: ml_collections.ConfigDict, model: EditModel, batch_size: int, *,
                   text_length: int | None = None, num_boxes: int | None = None) -> dict:  # fmt: skip
    """ShapeDtypeStructs of the batch `config.train.loss` reads (batch_size examples).

    text_length, num_boxes: the VLM's token and box buckets (default: the config's smallest
    length bucket and smallest non-zero box bucket).
    """
    data = config.get("data") or {}
    length = text_length or min(data.get("length_buckets", (384,)))
    boxes = num_boxes if num_boxes is not None else min([b for b in data.get("box_buckets", (8,)) if b] or [0])
    size = int(config.resolution)
    latent = (size // model.latent_factor, size // model.latent_factor, model.vae.config.latent_channels)
    shapes = {
        "source": ((size, size, 3), jnp.float32), "target": ((size, size, 3), jnp.float32),
        **{name: (latent, jnp.float32) for name in LATENT_FIELDS},
        "input_ids": ((model.max_text_length,), jnp.int32) if model.text_encoder else None,
        "clip_ids": ((model.max_text_length,), jnp.int32) if model.text_encoder else None,
        "vlm_input_ids": ((length,), jnp.int32), "vlm_attention_mask": ((length,), jnp.bool_),
        "vlm_target_mask": ((length,), jnp.bool_), "vlm_weight": ((), jnp.float32),
        "boxes": ((boxes, 4), jnp.float32), "box_mask": ((boxes,), jnp.bool_), "diffusion_weight": ((), jnp.float32),
        "mask": ((size, size, 1), jnp.float32),
    }  # fmt: skip
    if model.region is not None:
        words = int(data.get("region_length", INSTRUCTION_TOKENS))
        shapes.update(region_ids=((words,), jnp.int32), region_mask=((words,), jnp.bool_))
        if model.region.clip_text is not None:
            captions = ((model.region.clip_text.config.max_position_embeddings,), jnp.int32)
            shapes.update(caption_ids=captions, target_caption_ids=captions)
    return {name: jax.ShapeDtypeStruct((batch_size, *shapes[name][0]), shapes[name][1]) for name in loss_inputs(config)}


def loss_inputs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch entries `config.train.loss` reads (mask_edit: its conditioner's loss's, and the
    mask; grounded: those and `losses.grounding_inputs`, or those alone without the generator);
    from a latent cache the `LATENT_FIELDS` in place of the pixels only the VAE encoder reads
    (FireEdit's VLM still reads the source)."""
    loss, masked = config.train.loss, config.train.loss in ("mask_edit", "grounded")
    if loss in (*losses.REGION_LOSSES, "grounded") and losses.uses_latent_cache(config):
        raise ValueError(f"train.loss={loss!r} reads the source image, not latents: train from the images")
    if loss == "clip_contrastive":
        return ("source", "caption_ids")
    if loss == "learnable_region":
        return losses.REGION_INPUTS + losses.generator_inputs(config.model.conditioner)
    if masked and losses.uses_latent_cache(config):
        raise ValueError(f"train.loss={loss!r} reads masks, which a latent cache does not hold: train from the images")
    if loss == "grounded" and not float(config.train.get("generator_weight", 1.0)):
        return losses.grounding_inputs(config)
    if masked:
        loss = "fireedit" if config.model.conditioner == "vlm" else "ip2p"
    if loss == "fireedit":
        keys, encoded = losses.FIREEDIT_INPUTS[losses.fireedit_stage(config)], ("target",)
    elif loss == "ip2p":
        keys, encoded = ("source", "target", "input_ids"), ("source", "target")
    else:
        raise ValueError(f"no batch layout known for train.loss={config.train.loss!r}")
    if masked:
        grounded = config.train.loss == "grounded"
        return tuple(dict.fromkeys(keys + (losses.grounding_inputs(config) if grounded else ("mask",))))
    if "target" not in keys or not losses.uses_latent_cache(config):
        return keys
    return tuple(key for key in keys if key not in encoded) + LATENT_FIELDS


def step_flops_per_example(config: ml_collections.ConfigDict, batch=None, **buckets) -> tuple[float, float]:
    """(forward, train) model FLOPs per example of `config`'s loss (`losses.LOSSES`).

    batch: the step's batch (arrays or ShapeDtypeStructs, any size; e.g. with cached
    latents); default `abstract_batch(config, model, 1, **buckets)`.
    """
    model = EditModel.from_config(config.model, attention="xla")
    params = jax.eval_shape(model.init, jax.random.key(0))
    trainable, frozen = masks.split(params, masks.trainable_mask(params, config.train.trainable))
    if batch is None:
        batch = abstract_batch(config, model, 1, **buckets)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    size = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), size))
    loss_fn = losses.LOSSES[config.train.loss](model, config)

    def fn(trainable, rest):
        frozen, batch, keys = rest
        return loss_fn(masks.combine(trainable, frozen), batch, keys)[0]

    forward, train = count(fn, trainable, (frozen, batch, keys))
    return forward / size, train / size


def train_flops_per_example(config: ml_collections.ConfigDict, batch=None, **buckets) -> float:
    """Model FLOPs of forward + backward for one example (see the module docstring)."""
    return step_flops_per_example(config, batch, **buckets)[1]
