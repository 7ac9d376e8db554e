"""LLaMA: parity with transformers (GQA, RoPE θ, right padding), every checkpoint layout,
config checks, the 7B golden tree and compile time, the extended tokenizer."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from golden import check_golden
from safetensors.numpy import save_file

from fireedit_jax.convert import core
from fireedit_jax.convert.llama import abstract_params, convert_llama, load_llama, verify_llama
from fireedit_jax.data.tokenizer import NEW_TOKENS, load_tokenizer
from fireedit_jax.models.llama import LORA_PATTERNS, NEW_ROW_PATTERNS, Llama, LlamaConfig
from fireedit_jax.train.masks import count_params, trainable_mask

# Grouped-query attention (4 heads, 2 kv heads) and a RoPE base other than 10000.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)
NUM_NEW = 3
# Right-padded batch: row 1 has 9 real tokens of 12.
IDS = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 12))
MASK = np.ones((2, 12), bool)
MASK[1, 9:] = False


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch LlamaForCausalLM, its safetensors directory, its numpy state dict, our config, our params)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():  # move the norms off 1, so a swapped mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    with open(directory / "config.json") as f:
        config = LlamaConfig.from_hf(json.load(f), num_new_tokens=NUM_NEW)
    state = core.load_state_dict(str(directory))
    return model, directory, state, config, load_llama(str(directory), config)


# ------------------------------------------------------------------ parity with transformers


def test_logits_and_hidden_states_match_transformers(reference, highest_precision):
    model, _, _, config, params = reference
    assert (config.num_heads, config.num_kv_heads, config.rope_theta) == (4, 2, 500000.0)
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK).long(), output_hidden_states=True
        )
    out = Llama(config).apply(params, IDS, attention_mask=MASK, output_hidden_states=True)
    v = config.vocab_size
    assert out.logits.shape == (2, 12, v + NUM_NEW)
    assert out.hidden_states.shape == (config.num_layers + 1, 2, 12, config.hidden_size)
    # Every position, padded ones included (their queries see the real keys before them).
    np.testing.assert_allclose(np.asarray(out.logits[..., :v]), want.logits.numpy(), atol=1e-4)
    for i, h in enumerate(want.hidden_states):
        np.testing.assert_allclose(np.asarray(out.hidden_states[i]), h.numpy(), atol=1e-4, err_msg=f"hidden state {i}")
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state))
    # The new tokens' logits use the mean lm_head column.
    mean_head = params["params"]["lm_head"].mean(1)
    np.testing.assert_allclose(
        np.asarray(out.logits[..., v]), np.asarray(out.last_hidden_state) @ mean_head, atol=1e-4
    )
    assert verify_llama(model, params, config) <= 1e-4


def test_inputs_embeds_and_remat_give_the_same_output(reference, highest_precision):
    _, _, _, config, params = reference
    ids = IDS.copy()
    ids[:, 3] = config.vocab_size + 1  # a new token, embedded from new_embed
    model = Llama(config)
    want = model.apply(params, ids, attention_mask=MASK).logits
    embeds = model.apply(params, ids, method="embed")
    np.testing.assert_allclose(embeds[0, 3], params["params"]["new_embed"][1])
    got = model.apply(params, inputs_embeds=embeds, attention_mask=MASK).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    remat = Llama(dataclasses.replace(config, remat=True))
    loss = lambda m: lambda p: jnp.mean(m.apply(p, ids, attention_mask=MASK).logits ** 2)  # noqa: E731
    g_plain, g_remat = jax.grad(loss(model))(params), jax.grad(loss(remat))(params)
    for path, g in _flat(g_plain).items():
        np.testing.assert_allclose(_flat(g_remat)[path], g, atol=1e-6, err_msg=path)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply(params, ids, inputs_embeds=embeds)


# ------------------------------------------------------------------ checkpoint layouts


def _llava_hf(model, directory):
    """A real LlavaForConditionalGeneration holding the tiny LLaMA, saved to `directory`."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    llava = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=model.config.to_dict(), image_token_index=0)
    ).eval()
    llava.model.language_model.load_state_dict(model.model.state_dict())
    llava.lm_head.load_state_dict(model.lm_head.state_dict())
    llava.save_pretrained(directory)
    return llava


