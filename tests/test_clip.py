"""CLIP text and vision towers against transformers: conversion, parity, golden trees."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from golden import check_golden

from fireedit_jax.convert import core
from fireedit_jax.convert.clip import (
    abstract_params,
    check_hf_config,
    convert_clip_text,
    convert_clip_vision,
    load_clip_text,
    load_clip_vision,
    verify_clip_text,
    verify_clip_vision,
)
from fireedit_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=96, pad_token_id=97, eos_token_id=98)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, hidden_act="gelu")


def _perturb_norms(model):
    """Random LayerNorm scales/biases and class embedding, so swapped or dropped ones would show."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save(model, tmp_path_factory, name):
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    """A tiny random two-tower CLIPModel (projection_dim 24), saved, and its directory."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = _perturb_norms(transformers.CLIPModel(config))
    return model, _save(model, tmp_path_factory, "clip")


def _ids_and_mask():
    """Right-padded ids: row 0 full (EOS last), row 1 with 9 real tokens; pads are EOS, as CLIP's tokenizer."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(2, 16))
    mask = np.ones((2, 16), bool)
    mask[1, 9:] = False
    ids[0, 15], ids[1, 8:] = 98, 98
    return ids, mask


@pytest.mark.parametrize("eos_token_id", [98, 2], ids=["first-eos", "legacy-argmax"])
def test_text_matches_transformers(eos_token_id, tmp_path_factory, highest_precision):
    torch.manual_seed(1)
    reference = _perturb_norms(transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TEXT, "eos_token_id": eos_token_id})))
    directory = _save(reference, tmp_path_factory, "clip_text")
    config = CLIPTextConfig.from_hf(reference.config.to_dict())
    assert config.eos_token_id == eos_token_id and config.num_layers == 3
    params = load_clip_text(directory, config)
    ids, mask = _ids_and_mask()
    if eos_token_id == 2:  # pooling at argmax(ids): make row 1's maximum an early, non-EOS token
        ids = np.where(ids == 98, 0, ids)
        ids[1, 4] = 98
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
    out = jax.jit(lambda p, i, m: CLIPTextModel(config).apply(p, i, m, hidden_layers=(0, 1, 2, 3)))(params, ids, mask)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), want.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooler_output), want.pooler_output.numpy(), atol=1e-4)
    for got, expected in zip(out.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-4)
    pooled_at = 4 if eos_token_id == 2 else 8
    np.testing.assert_allclose(np.asarray(out.pooler_output[1]), np.asarray(out.last_hidden_state[1, pooled_at]))
    assert out.embeds is None


def test_vision_hidden_states_with_interpolated_positions(tmp_path_factory, highest_precision):
    torch.manual_seed(2)
    reference = _perturb_norms(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    directory = _save(reference, tmp_path_factory, "clip_vision")
    config = CLIPVisionConfig.from_hf(reference.config.to_dict())
    params = load_clip_vision(directory, config)
    # 35×52 pixels: a 5×7 patch grid (3 pixels of remainder dropped) against the trained 4×4.
    pixels = np.random.default_rng(0).normal(size=(2, 35, 52, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True, output_hidden_states=True
        )
    out = jax.jit(lambda p, x: CLIPVisionModel(config).apply(p, x, hidden_layers=(0, 1, 2, 3, -2)))(params, pixels)
    assert out.hidden_states[0].shape == (2, 1 + 5 * 7, 32)
    for got, expected in zip(out.hidden_states, (*want.hidden_states, want.hidden_states[-2]), strict=True):
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), want.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooler_output), want.pooler_output.numpy(), atol=1e-4)
    with pytest.raises(IndexError, match="out of range"):
        CLIPVisionModel(config).apply(params, pixels, hidden_layers=(4,))


def test_towers_from_full_clipmodel(full_clip, highest_precision):
    model, directory = full_clip
    state = core.load_state_dict(directory)
    vision_config = CLIPVisionConfig.from_hf(model.config.to_dict())
    # The same weights as a standalone CLIPVisionModel convert identically.
    standalone = transformers.CLIPVisionModel(model.config.vision_config)
    standalone.load_state_dict(model.vision_model.state_dict())
    want = convert_clip_vision({k: v.numpy() for k, v in standalone.state_dict().items()}, vision_config)
    got = convert_clip_vision(state, vision_config)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    # With projections: both towers and their embeddings match transformers.
    text_config = CLIPTextConfig.from_hf(model.config.to_dict(), with_projection=True)
    vision_config = dataclasses.replace(vision_config, with_projection=True)
    assert text_config.projection_dim == vision_config.projection_dim == 24
    assert verify_clip_text(directory, load_clip_text(directory, text_config), text_config) < 1e-4
    assert verify_clip_vision(model, convert_clip_vision(state, vision_config), vision_config, size=42) < 1e-4
    # Projected embeddings agree with CLIPModel's own get_*_features.
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want_text = model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long())
    embeds = CLIPTextModel(text_config).apply(convert_clip_text(state, text_config), ids, mask).embeds
    np.testing.assert_allclose(np.asarray(embeds), want_text.pooler_output.numpy(), atol=1e-4)


def test_conversion_errors_name_the_problem(full_clip):
    model, directory = full_clip
    state = core.load_state_dict(directory)
    text_config = CLIPTextConfig.from_hf(model.config.to_dict())
    bad = {k: v for k, v in state.items() if k != "text_model.final_layer_norm.bias"}
    bad["text_model.encoder.layers.3.mlp.fc1.bias"] = np.zeros(37, np.float32)
    with pytest.raises(core.ConversionError, match=r"(?s)encoder/layers/fc1/bias: layers \[\] missing, layers \[3\].*final_layer_norm/bias"):
        convert_clip_text(bad, text_config)
    text_only = {k: v for k, v in state.items() if not k.startswith("text_projection")}
    with pytest.raises(core.ConversionError, match="text_projection/kernel"):
        convert_clip_text(text_only, dataclasses.replace(text_config, with_projection=True))
    with pytest.raises(core.ConversionError, match="num_layers: checkpoint 3, ours 4; image_size: checkpoint 28, ours 56"):
        ours = dataclasses.replace(CLIPVisionConfig.from_hf(model.config.to_dict()), num_layers=4, image_size=56)
        check_hf_config(model.config.to_dict(), ours)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextConfig(hidden_act="relu")


@pytest.mark.parametrize(
    "name,config,reference_config",
    [
        ("clip_text_l14", CLIPTextConfig.vit_l14(),
         transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                                     eos_token_id=2)),  # as SD1.5's text encoder config
        ("clip_vision_l14", CLIPVisionConfig.vit_l14(),
         transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, patch_size=14, projection_dim=768)),
    ],
)
def test_golden_vit_l14(name, config, reference_config):
    described = check_golden(name, abstract_params(config))
    reference_class = transformers.CLIPTextModel if "text" in name else transformers.CLIPVisionModel
    with torch.device("meta"):
        reference = reference_class(reference_config)
    want = {"clip_text_l14": 123_060_480, "clip_vision_l14": 303_179_776}[name]
    assert described["total_params"] == sum(p.numel() for p in reference.parameters()) == want
    assert type(config).from_hf(reference_config.to_dict()) == config
