"""configs/shapes.py: the pixel-unshuffle autoencoder, every variant builds, a short run lowers the loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fireedit_jax.demo import demo_config
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.nn.embeddings import coordinates
from fireedit_jax.models.vae import VAE, VAEConfig
from fireedit_jax.train.run import train_and_evaluate

STEPS = 24  # tests/test_demo.py's run compiles the same step (same budget and batch)


def test_pixel_unshuffle_is_exact_and_parameter_free():
    config = VAEConfig(pixel_unshuffle=4, latent_channels=48)
    vae = VAE(config)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    assert vae.init(jax.random.key(1), x) == {} and config.downsample_factor == 4
    mean, logvar = vae.apply({}, x, method=VAE.encode)
    assert mean.shape == (2, 8, 8, 48) and float(logvar.max()) == -30.0
    np.testing.assert_array_equal(mean[1, 2, 3], np.asarray(x[1, 8:12, 12:16]).reshape(-1))  # patch (2, 3), row-major
    np.testing.assert_array_equal(vae.apply({}, mean, method=VAE.decode), x)
    with pytest.raises(ValueError, match="48 latent channels"):
        VAEConfig(pixel_unshuffle=4, latent_channels=4)


@pytest.mark.parametrize("variant", ["none", "region", "region_tati", "full", "clip_text"])
def test_every_variant_builds_with_its_components(variant):
    model = EditModel.from_config(demo_config(STEPS, 8, variant).model)
    params = jax.eval_shape(model.init, jax.random.key(0))
    present = {name for name, sub in params.items() if jax.tree.leaves(sub)}
    want = {"unet", "null_text"} | ({"text_encoder"} if variant == "clip_text" else {"vlm", "qformer"})
    want |= {"tati"} if variant in ("region_tati", "full") else set()
    want |= {"hvca", "clip_vision"} if variant == "full" else set()
    assert present == want
    assert ("regions" in params["vlm"]) == (variant != "none") if "vlm" in params else True
    assert model.latent_factor == 2 and model.unet.config.decoupled == (variant == "full")  # 2x unshuffle


def test_a_short_run_of_the_shapes_config_lowers_the_loss(tmp_path):
    config = demo_config(STEPS, 8)
    config.logging.every = 1
    result = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert result.step == STEPS
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss, diffusion, vlm = (np.array([line[k] for line in lines]) for k in ("loss", "diffusion", "vlm"))
    assert len(loss) == STEPS and np.all(np.isfinite(loss)) and np.all(np.isfinite(vlm))
    # the demo trains on L_diff alone (train.vlm_weight 0; L_VLM is reported): it falls in the short run
    np.testing.assert_allclose(loss, diffusion, rtol=1e-6)
    assert loss[-6:].mean() < 0.98 * loss[:6].mean(), loss


def _with_outputs(params, kernel_scale: float, bias) -> dict:
    """params with the UNet's conv_out replaced: kernel × kernel_scale, the given bias."""
    conv_out = {"kernel": params["unet"]["conv_out"]["kernel"] * kernel_scale, "bias": jnp.asarray(bias, jnp.float32)}
    return {**params, "unet": {**params["unet"], "conv_out": conv_out}}


def test_source_blend_keeps_the_source_where_its_mask_says_and_the_content_elsewhere():
    model = EditModel.from_config(demo_config(STEPS, 8, "clip_text").model)
    assert model.source_blend and model.unet.config.out_channels == 2 * 12
    params = model.draw_params()
    rng = np.random.default_rng(0)
    latents_in = jnp.asarray(rng.normal(size=(2, 16, 16, 24)), jnp.float32)  # noisy ‖ source latent
    cond = {"text": jnp.asarray(rng.normal(size=(2, model.context_length, model.context_dim)), jnp.float32)}
    t = jnp.array([10.0, 900.0])
    content = rng.normal(size=12).astype(np.float32)
    source = np.asarray(latents_in[..., 12:])
    for logit, want in ((30.0, source), (-30.0, np.broadcast_to(content, source.shape)), (0.0, (source + content) / 2)):
        out = model.denoise(_with_outputs(params, 0.0, np.concatenate([content, np.full(12, logit, np.float32)])),
                            latents_in, t, cond)  # fmt: skip
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, err_msg=f"mask logit {logit}")
    trained_like = model.denoise(_with_outputs(params, 1.0, np.zeros(24)), latents_in, t, cond)
    assert np.abs(np.asarray(trained_like) - source).max() > 1e-2  # the UNet's own mask and content count


def test_coordinate_channels_give_the_unet_each_cells_position():
    grid = np.asarray(coordinates(jnp.zeros((2, 4, 8, 5))))
    assert grid.shape == (2, 4, 8, 2)
    np.testing.assert_allclose(grid[0, 1, :, 0], np.linspace(-1, 1, 8), atol=1e-7)  # x: left → right
    np.testing.assert_allclose(grid[1, :, 3, 1], np.linspace(-1, 1, 4), atol=1e-7)  # y: top → bottom
    config = demo_config(STEPS, 8, "clip_text").model
    config.source_blend, config.unet.out_channels = False, 12
    model = EditModel.from_config(config)
    params = model.draw_params()
    rng = np.random.default_rng(1)
    latents_in = jnp.asarray(rng.normal(size=(1, 16, 16, 24)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(1, model.context_length, model.context_dim)), jnp.float32)
    t = jnp.array([500.0])
    out = model.denoise(params, latents_in, t, {"text": text})
    direct = model.unet.apply({"params": params["unet"]}, jnp.concatenate([latents_in, coordinates(latents_in)], -1), t, text)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(direct))
    flipped = model.unet.apply({"params": params["unet"]}, jnp.concatenate([latents_in, -coordinates(latents_in)], -1), t, text)
    assert np.abs(np.asarray(flipped) - np.asarray(out)).max() > 1e-3  # the coordinates reach the output


def test_unet_channels_are_checked_against_coordinates_and_blend():
    config = demo_config(STEPS, 8, "clip_text").model
    config.unet.in_channels = 24  # the coordinates' two channels missing
    with pytest.raises(ValueError, match="24 input / 24 output channels.*need 26 / 24"):
        EditModel.from_config(config)
    config = demo_config(STEPS, 8, "clip_text").model
    config.scheduler.prediction_type = "epsilon"
    with pytest.raises(ValueError, match="source_blend.*prediction_type='sample'"):
        EditModel.from_config(config)