def test_every_layout_converts_to_identical_params(reference, tmp_path):
    model, _, state, config, params = reference
    want = _flat(params)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}

    llava_original = {**state, **extra}
    llava_original["model.mm_projector.0.weight"] = np.ones((64, 32), np.float32)
    llava_original["model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"] = np.ones(32, np.float32)

    # transformers 5 names its modules model.language_model.* / lm_head but saves them
    # under the transformers 4 names language_model.model.* / language_model.lm_head.
    llava_dir = tmp_path / "llava_hf"
    llava = _llava_hf(model, llava_dir)
    v4 = core.load_state_dict(str(llava_dir))
    v5 = {k: v.numpy() for k, v in llava.state_dict().items()}
    assert {"language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight"} <= set(v4)
    assert {"model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= set(v5)
    assert any(k.startswith("vision_tower.") for k in v4) and any(k.startswith("model.multi_modal_projector.") for k in v5)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / name))
    with open(sharded / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}, f)

    for name, got in {
        "original LLaVA": convert_llama(llava_original, config),
        "llava-hf v4 (saved, with config.json)": load_llama(str(llava_dir), config),
        "llava-hf v5": convert_llama(v5, config),
        "2-shard index": load_llama(str(sharded / "model.safetensors.index.json"), config),
    }.items():
        got = _flat(got)
        assert got.keys() == want.keys(), name
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{name}: {path}")
    assert verify_llama(str(llava_dir), params, config) <= 1e-4  # loads the saved Llava itself


def test_tied_embeddings_share_the_table_and_the_new_rows(tmp_path, highest_precision):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1, "tie_word_embeddings": True})
    ).eval()
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = LlamaConfig.from_hf(json.load(f), num_new_tokens=NUM_NEW)
    params = load_llama(str(tmp_path), config)
    assert config.tie_word_embeddings and {"lm_head", "new_lm_head"}.isdisjoint(params["params"])
    assert verify_llama(model, params, config) <= 1e-4
    logits = Llama(config).apply(params, IDS).logits
    new_rows = params["params"]["new_embed"]
    np.testing.assert_allclose(np.asarray(logits[..., -NUM_NEW:]), np.asarray(logits[..., -1:]).repeat(NUM_NEW, -1))
    assert np.allclose(new_rows, params["params"]["embed_tokens"].mean(0), atol=1e-7)


def test_bfloat16_storage_keeps_adapters_and_new_rows_float32(reference):
    _, _, state, config, _ = reference
    params = convert_llama(state, config, param_dtype=jnp.bfloat16)
    trained = _flat(trainable_mask(params, LORA_PATTERNS + NEW_ROW_PATTERNS))
    dtypes = {path: str(leaf.dtype) for path, leaf in _flat(params).items()}
    assert sum(trained.values()) == 2 * 2 + 2  # lora_a/lora_b on q_proj and v_proj, 2 new-row leaves
    assert {dtypes[p] for p in dtypes if trained[p]} == {"float32"}
    assert {dtypes[p] for p in dtypes if not trained[p]} == {"bfloat16"}


def test_config_mismatch_names_the_fields(reference, tmp_path):
    _, directory, state, config, _ = reference
    with open(directory / "config.json") as f:
        hf = json.load(f)
    for field, ours in (("num_attention_heads", "num_heads"), ("vocab_size", "vocab_size")):
        bad = tmp_path / field
        bad.mkdir()
        save_file(state, str(bad / "model.safetensors"))
        with open(bad / "config.json", "w") as f:
            json.dump({**hf, field: hf[field] * 2}, f)
        with pytest.raises(core.ConversionError, match=rf"{ours}: checkpoint {hf[field] * 2}, ours {hf[field]}"):
            load_llama(str(bad), config)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LlamaConfig.from_hf({**hf, "hidden_act": "gelu"})
    missing = {k: v for k, v in state.items() if k not in ("model.norm.weight", "model.layers.2.mlp.up_proj.weight")}
    with pytest.raises(core.ConversionError) as error:
        convert_llama(missing, config)
    assert "params/layers/up_proj/kernel: layers [2] missing" in str(error.value)
    assert "no source key: params/layers/up_proj/kernel, params/norm/scale" in str(error.value)


