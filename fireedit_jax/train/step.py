"""The sharded train step and the `Trainer` that builds it from a config.

One `jax.jit` with explicit in/out shardings and the state donated:
  keys       one PRNG key per example from (seed, state["step"])
  micro      the batch split into `grad_accum` micro-batches, scanned with lax.scan;
             gradients of the trainable leaves (`masks.split`) summed in float32.
             Unrolled on CPU (and for one micro-batch): XLA:CPU gives convolutions its
             fast (Eigen / YNNPACK) kernels only in the entry computation; inside a while
             loop or a call their gradients take a naive path, 5-40x slower
  update     global-norm clipping + AdamW (optimizer.py), optional EMA
  NaN/Inf    a non-finite loss or gradient norm keeps params, optimizer state and EMA
             as they were and counts the step as skipped; `check_skips` on the host
             stops training after K consecutive skips
  metrics    loss and its parts, grad/param/update norms (trainable leaves),
             learning rate, skipped and consecutive-skip counts

The loss is any `loss_fn(params, batch, keys) → (loss, parts)` (losses.py): the IP2P
loss today, FireEdit's L_VLM + L_diff by registering it in `losses.LOSSES`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.train import losses, masks, optimizer as optim, state as state_lib
from fireedit_jax.train import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def check_skips(metrics, max_consecutive_skips: int) -> None:
    """Host-side stop rule: raises TrainingDivergedError after K consecutive skipped steps.

    Reads metrics["consecutive_skips"] (a device scalar; reading it waits for the step).
    """
    run = int(metrics["consecutive_skips"])
    if run >= max_consecutive_skips:
        raise TrainingDivergedError(
            f"training stopped: {run} consecutive steps had a non-finite loss or gradient "
            f"(limit K = train.max_consecutive_skips = {max_consecutive_skips}; "
            f"{int(metrics['skipped'])} skipped in total). Lower the learning rate, train in "
            "float32, or look for broken examples in the data."
        )


def _micro_batches(tree, n: int):
    """[B, ...] → [n, B/n, ...], micro-batch i = rows i, n+i, 2n+i, …

    Taking every n-th row (not contiguous blocks) keeps each device's rows on that
    device when the batch dimension is split over the mesh: no resharding.
    """

    def split(x):
        rows = x.shape[0] // n
        return jnp.swapaxes(x.reshape(rows, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mask,
    *,
    mesh: Mesh,
    rules,
    state_shardings,
    batch_sharding: NamedSharding,
    grad_accum: int = 1,
    seed: int = 0,
    ema_decay: float | None = None,
    max_traces: int | None = None,
    unroll: bool | None = None,
    scanned=None,
):
    """The jitted step: (state, batch) → (state, metrics); the state argument is donated.

    mask: bool tree over the (unboxed) params, True where trainable. ema_decay: None
    when the state has no "ema". max_traces: raise if the step is traced more often
    (a recompilation guard; None: no limit). unroll: a Python loop over the micro-batches
    instead of lax.scan (None: on CPU or for one micro-batch). scanned: bool tree over the
    params, True for leaves stacked under nn.scan (gathered layer by layer; None: none).
    """
    micro_spec = PartitionSpec(None, *batch_sharding.spec)
    if unroll is None:  # see the module docstring
        unroll = grad_accum == 1 or mesh.devices.flat[0].platform == "cpu"
    # ZeRO-3 made explicit: weights are gathered over `fsdp` where the loss uses them,
    # scanned stacks one layer at a time (mesh.GatheredOnRead); gradients flow back
    # reduce-scattered. Leaving the choice to XLA's partitioner gives wrong results on
    # data×fsdp×tensor meshes (jax 0.10.2, see test_sharding.py).
    param_specs = jax.tree.map(lambda s: s.spec, state_shardings["params"], is_leaf=lambda x: isinstance(x, NamedSharding))
    scanned = jax.tree.map(lambda _: False, param_specs) if scanned is None else scanned

    def step(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return _step(state, batch)

    def _step(state, batch):
        trainable, frozen = masks.split(state["params"], mask)
        batch_size = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), state["step"]), batch_size)
        micro = jax.lax.with_sharding_constraint(_micro_batches((batch, keys), grad_accum), micro_spec)

        def value_and_grad(t, b, k):
            def loss(p):
                return loss_fn(mesh_lib.gather_weights(masks.combine(p, frozen), param_specs, scanned), b, k)

            return jax.value_and_grad(loss, has_aux=True)(t)

        def accumulate(total, xs):
            (loss, parts), grads = value_and_grad(trainable, *xs)
            return _tree_add(total, (loss, parts, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(
            lambda x: jnp.zeros(x.shape, jnp.float32),
            (*jax.eval_shape(loss_fn, state["params"], *first), trainable),
        )
        if unroll:  # straight-line code, no while loop or call around the loss
            total = zeros
            for i in range(grad_accum):
                total, _ = accumulate(total, jax.tree.map(operator.itemgetter(i), micro))
            loss, parts, grads = total
        else:
            (loss, parts, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, parts, grads = jax.tree.map(lambda x: x / grad_accum, (loss, parts, grads))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731

        applied = state["step"] - state["skipped"]  # updates before this one
        skipped = state["skipped"] + (~finite).astype(jnp.int32)
        new_trainable = keep(new_trainable, trainable)
        new = {
            "step": state["step"] + 1,
            "skipped": skipped,
            "consecutive_skips": jnp.where(finite, 0, state["consecutive_skips"] + 1),
            "params": masks.combine(new_trainable, frozen),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        if ema_decay is not None:
            new["ema"] = keep(optim.update_ema(state["ema"], new_trainable, applied + 1, ema_decay), state["ema"])
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_trainable),
            "update_norm": optax.tree.norm(updates),
            "learning_rate": jnp.asarray(schedule(applied), jnp.float32),
            "skipped": skipped,
            "consecutive_skips": new["consecutive_skips"],
        }
        return new, metrics

    if max_traces is not None:
        step = chex.assert_max_traces(step, n=max_traces)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def base_config() -> ml_collections.ConfigDict:
    """Every config section but `model`, with defaults; configs/*.py add `model` and override.

    train:
      loss                   name in losses.LOSSES ("ip2p")
      batch_size             global examples per optimizer step (all micro-batches, all hosts)
      grad_accum             micro-batches per step (lax.scan); batch_size / grad_accum must
                             divide over the mesh's batch axes (data × fsdp)
      unroll_accumulation    a Python loop over the micro-batches instead of lax.scan (None:
                             on CPU or for one micro-batch; the module docstring says why)
      steps, learning_rate   total optimizer steps (the schedule's horizon), peak lr
      schedule, warmup_ratio "constant" | "cosine" after ⌈warmup_ratio·steps⌉ linear warm-up steps
      adam_b1/b2/eps, weight_decay, clip_norm (global norm; 0 = off)
      cond_dropout           p of IP2P's condition dropout (text, image, both: p each)
      vlm_weight             L = vlm_weight · L_VLM + L_diff for FireEdit (1: the paper's)
      dropout                the networks' own dropout in training (FireEdit: LoRA 0.05, Q-Former 0.1)
      max_consecutive_skips  K: stop after K steps in a row with a non-finite loss or gradient
      trainable              path regexes of the trained leaves (e.g. "^unet/"); the rest is frozen
      ema.enabled, ema.decay EMA of the trainable leaves (diffusers' EMAModel decay rule)
      dtype, attention       compute dtype ("bfloat16" | "float32"; params stay float32),
                             attention implementation (None: the backend's default)
    mesh: data, fsdp, tensor sizes (one may be -1). sharding.rules: logical → mesh axes.
    distributed: enabled, coordinator_address, num_processes, process_id (None: detect;
    see mesh.maybe_initialize_distributed). seed: init and per-step randomness.
    """
    placeholder, section = ml_collections.config_dict.placeholder, ml_collections.ConfigDict
    config = section()
    config.seed = 0
    config.train = section(dict(
        loss="ip2p", batch_size=8, grad_accum=1, steps=1000, learning_rate=1e-4, schedule="constant",
        warmup_ratio=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        cond_dropout=0.05, vlm_weight=1.0, dropout=True, max_consecutive_skips=10, trainable=("^unet/",),
        ema=section(dict(enabled=False, decay=0.9999)), dtype="bfloat16", attention=placeholder(str),
        unroll_accumulation=placeholder(bool),
    ))  # fmt: skip
    config.mesh = section(dict(data=-1, fsdp=1, tensor=1))
    config.sharding = section(dict(rules=mesh_lib.STANDARD_RULES))
    config.distributed = section(dict(
        enabled=placeholder(bool), coordinator_address=placeholder(str), num_processes=placeholder(int),
        process_id=placeholder(int),
    ))  # fmt: skip
    return config


@dataclasses.dataclass
class Trainer:
    """Model, mesh, shardings, optimizer and the jitted step for one config.

        trainer = Trainer.from_config(config)
        state = trainer.init_state()                     # or trainer.init_state(params=converted)
        state, metrics = trainer.step(state, trainer.shard_batch(host_batch))
        check_skips(metrics, config.train.max_consecutive_skips)
    """

    config: ml_collections.ConfigDict
    model: EditModel
    mesh: Mesh
    rules: tuple
    mask: Any  # bool tree over the params: True = trainable
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: dict  # boxed, for partition specs and golden files
    state_shardings: Any
    batch_sharding: NamedSharding
    step: Callable

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        mesh: Mesh | None = None,
        loss: Callable[[EditModel, Any], Callable] | None = None,
        max_traces: int | None = None,
    ) -> Trainer:
        """mesh: default `make_mesh(config.mesh)`; loss: a factory (model, config) → loss_fn,
        default `losses.LOSSES[config.train.loss]`."""
        train = config.train
        mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
        rules = mesh_lib.logical_rules(config.sharding.rules)
        model = EditModel.from_config(config.model, dtype=DTYPES[train.dtype], attention=train.get("attention"))
        _check_batch(train, mesh, rules)
        abstract_params = jax.eval_shape(model.init, jax.random.key(0))
        mask = masks.trainable_mask(abstract_params, train.trainable)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(f"train.trainable={list(train.trainable)} matches no parameter")
        optimizer, schedule = optim.make_optimizer(train)
        ema = bool(train.ema.enabled)
        abstract = state_lib.abstract_state(model.init, optimizer, mask, ema=ema)
        shardings = state_lib.state_shardings(abstract, mesh, rules)
        batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec(rules))
        loss_fn = (loss or losses.LOSSES[train.loss])(model, config)
        step = make_train_step(
            loss_fn, optimizer, schedule, mask, mesh=mesh, rules=rules, state_shardings=shardings,
            batch_sharding=batch_sharding, grad_accum=int(train.grad_accum), seed=int(config.seed),
            ema_decay=float(train.ema.decay) if ema else None, max_traces=max_traces,
            unroll=train.get("unroll_accumulation"), scanned=mesh_lib.scanned_leaves(abstract_params),
        )  # fmt: skip
        return cls(config, model, mesh, rules, mask, optimizer, schedule, abstract, shardings, batch_sharding, step)

    def init_state(self, key: jax.Array | None = None, params=None) -> dict:
        """A fresh sharded state (params from `key`, default the config's seed), or one around `params`."""
        ema = "ema" in self.abstract_state
        if params is not None:
            return state_lib.state_from_params(params, self.optimizer, self.mask, self.state_shardings, ema=ema)
        key = jax.random.key(int(self.config.seed)) if key is None else key
        return state_lib.init_state(self.model.init, self.optimizer, self.mask, key, self.state_shardings, ema=ema)

    def shard_batch(self, batch):
        """This process's rows of the global batch (host arrays) → global arrays on the mesh."""
        return mesh_lib.shard_batch(batch, self.batch_sharding)

    def trainable_count(self) -> int:
        return masks.count_params(self.abstract_state["params"], self.mask)


def _check_batch(train, mesh: Mesh, rules) -> None:
    spec = mesh_lib.batch_spec(rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    split = 1
    for axis in axes:
        split *= mesh.shape[axis]
    per_micro, accum = divmod(int(train.batch_size), int(train.grad_accum))
    if accum or per_micro % split:
        raise ValueError(
            f"train.batch_size={train.batch_size} must split into train.grad_accum={train.grad_accum} "
            f"micro-batches whose size divides over the {split} devices of mesh axes {axes}"
        )
