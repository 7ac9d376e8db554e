"""The region-aware VLM: template, splicing, [IMG] positions, L_VLM, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.data.tokenizer import NEW_TOKENS, add_new_tokens
from fireedit_jax.data.vlm_inputs import build_vlm_inputs
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.regions import RegionEncoderConfig
from fireedit_jax.models.vlm import VLM, img_positions, splice, token_id, vlm_loss

WORDS = "user: assistant: make the left cup blue red remove small circle square a an it".split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny():
    tokenizer = word_tokenizer()
    base = len(tokenizer)
    ids = add_new_tokens(tokenizer, base)
    llm = LlamaConfig(vocab_size=base, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, num_new_tokens=len(NEW_TOKENS), max_position_embeddings=512)  # fmt: skip
    vision = DINOv2Config(hidden_size=16, num_layers=3, num_heads=2, image_size=32, patch_size=8)
    regions = RegionEncoderConfig.tiny(feature_dim=16, llm_dim=32, patch_size=8)
    return tokenizer, ids, llm, vision, regions


def test_template_targets_and_buckets(tiny):
    tokenizer, ids, llm, *_ = tiny
    batch = build_vlm_inputs(tokenizer, ids, ["make the left cup blue", "remove it"], [3, 0],
                             num_image_tokens=4, length_buckets=(48, 56, 64), box_buckets=(0, 4, 8))  # fmt: skip
    assert batch.input_ids.shape == (2, 56) and batch.box_mask.shape == (2, 4)  # 49 tokens → 56
    assert batch.box_mask.sum(1).tolist() == [3, 0]
    for row, targets in zip(batch.input_ids, batch.target_mask):
        assert row[targets].tolist() == list(ids.img)  # the targets are exactly the 32 [IMG] tokens
        assert (row == ids.image).sum() == 4
    assert (batch.input_ids[0] == ids.region).sum() == 3 and (batch.input_ids[1] == ids.region).sum() == 0
    vqa = build_vlm_inputs(tokenizer, ids, ["make it blue"], [1], num_image_tokens=4, answers=["a red circle"],
                           length_buckets=(48,), box_buckets=(4,))  # fmt: skip
    answer = vqa.input_ids[0][vqa.target_mask[0]].tolist()
    assert answer == tokenizer("a red circle", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        build_vlm_inputs(tokenizer, ids, ["x"], [9], num_image_tokens=4, box_buckets=(8,))


def test_splice_plants_rows_in_order_and_img_positions(tiny):
    tokenizer, ids, *_ = tiny
    batch = build_vlm_inputs(tokenizer, ids, ["make the left cup blue", "remove it"], [3, 1],
                             num_image_tokens=4, length_buckets=(64,), box_buckets=(4,))  # fmt: skip
    input_ids = jnp.asarray(batch.input_ids)
    embeds = jnp.zeros((2, 64, 1)) - 1
    rows = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1) * 10  # planted values 10..80
    out = np.asarray(splice(embeds, input_ids, ids.region, rows))[..., 0]
    for b, r in enumerate([3, 1]):
        slots = np.flatnonzero(batch.input_ids[b] == ids.region)
        np.testing.assert_array_equal(out[b, slots], np.asarray(rows)[b, :r, 0])
        others = np.setdiff1d(np.arange(64), slots)
        assert (out[b, others] == -1).all()
    positions = np.asarray(img_positions(input_ids, ids.img[0]))
    for b in range(2):
        np.testing.assert_array_equal(positions[b], np.flatnonzero(batch.input_ids[b] >= ids.img[0]))
    # plant each position's index as its hidden state: the gather returns exactly those positions
    hidden = jnp.broadcast_to(jnp.arange(64.0)[None, :, None], (2, 64, 3))
    e = np.asarray(jnp.take_along_axis(hidden, jnp.asarray(positions)[..., None], axis=1))
    np.testing.assert_array_equal(e[..., 0], positions)


def test_vlm_loss_equals_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    target = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], bool)

    def nll(b, p):
        z = logits[b, p - 1]
        return -(z[ids[b, p]] - np.log(np.exp(z).sum()))

    want = np.mean([nll(0, 2), nll(0, 3), nll(1, 1), nll(1, 4)])
    np.testing.assert_allclose(vlm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(target)), want, rtol=1e-5)
    only_first = vlm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(target), jnp.array([True, False]))
    np.testing.assert_allclose(only_first, np.mean([nll(0, 2), nll(0, 3)]), rtol=1e-5)


@pytest.mark.parametrize("with_regions", [True, False])
def test_vlm_forward_and_one_compilation_per_bucket(tiny, with_regions):
    tokenizer, ids, llm, vision, regions = tiny
    model = VLM(llm, vision, regions if with_regions else None)
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    first = build_vlm_inputs(tokenizer, ids, ["make the left cup blue", "remove it"], [3, 1],
                             num_image_tokens=4, length_buckets=(64,), box_buckets=(4,))  # fmt: skip
    boxes = jnp.tile(jnp.array([[0.1, 0.1, 0.6, 0.5]]), (2, 4, 1))
    params = model.init(jax.random.key(1), pixels, first.input_ids, first.attention_mask, boxes, first.box_mask)
    traces = []

    @jax.jit
    def forward(params, input_ids, attention_mask, box_mask):
        traces.append(1)
        out = model.apply(params, pixels, input_ids, attention_mask, boxes, box_mask)
        return out, vlm_loss(out.logits, input_ids, jnp.asarray(first.target_mask))

    out, loss = forward(params, first.input_ids, first.attention_mask, first.box_mask)
    assert out.e.shape == (2, 32, 32) and np.isfinite(loss)
    second = build_vlm_inputs(tokenizer, ids, ["blue", "make the small red circle a square"], [0, 2],
                              num_image_tokens=4, length_buckets=(64,), box_buckets=(4,))  # fmt: skip
    out2, _ = forward(params, second.input_ids, second.attention_mask, second.box_mask)
    assert len(traces) == 1  # same buckets, different lengths and box counts: one compilation
    assert not np.allclose(out.e, out2.e)
    if with_regions:  # region tokens reach e: moving a real box changes it
        moved = model.apply(params, pixels, first.input_ids, first.attention_mask, boxes * 0.5, first.box_mask)
        assert not np.allclose(moved.e, out.e)
        assert "regions" in params["params"]
    else:
        assert "regions" not in params["params"]
    assert token_id(llm, "[IMG_1]") == ids.img[0]
