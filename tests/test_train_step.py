"""The train step on one device: frozen leaves, NaN/Inf skipping, the loss falling on a
memorisable set, one compilation per shape; the optimizer's schedule and EMA; configs.

Training starts from a random reference InstructPix2Pix pipeline (diffusers, IP2PSizes())
converted with `convert_ip2p`, with configs/tiny.py as the config.
"""

import dataclasses
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fireedit_jax import checkpoint
from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.convert import ip2p, reference
from fireedit_jax.models.clip import CLIPTextConfig
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.unet_config import UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.train import losses, masks, optimizer
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train.step import Trainer, TrainingDivergedError, _micro_batches, check_skips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SIZE = 8, 16


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def triplets(seed: int = 0, batch: int = BATCH, size: int = SIZE) -> dict:
    """Fixed (source, target, instruction) examples: blocky random images, random character ids."""
    rng = np.random.default_rng(seed)
    def blocky():  # 4×4-pixel blocks of random colour
        return np.repeat(np.repeat(rng.uniform(-1, 1, (batch, size // 4, size // 4, 3)), 4, 1), 4, 2).astype(np.float32)

    return {
        "source": blocky(),
        "target": blocky(),
        "input_ids": rng.integers(0, 514, (batch, 77)).astype(np.int32),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(config.json of, params of) a converted random reference IP2P pipeline."""
    src, out = tmp_path_factory.mktemp("ip2p_ref"), tmp_path_factory.mktemp("ip2p_ckpt")
    reference.save_ip2p(str(src))
    ip2p.convert_ip2p(str(src), str(out))
    config = checkpoint.load_config(str(out))
    model = EditModel.from_config(config.model)
    return config, checkpoint.load_params(str(out), jax.eval_shape(model.init, jax.random.key(0)))


@pytest.fixture(scope="module")
def trainer():
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    return Trainer.from_config(load_config("tiny"), mesh=mesh, max_traces=1)


def test_tiny_config_is_the_converted_reference_model(converted):
    want, tiny = converted[0].model, load_config("tiny").model
    for name, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig)):
        assert dataclass_from_dict(cls, tiny[name]) == dataclass_from_dict(cls, want[name]), name


def test_steps_change_only_the_trainable_leaves(trainer, converted):
    params = converted[1]
    state = trainer.init_state(params=params)
    mask = trainer.mask
    unet_count = masks.count_params(params["unet"])
    assert trainer.trainable_count() == masks.count_params(params, mask) == unet_count == 794_116
    mu = state["opt_state"][1][0].mu  # chain(clip, adamw): adam's moments hold trainable leaves only
    assert masks.count_params(mu) == unet_count
    assert jax.tree.leaves([mu["vae"], mu["text_encoder"], mu["null_text"]]) == []
    before = jax.device_get(state)
    batch = trainer.shard_batch(triplets())
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
    after = jax.device_get(state)
    for name in ("vae", "text_encoder", "null_text"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after["params"][name], before["params"][name])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["params"]["unet"]),
                                                        jax.tree.leaves(before["params"]["unet"]))]  # fmt: skip
    assert np.mean(moved) > 0.9
    assert int(after["step"]) == 3 and int(after["skipped"]) == 0
    assert float(metrics["learning_rate"]) == pytest.approx(1e-4)
    reported = ("loss", "diffusion", "grad_norm", "param_norm", "update_norm")
    assert np.isfinite([float(metrics[k]) for k in reported]).all()
    # EMA: copied at the first update, then (1 + n)/(10 + n)-weighted (n = 1: 2/11)
    ema_leaf, new_leaf = after["ema"]["unet"]["conv_in"]["kernel"], after["params"]["unet"]["conv_in"]["kernel"]
    assert not np.array_equal(ema_leaf, new_leaf) and np.isfinite(ema_leaf).all()


def test_non_finite_steps_are_skipped_then_stop_training(trainer, converted):
    state = trainer.init_state(params=converted[1])
    good, nan, inf = triplets(), triplets(), triplets()
    nan["target"][3, 2, 2, 0] = np.nan
    inf["source"][0] = np.inf
    state, metrics = trainer.step(state, trainer.shard_batch(good))
    before = jax.device_get(state)
    state, metrics = trainer.step(state, trainer.shard_batch(nan))
    assert not np.isfinite(float(metrics["loss"]))
    assert (int(metrics["skipped"]), int(metrics["consecutive_skips"]), int(state["step"])) == (1, 1, 2)
    after = jax.device_get(state)
    for part in ("params", "opt_state", "ema"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after[part], before[part])
    check_skips(metrics, max_consecutive_skips=3)  # one skip is no reason to stop
    state, metrics = trainer.step(state, trainer.shard_batch(good))
    assert (int(metrics["skipped"]), int(metrics["consecutive_skips"])) == (1, 0)
    assert float(metrics["learning_rate"]) == pytest.approx(1e-4)  # 2 updates applied
    for i in range(3):
        state, metrics = trainer.step(state, trainer.shard_batch(inf if i % 2 else nan))
        if i < 2:
            check_skips(metrics, max_consecutive_skips=3)
    assert (int(metrics["skipped"]), int(metrics["consecutive_skips"])) == (4, 3)
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive steps .* K = train.max_consecutive_skips = 3"):
        check_skips(metrics, max_consecutive_skips=3)


def test_loss_falls_on_a_memorisable_set(trainer, converted):
    """8 fixed triplets, 200 steps at lr 1e-4: the mean loss of the last 20 steps is well
    below that of the first 20 (measured 0.30×, asserted < 0.5×)."""
    state = trainer.init_state(params=converted[1])
    batch = trainer.shard_batch(triplets(seed=1))
    history = []
    for _ in range(200):
        state, metrics = trainer.step(state, batch)
        history.append(metrics["loss"])
    history = np.array([float(x) for x in history])
    first, last = history[:20].mean(), history[-20:].mean()
    print(f"loss: first 20 steps {first:.4f}, last 20 {last:.4f}, ratio {last / first:.3f}")
    assert np.isfinite(history).all() and int(metrics["skipped"]) == 0
    assert last < 0.5 * first


def test_step_compiles_once_per_shape(trainer, converted):
    """`max_traces=1`: every call above reused one compilation; a new batch shape traces again and trips the guard."""
    state = trainer.init_state(params=converted[1])
    state, _ = trainer.step(state, trainer.shard_batch(triplets(seed=2)))
    assert trainer.step._cache_size() == 1
    with pytest.raises(AssertionError, match="traced > 1 times"):
        trainer.step(state, trainer.shard_batch(triplets(size=2 * SIZE)))


def test_micro_batches_interleave_rows():
    x = jnp.arange(8)
    np.testing.assert_array_equal(_micro_batches(x, 2), [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_condition_dropout_rates_and_nulls():
    """IP2P: r < 0.10 → null text, 0.05 ≤ r < 0.15 → zero image: 5% each of text, image, both."""
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    cond = {"text": jnp.ones((n, 2, 3)), "visual": jnp.ones((n, 4, 3))}
    null = jnp.full((2, 3), -7.0)
    out, image = losses.condition_dropout(keys, cond, jnp.ones((n, 2, 2, 4)), null, 0.05)
    text_dropped = np.asarray(out["text"][:, 0, 0] == -7.0)
    image_dropped = np.asarray(image[:, 0, 0, 0] == 0.0)
    np.testing.assert_array_equal(image_dropped, np.asarray(out["visual"][:, 0, 0] == 0.0))
    for got in (text_dropped & ~image_dropped, image_dropped & ~text_dropped, text_dropped & image_dropped):
        assert abs(got.mean() - 0.05) < 0.006
    kept_text = np.asarray(out["text"])[~text_dropped]
    assert (kept_text == 1.0).all()


def test_learning_rate_schedule_and_ema_decay():
    train = ml_collections.ConfigDict(dict(learning_rate=1e-4, steps=1000, warmup_ratio=0.01, schedule="cosine"))
    schedule = optimizer.learning_rate_schedule(train)
    assert optimizer.warmup_steps(train) == 10
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(505), schedule(1000)],
                               [0.0, 5e-5, 1e-4, 5e-5, 0.0], atol=1e-9)  # fmt: skip
    train.schedule, train.warmup_ratio = "constant", 0.001
    schedule = optimizer.learning_rate_schedule(train)
    np.testing.assert_allclose([schedule(0), schedule(1), schedule(999)], [0.0, 1e-4, 1e-4], atol=1e-12)
    np.testing.assert_allclose([optimizer.ema_decay(n, 0.9999) for n in (1, 2, 3)], [0.0, 2 / 11, 3 / 12], rtol=1e-6)
    assert float(optimizer.ema_decay(10**6, 0.99)) == pytest.approx(0.99)


def test_ip2p_sd15_config_builds_a_sharded_unet_trainer():
    """The full-size config traces (no weights): only the UNet trains, split over fsdp."""
    config = load_config("ip2p_sd15")
    config.train.batch_size, config.train.grad_accum = 8, 1
    trainer = Trainer.from_config(config, mesh=mesh_lib.make_mesh(config.mesh))  # fsdp = all 8 devices
    assert trainer.trainable_count() == 859_532_484  # tests/golden/unet_sd15_ip2p.json
    assert dataclasses.asdict(UNetConfig.sd15(in_channels=8, remat=True)) == config.model.unet.to_dict()
    assert trainer.model.unet.config.remat and trainer.model.unet.dtype == jnp.bfloat16
    kernel = trainer.state_shardings["params"]["unet"]["mid_block"]["attentions_0"]["proj_in"]["kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")  # tensor has size 1 here
    assert trainer.state_shardings["params"]["vae"]["encoder"]["conv_in"]["kernel"].spec[2] is None


def _conv_layouts(compiled_text: str) -> set[str]:
    return set(re.findall(r"dim_labels=([^,\s]+)", compiled_text))


def test_unrolled_accumulation_equals_the_scan_and_keeps_cpu_convolutions_fast(converted):
    """Two micro-batches: the Python loop (the CPU default) and lax.scan give the same step;
    unrolled, every convolution of the compiled step is in XLA:CPU's canonical (fast) form,
    while the scan leaves its weight-gradient convolutions in the slow non-canonical form."""
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    batch = triplets(seed=3)
    results, layouts = {}, {}
    for unroll in (True, False):
        config = load_config("tiny")
        config.train.grad_accum, config.train.unroll_accumulation = 2, unroll
        trainer = Trainer.from_config(config, mesh=mesh)
        state = trainer.init_state(params=converted[1])
        sharded = trainer.shard_batch(batch)
        compiled = trainer.step.lower(state, sharded).compile()
        layouts[unroll] = _conv_layouts(compiled.as_text())
        results[unroll] = jax.device_get(compiled(state, sharded))
    assert layouts[True] == {"b01f_01io->b01f"}
    assert layouts[False] - {"b01f_01io->b01f"}
    (new_u, metrics_u), (new_s, metrics_s) = results[True], results[False]
    np.testing.assert_allclose(metrics_u["loss"], metrics_s["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_u["params"], new_s["params"])
