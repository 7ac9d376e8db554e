"""SmartEdit's Q-Former against transformers' Blip2QFormerModel: conversion (all layouts), parity, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from golden import check_golden
from safetensors.numpy import save_file

from fireedit_jax.convert import core
from fireedit_jax.convert.qformer import abstract_params, convert_qformer, load_qformer, verify_qformer
from fireedit_jax.models.qformer import QFormer, QFormerConfig

HF = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=24,
          cross_attention_frequency=2)
NUM_QUERIES = 5


@pytest.fixture(scope="module")
def reference():
    """A tiny random Blip2QFormerModel (cross-attention in layers 0 and 2) and query tokens."""
    torch.manual_seed(0)
    model = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**HF)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases, so swapped or dropped ones would show
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, torch.randn(1, NUM_QUERIES, HF["hidden_size"])


@pytest.fixture(scope="module")
def config(reference):
    return QFormerConfig.from_hf(reference[0].config.to_dict(), num_queries=NUM_QUERIES)


def _blip2_state(reference) -> dict[str, np.ndarray]:
    """The Q-Former part of a Blip2Model state dict, plus a vision-tower key that must be ignored."""
    model, tokens = reference
    state = {f"qformer.{k}": v.numpy() for k, v in model.state_dict().items()}
    return {**state, "query_tokens": tokens.numpy(), "vision_model.post_layernorm.weight": np.ones(3, np.float32)}


def _inputs(length=9):
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, length, HF["encoder_hidden_size"])).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, 5:] = False
    return states, mask


@pytest.fixture(scope="module")
def forward(config):
    return jax.jit(lambda p, s, m: QFormer(config).apply(p, s, m))


@pytest.fixture(scope="module")
def params(reference, config, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qformer") / "model.safetensors")
    save_file(_blip2_state(reference), path)
    return load_qformer(path, config)


def test_config_from_hf_dicts(config):
    assert (config.num_layers, config.encoder_width, config.cross_attention_freq) == (4, 24, 2)
    blip2 = QFormerConfig.from_hf({"qformer_config": HF, "num_query_tokens": 32})
    assert blip2.num_queries == 32 and blip2.hidden_size == 32
    # The BertConfig LAVIS / SmartEdit build (init_sd_qformer).
    bert = QFormerConfig.from_hf({"hidden_size": 768, "num_hidden_layers": 6, "encoder_width": 4096,
                                  "cross_attention_freq": 2, "query_length": 77, "layer_norm_eps": 1e-12})
    assert bert == QFormerConfig.smartedit()


def test_matches_transformers_with_encoder_mask(reference, config, params, forward, highest_precision):
    model, tokens = reference
    states, mask = _inputs()
    with torch.no_grad():
        want = model(query_embeds=tokens.expand(2, -1, -1), encoder_hidden_states=torch.from_numpy(states),
                     encoder_attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = np.asarray(forward(params, states, mask))
    assert got.shape == (2, NUM_QUERIES, HF["hidden_size"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert verify_qformer(model, params, config, length=12) < 1e-4


def test_masked_encoder_positions_do_not_matter(params, forward, highest_precision):
    states, mask = _inputs()
    out = np.asarray(forward(params, states, mask))
    perturbed = states.copy()
    perturbed[1, 5:] += 10.0 * np.random.default_rng(1).normal(size=perturbed[1, 5:].shape)
    np.testing.assert_allclose(np.asarray(forward(params, perturbed, mask)), out, atol=1e-6)
    # Masked positions act as absent ones.
    np.testing.assert_allclose(np.asarray(forward(params, states[1:, :5], None))[0], out[1], atol=1e-5)
    # Unmasked positions do matter (row 0 sees all of them).
    changed = np.asarray(forward(params, perturbed, np.ones_like(mask)))
    assert np.max(np.abs(changed[1] - out[1])) > 1e-2


def _lavis_names(state, prefix, query_tokens):
    """The same weights spelled as LAVIS' BERT Q-Former (Qformer.py) / SmartEdit's copy names them."""
    renamed = {}
    for key, value in state.items():
        if key == "query_tokens":
            renamed[query_tokens] = value
        elif key.startswith("qformer."):
            key = key.removeprefix("qformer.").replace(".attention.attention.", ".attention.self.")
            key = key.replace(".crossattention.attention.", ".crossattention.self.")
            key = key.replace("layernorm.", "embeddings.LayerNorm.")
            renamed[prefix + key] = value
    d = HF["hidden_size"]
    text_only = {  # a BERT Q-Former's text parts, which the query path does not use
        "embeddings.word_embeddings.weight": np.zeros((11, d), np.float32),
        "embeddings.position_embeddings.weight": np.zeros((13, d), np.float32),
        "embeddings.position_ids": np.arange(13)[None],
        "encoder.layer.1.intermediate.dense.weight": np.zeros((37, d), np.float32),
        "encoder.layer.1.output.LayerNorm.weight": np.zeros((d,), np.float32),
    }
    return {**renamed, **{prefix + k: v for k, v in text_only.items()}}


@pytest.mark.parametrize("prefix,query_tokens,extra", [
    ("sd_qformer.", "sd_query_tokens", {"mm_projector.weight": np.zeros((4, 3), np.float32)}),
    ("Qformer.bert.", "query_tokens", {"Qformer.cls.predictions.bias": np.zeros((11,), np.float32)}),
], ids=["smartedit", "lavis"])
def test_lavis_layouts_convert_like_transformers(reference, config, params, prefix, query_tokens, extra):
    state = {**_lavis_names(_blip2_state(reference), prefix, query_tokens), **extra}
    converted = convert_qformer(state, config)
    jax.tree.map(np.testing.assert_array_equal, converted, jax.tree.map(np.asarray, params))


def test_conversion_names_missing_and_unknown_keys(reference, config):
    state = _blip2_state(reference)
    del state["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    state["qformer.encoder.layer.1.crossattention.attention.key.weight"] = np.zeros((32, 24), np.float32)
    with pytest.raises(core.ConversionError) as error:
        convert_qformer(state, config)
    message = str(error.value)
    assert "layers_2/cross_attention/key/kernel" in message
    assert "qformer.encoder.layer.1.crossattention.attention.key.weight" in message
    with pytest.raises(core.ConversionError, match="not a Q-Former checkpoint"):
        convert_qformer({"foo.weight": np.zeros(3)}, config)


def test_dropout_only_when_not_deterministic(params, config):
    states, mask = _inputs()
    model = QFormer(config)
    base = model.apply(params, states, mask)
    dropped = model.apply(params, states, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert np.max(np.abs(np.asarray(dropped) - np.asarray(base))) > 1e-3


def test_smartedit_golden_tree():
    config = QFormerConfig.smartedit()
    tree = abstract_params(config)
    layers = tree["params"]
    assert [("cross_attention" in layers[f"layers_{i}"]) for i in range(6)] == [True, False] * 3
    assert jax.eval_shape(QFormer(config).apply, tree, jnp.zeros((1, 32, 4096))).shape == (1, 77, 768)
    got = check_golden("qformer_smartedit", tree)
    # transformers' Blip2QFormerModel (6 layers, encoder width 4096) has 64,955,904, plus 77 × 768 query tokens.
    assert got["total_params"] == 65_015_040
