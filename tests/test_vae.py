"""The SD VAE against diffusers' AutoencoderKL: conversion, encode/decode parity, golden tree."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from golden import check_golden

from fireedit_jax.convert import core
from fireedit_jax.convert.vae import abstract_params, convert_vae, load_vae, verify_vae
from fireedit_jax.models.vae import VAE, VAEConfig, sample_posterior, scale_latents, unscale_latents

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)


def _diffusers_kwargs(config: VAEConfig) -> dict:
    levels = len(config.block_out_channels)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random AutoencoderKL saved with save_pretrained, and its config and directory."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped scale/bias would show
        for name, p in vae.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    return vae.eval(), config, directory


def test_config_from_diffusers(tiny):
    _, config, _ = tiny
    assert config == VAEConfig(**TINY)
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        VAEConfig.from_diffusers({"act_fn": "gelu"})


def test_encode_decode_match_diffusers(tiny, highest_precision):
    vae, config, directory = tiny
    params = load_vae(directory, config)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 32, 24, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        want_mean = posterior.mean.permute(0, 2, 3, 1).numpy()
        want_logvar = posterior.logvar.permute(0, 2, 3, 1).numpy()
        want_image = vae.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
    model = VAE(config)
    mean, logvar = jax.jit(lambda p, x: model.apply(p, x, method=VAE.encode))(params, images)
    image = jax.jit(lambda p, z: model.apply(p, z, method=VAE.decode))(params, mean)
    assert mean.shape == (2, 16, 12, 4)
    np.testing.assert_allclose(np.asarray(mean), want_mean, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), want_logvar, atol=1e-4)
    np.testing.assert_allclose(np.asarray(image), want_image, atol=1e-4)
    assert np.max(np.abs(want_image)) > 0.1  # the comparison is not between near-zeros


def test_verify_and_latent_helpers(tiny, highest_precision):
    vae, config, directory = tiny
    params = load_vae(directory, config)
    assert verify_vae(directory, params, config) < 1e-4
    mean = np.full((1, 2, 2, 4), 0.5, np.float32)
    z = sample_posterior(jax.random.key(0), mean, np.full_like(mean, -60.0))  # std e^-30: the mean
    np.testing.assert_allclose(np.asarray(z), mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scale_latents(mean, config)), mean * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(unscale_latents(scale_latents(mean, config), config)), mean, rtol=1e-6)


def test_legacy_attention_names_and_conv_weights(tiny):
    vae, config, _ = tiny
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    want, got = convert_vae(state, config), convert_vae(legacy, config)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_conversion_errors_name_the_problem(tiny):
    vae, config, _ = tiny
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    del state["quant_conv.weight"]
    state["decoder.mystery.weight"] = np.zeros(3, np.float32)
    with pytest.raises(core.ConversionError, match=r"(?s)decoder\.mystery\.weight.*quant_conv/kernel"):
        convert_vae(state, config)
    with pytest.raises(core.ConversionError, match="latent_channels: checkpoint 4, ours 8"):
        verify_vae(vae, None, dataclasses.replace(config, latent_channels=8))


def test_golden_sd15():
    config = VAEConfig.sd15()
    described = check_golden("vae_sd15", abstract_params(config))
    with torch.device("meta"):
        reference = AutoencoderKL(**_diffusers_kwargs(config))
    assert described["total_params"] == sum(p.numel() for p in reference.parameters()) == 83_653_863
