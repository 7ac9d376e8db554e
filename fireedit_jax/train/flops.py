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

The step's model: the VAE encoder on target and source, the conditioner (CLIP text, or
VLM + Q-Former [+ HVCA on CLIP/DINOv2 features]), TATI (if on) and the UNet once.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jcore

from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.train import masks

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
    flags = [True] * len(jax.tree.leaves(trainable_args)) + [False] * len(jax.tree.leaves(other_args))
    forward, train, _ = count_jaxpr(closed, flags)
    return forward, train


def _abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _step_forward(model: EditModel, params, batch):
    """The model work of one train step (losses.py): VAE encoder on target ‖ source, the
    conditions, TATI + UNet on noisy latent ‖ image latent."""
    pixels = jnp.concatenate([batch["target"], batch["source"]])
    latents, image_latents = jnp.split(model.encode_image(params, pixels), 2)
    text_inputs = batch["input_ids"] if model.conditioner == "clip_text" else (batch["input_ids"], batch["attention_mask"])
    cond, _ = model.condition(params, batch["source"], text_inputs, batch.get("boxes"), batch.get("box_mask"))
    sample = jnp.concatenate([latents, image_latents], axis=-1)
    return model.denoise(params, sample, batch["t"], cond)


def example_batch(config: ml_collections.ConfigDict, model: EditModel, *, text_length: int | None = None,
                  num_boxes: int | None = None) -> dict:  # fmt: skip
    """ShapeDtypeStructs of one example's step inputs (batch 1)."""
    size = int(config.resolution)
    batch = {"source": _abstract((1, size, size, 3)), "target": _abstract((1, size, size, 3)), "t": _abstract((1,))}
    if model.conditioner == "clip_text":
        batch["input_ids"] = _abstract((1, model.max_text_length), jnp.int32)
        return batch
    data = config.get("data") or {}
    length = text_length or min(data.get("length_buckets", (384,)))
    boxes = num_boxes if num_boxes is not None else min([b for b in data.get("box_buckets", (8,)) if b] or [0])
    batch["input_ids"] = _abstract((1, length), jnp.int32)
    batch["attention_mask"] = _abstract((1, length), jnp.bool_)
    if model.vlm.regions is not None and boxes:
        batch["boxes"] = _abstract((1, boxes, 4))
        batch["box_mask"] = _abstract((1, boxes), jnp.bool_)
    return batch


def step_flops_per_example(config: ml_collections.ConfigDict, *, text_length: int | None = None,
                           num_boxes: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(forward, train) model FLOPs per example of `config`'s train step.

    text_length, num_boxes: the VLM's token and box buckets (default: the config's
    smallest length bucket and smallest non-zero box bucket).
    """
    model = EditModel.from_config(config.model, attention="xla")
    params = jax.eval_shape(model.init, jax.random.key(0))
    trainable, frozen = masks.split(params, masks.trainable_mask(params, config.train.trainable))
    batch = example_batch(config, model, text_length=text_length, num_boxes=num_boxes)

    def fn(trainable, rest):
        frozen, batch = rest
        return _step_forward(model, masks.combine(trainable, frozen), batch)

    return count(fn, trainable, (frozen, batch))


def train_flops_per_example(config: ml_collections.ConfigDict, **buckets) -> float:
    """Model FLOPs of forward + backward for one example (see the module docstring)."""
    return float(step_flops_per_example(config, **buckets)[1])