# ------------------------------------------------------------------ full-size LLaMA-7B

LLAMA_7B_PARAMS = 6_738_415_616
LORA_7B_PARAMS = 32 * 2 * (4096 * 8 + 8 * 4096)  # r 8 on q_proj and v_proj: 4,194,304


def test_llama_7b_golden_tree_and_counts():
    config = LlamaConfig.llama_7b(num_new_tokens=len(NEW_TOKENS))
    tree = abstract_params(config)
    described = check_golden("llama_7b", tree)
    new_rows = count_params(tree, trainable_mask(tree, NEW_ROW_PATTERNS))
    lora = count_params(tree, trainable_mask(tree, LORA_PATTERNS))
    assert new_rows == 2 * len(NEW_TOKENS) * 4096
    assert lora == LORA_7B_PARAMS
    assert described["total_params"] - new_rows - lora == LLAMA_7B_PARAMS
    assert count_params(abstract_params(LlamaConfig.llama_7b(lora_rank=0))) == LLAMA_7B_PARAMS


COMPILE_7B = textwrap.dedent(
    """
    import json, time
    import jax, jax.numpy as jnp, flax
    from fireedit_jax.convert.llama import abstract_params
    from fireedit_jax.models.llama import Llama, LlamaConfig
    config = LlamaConfig.llama_7b(num_new_tokens=36)
    params = flax.linen.meta.unbox(abstract_params(config, jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 512), jnp.bool_)
    model = Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    start = time.perf_counter()
    lowered = jax.jit(lambda p, i, m: model.apply(p, i, attention_mask=m).logits).lower(params, ids, mask)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    print(json.dumps({"lower_s": lowered_at - start, "compile_s": done - lowered_at,
                      "out": str(compiled.out_info)}))
    """
)


def test_llama_7b_forward_compiles_within_a_minute():
    # A fresh process without the persistent compilation cache, so the time is a real compile.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_7B], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    times = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nLLaMA-7B forward, seq 512, bf16: lower {times['lower_s']:.1f} s, compile {times['compile_s']:.1f} s")
    assert "(1, 512, 32036)" in times["out"] and "float32" in times["out"]
    assert times["lower_s"] + times["compile_s"] < 60


# ------------------------------------------------------------------ tokenizer


def _tiny_tokenizer(directory, words=("hello", "world", "red", "apple")):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(("<unk>", "<s>", "</s>") + tuple(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    return len(vocab)


def test_tokenizer_gets_new_tokens_after_the_vocabulary(tmp_path):
    vocab = _tiny_tokenizer(tmp_path / "tok")
    tokenizer, ids = load_tokenizer(str(tmp_path / "tok"), vocab)
    assert len(tokenizer) == vocab + len(NEW_TOKENS) == vocab + 36
    assert (ids.image, ids.region, ids.im_start, ids.im_end) == (vocab, vocab + 1, vocab + 2, vocab + 3)
    assert ids.img == tuple(range(vocab + 4, vocab + 36))
    encoded = tokenizer("red apple [IMG_1][IMG_32] <im_start>", add_special_tokens=False).input_ids
    assert encoded == [5, 6, ids.img[0], ids.img[-1], ids.im_start]
    # Saving the extended tokenizer and loading it again changes nothing.
    tokenizer.save_pretrained(tmp_path / "extended")
    again, ids_again = load_tokenizer(str(tmp_path / "extended"), vocab)
    assert ids_again == ids and len(again) == len(tokenizer)
    with pytest.raises(ValueError, match=rf"model expects {vocab + 2} \+ 36 tokens"):
        load_tokenizer(str(tmp_path / "tok"), vocab + 2)


def test_tokenizer_directory_without_files_names_them(tmp_path):
    _tiny_tokenizer(tmp_path / "tok")
    os.remove(tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor tokenizer.model \(found: \['tokenizer_config.json'\]\)"):
        load_tokenizer(str(tmp_path / "tok"), 7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"), 7)
