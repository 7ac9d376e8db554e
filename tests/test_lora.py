"""LoRA: the layer's arithmetic and init, zero-B identity, merging, and training only the
adapters and new rows through a path-regex mask."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.models.llama import LORA_PATTERNS, NEW_ROW_PATTERNS, Llama, LlamaConfig
from fireedit_jax.nn.lora import LoRADense, merge_lora
from fireedit_jax.train.masks import combine, count_params, split, trainable_mask

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_new_tokens=3,
    lora_targets=("q_proj", "v_proj", "down_proj"),
)
IDS = np.array([[1, 5, 64, 9, 66, 2], [3, 65, 7, 0, 0, 0]])  # ids ≥ 64 are new tokens
MASK = IDS > 0


def _flat(tree):
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _perturbed_b(params, seed=1):
    """Nonzero B everywhere (B starts at zero, which makes the adapter a no-op)."""
    key = iter(jax.random.split(jax.random.key(seed), 64))
    flat = _flat(params)
    for path in flat:
        if path.endswith("lora_b"):
            flat[path] = 0.1 * jax.random.normal(next(key), flat[path].shape)
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


@pytest.fixture(scope="module")
def params():
    return flax.linen.meta.unbox(Llama(CONFIG).init(jax.random.key(0), IDS))


def _without_lora(params):
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flax.traverse_util.flatten_dict(params).items() if not k[-1].startswith("lora_")}
    )


# ------------------------------------------------------------------ the layer


def test_lora_dense_arithmetic_and_init(highest_precision):
    layer = LoRADense(24, rank=4, alpha=8.0, dropout=0.5, use_bias=True)
    x = np.random.default_rng(0).normal(size=(3, 5, 40)).astype(np.float32)
    p = flax.linen.meta.unbox(layer.init(jax.random.key(0), x))["params"]
    assert set(p) == {"kernel", "bias", "lora_a", "lora_b"}
    assert not np.any(p["lora_b"])
    bound = 1 / np.sqrt(40)  # kaiming_uniform(a=√5) on fan_in 40, as PEFT
    assert np.abs(p["lora_a"]).max() <= bound and np.abs(p["lora_a"]).max() > 0.9 * bound

    p["lora_b"] = np.random.default_rng(1).normal(size=(4, 24)).astype(np.float32)
    p["bias"] = np.full(24, 0.3, np.float32)
    want = x @ p["kernel"] + p["bias"] + (8.0 / 4) * (x @ p["lora_a"] @ p["lora_b"])
    got = layer.apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # Dropout acts only on the adapter's input, only when not deterministic.
    dropped = layer.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(dropped) - want).max() > 1e-2
    no_update = LoRADense(24, rank=4, alpha=8.0, dropout=0.5, use_bias=True)
    p["lora_b"] = np.zeros((4, 24), np.float32)
    np.testing.assert_array_equal(
        np.asarray(no_update.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})),
        np.asarray(LoRADense(24, use_bias=True).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)),
    )


# ------------------------------------------------------------------ in the LLaMA


def test_zero_b_equals_the_base_model_exactly(params):
    assert all(not np.any(v) for k, v in _flat(params).items() if k.endswith("lora_b"))
    with_lora = Llama(CONFIG).apply(params, IDS, attention_mask=MASK, output_hidden_states=True)
    base = Llama(dataclasses.replace(CONFIG, lora_rank=0)).apply(
        _without_lora(params), IDS, attention_mask=MASK, output_hidden_states=True
    )
    np.testing.assert_array_equal(np.asarray(with_lora.logits), np.asarray(base.logits))
    np.testing.assert_array_equal(np.asarray(with_lora.hidden_states), np.asarray(base.hidden_states))


def test_merged_equals_unmerged(params, highest_precision):
    trained = _perturbed_b(params)
    unmerged = Llama(CONFIG).apply(trained, IDS, attention_mask=MASK).logits
    merged_params = merge_lora(trained, CONFIG)
    assert not any("lora_" in k for k in _flat(merged_params))
    merged = Llama(dataclasses.replace(CONFIG, lora_rank=0)).apply(merged_params, IDS, attention_mask=MASK).logits
    base = Llama(CONFIG).apply(params, IDS, attention_mask=MASK).logits
    assert np.abs(np.asarray(unmerged) - np.asarray(base)).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5)
    # Folding into a bfloat16 kernel keeps the kernel's dtype.
    bf16 = jax.tree.map(lambda x: x, trained)
    bf16["params"]["layers"]["q_proj"]["kernel"] = trained["params"]["layers"]["q_proj"]["kernel"].astype(jnp.bfloat16)
    assert merge_lora(bf16, 2.0)["params"]["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16


def test_gradient_reaches_only_adapters_and_new_rows(params):
    trained = _perturbed_b(params)  # with B = 0 the gradient of A would be zero
    mask = trainable_mask(trained, LORA_PATTERNS + NEW_ROW_PATTERNS)
    flat_mask = _flat(mask)
    selected = sorted(k for k, m in flat_mask.items() if m)
    assert selected == [
        *(f"params/layers/{proj}/lora_{ab}" for proj in ("down_proj", "q_proj", "v_proj") for ab in "ab"),
        "params/new_embed",
        "params/new_lm_head",
    ]
    d, r, n_kv = CONFIG.hidden_size, CONFIG.lora_rank, CONFIG.num_kv_heads * CONFIG.head_dim
    lora = CONFIG.num_layers * r * ((d + d) + (d + n_kv) + (CONFIG.intermediate_size + d))
    assert count_params(trained, mask) == lora + 2 * CONFIG.num_new_tokens * d

    def loss(p):
        out = Llama(CONFIG).apply(p, IDS, attention_mask=MASK, deterministic=False, rngs={"dropout": jax.random.key(3)})
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, IDS[:, 1:, None], -1))

    trainable, frozen = split(trained, mask)
    grads = _flat(jax.grad(lambda t: loss(combine(t, frozen)))(trainable))
    assert grads.keys() == flat_mask.keys()
    assert all(grads[k] is None for k in flat_mask if not flat_mask[k])  # frozen: not differentiated at all
    grads = {k: grads[k] for k in selected}
    for path, g in grads.items():
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
    # Every new row is used in the batch (ids 64, 65, 66), so every row has a gradient.
    assert np.all(np.abs(grads["params/new_embed"]).max(1) > 0)
    # Without the split, the frozen base would get gradients too: the mask is what excludes them.
    full = _flat(jax.grad(loss)(trained))
    assert np.abs(full["params/layers/k_proj/kernel"]).max() > 0
    np.testing.assert_allclose(full["params/new_lm_head"], grads["params/new_lm_head"], rtol=1e-5, atol=1e-7)
