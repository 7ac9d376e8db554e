"""T5 / FLAN-T5 encoder against transformers: position buckets, parity, conversion, CLI, presets."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from golden import check_golden
from transformers.models.t5.modeling_t5 import T5Attention

from fireedit_jax import cli
from fireedit_jax.convert import core, reference
from fireedit_jax.convert.t5 import abstract_params, check_hf_config, convert_t5, load_t5, verify_t5
from fireedit_jax.models.t5 import T5Encoder, T5EncoderConfig, relative_position_buckets


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def saved_t5(request, tmp_path_factory):
    """A tiny random T5EncoderModel saved by transformers, its directory and our config from its config.json."""
    directory = str(tmp_path_factory.mktemp(f"t5_{request.param}"))
    model = reference.save_t5(directory, feed_forward_proj=request.param)
    with open(f"{directory}/config.json") as f:
        config = T5EncoderConfig.from_hf(json.load(f))
    return model, directory, config


@pytest.fixture(scope="module")
def full_t5(tmp_path_factory):
    """A tiny random T5ForConditionalGeneration (encoder, decoder, LM head), saved, and its directory."""
    directory = str(tmp_path_factory.mktemp("t5_full"))
    return reference.save_t5(directory, full=True, seed=1), directory


def _ids_and_mask(vocab_size: int):
    """Right-padded ids: row 0 full (16 tokens), row 1 with 9 real tokens, row 2 with 3; pads are 0."""
    ids = np.random.default_rng(0).integers(1, vocab_size, size=(3, 16))
    mask = np.arange(16)[None, :] < np.array([16, 9, 3])[:, None]
    return np.where(mask, ids, 0), mask


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    offsets = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    want = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=num_buckets,
                                                 max_distance=max_distance)  # fmt: skip
    np.testing.assert_array_equal(relative_position_buckets(300, 300, num_buckets, max_distance), want.numpy())


def test_matches_transformers_with_padding(saved_t5, highest_precision):
    model, directory, config = saved_t5
    assert config == T5EncoderConfig.tiny(feed_forward_proj=config.feed_forward_proj)
    params = load_t5(directory, config)
    ids, mask = _ids_and_mask(config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    forward = jax.jit(lambda p, i, m: T5Encoder(config).apply(p, i, m))
    out = np.asarray(forward(params, ids, mask))
    assert out.shape == (3, 16, config.d_model)
    # Both models mask only keys, so padded positions agree too. The claim is <= 2e-6 (outputs up to ~3.6, so a few
    # float32 ulps); measured 1.25e-6 (gated-gelu) and 8.9e-7 (relu) on the 2-core CI machine, 2026-12-07.
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=2e-6)
    # Padded keys are not attended to: other tokens there leave the real positions unchanged.
    other = np.where(mask, ids, (ids + 7) % config.vocab_size)
    np.testing.assert_allclose(np.asarray(forward(params, other, mask))[mask], out[mask], atol=1e-6)
    # A mask of ones is no mask.
    full = np.ones_like(mask)
    np.testing.assert_allclose(np.asarray(forward(params, ids, full)), np.asarray(forward(params, ids, None)), atol=1e-6)


def test_full_checkpoint_converts_as_the_encoder(full_t5, highest_precision):
    model, directory = full_t5
    config = T5EncoderConfig.from_hf(model.config.to_dict())
    # In memory the state dict holds the tied copies (encoder / decoder embed_tokens, lm_head) too.
    in_memory = {k: v.numpy() for k, v in model.state_dict().items()}
    assert {"encoder.embed_tokens.weight", "lm_head.weight"} <= in_memory.keys()
    encoder_only = {k: v for k, v in in_memory.items() if k.startswith("encoder.")}  # embeddings under their tied name
    converted = [convert_t5(state, config) for state in (core.load_state_dict(directory), in_memory, encoder_only)]
    for other in converted[1:]:
        assert jax.tree.all(jax.tree.map(np.array_equal, converted[0], other))
    # the parity claim, <= 2e-6: measured 1.67e-6 and 1.19e-6 (2026-12-07)
    assert verify_t5(directory, converted[0], config) <= 2e-6
    assert verify_t5(model, converted[0], config, batch=3, length=9) <= 2e-6


def test_conversion_errors_name_the_problem(full_t5):
    model, directory = full_t5
    state = core.load_state_dict(directory)
    config = T5EncoderConfig.from_hf(model.config.to_dict())
    bad = {k: v for k, v in state.items() if k != "encoder.final_layer_norm.weight"}
    bad["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = np.zeros((37, 32), np.float32)  # relu's, in a gated model
    bad["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    bad["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
    pattern = (r"(?s)layers/q/kernel: layers \[\] missing, layers \[2\] not in the model"
               r".*unexpected keys in the checkpoint: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight, "
               r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"
               r".*parameters with no source key: params/final_layer_norm/scale")  # fmt: skip
    with pytest.raises(core.ConversionError, match=pattern):
        convert_t5(bad, config)
    untied = {**state, "encoder.embed_tokens.weight": state["shared.weight"] + 1}
    with pytest.raises(core.ConversionError, match="shared.weight and encoder.embed_tokens.weight differ"):
        convert_t5(untied, config)
    with pytest.raises(core.ConversionError, match="shape mismatches: params/shared"):
        convert_t5(state, T5EncoderConfig.tiny(vocab_size=100))
    with pytest.raises(core.ConversionError, match="num_layers: checkpoint 2, ours 3; feed_forward_proj: checkpoint"):
        check_hf_config(model.config.to_dict(), T5EncoderConfig.tiny(num_layers=3, feed_forward_proj="relu"))
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-silu' not supported"):
        T5EncoderConfig.from_hf({"feed_forward_proj": "gated-silu"})


def test_cli_convert_with_verify(full_t5, tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    _, directory = full_t5
    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "blue": 1}, "<unk>")))
    words.save_pretrained(directory)  # beside the weights, as a T5 directory ships its tokenizer
    out = tmp_path / "out"
    code = cli.main(["convert", "t5", "--src", directory, "--out", str(out), "--verify"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert float(printed.strip().split("=")[-1]) <= 2e-6  # the parity claim (as verify_t5 above)
    saved = json.loads((out / "config.json").read_text())
    assert saved["network"] == "t5" and saved["config"]["num_layers"] == 2 and (out / "params").is_dir()
    assert PreTrainedTokenizerFast.from_pretrained(out / "tokenizer").get_vocab() == words.get_vocab()
    assert not list((out / "tokenizer").glob("*.safetensors"))  # the tokenizer files alone
    # A mismatched checkpoint is one clear error, not a traceback.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"feed_forward_proj": "gated-silu"}))
    assert cli.main(["convert", "t5", "--src", str(tmp_path / "bad"), "--out", str(tmp_path / "x")]) == 2
    assert "gated-silu" in capsys.readouterr().err


def test_golden_flan_t5_base():
    config = T5EncoderConfig.flan_t5_base()
    described = check_golden("t5_flan_base", abstract_params(config))
    reference_config = transformers.T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                                             feed_forward_proj="gated-gelu")  # google/flan-t5-base's encoder
    with torch.device("meta"):
        torch_model = transformers.T5EncoderModel(reference_config)
    assert described["total_params"] == sum(p.numel() for p in torch_model.parameters()) == 109_628_544
    assert T5EncoderConfig.from_hf(reference_config.to_dict()) == config
