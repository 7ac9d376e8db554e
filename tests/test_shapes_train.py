"""configs/shapes.py: the pixel-unshuffle autoencoder, every variant builds, a short run lowers the loss."""

import json

import jax
import numpy as np
import pytest

from fireedit_jax.demo import demo_config
from fireedit_jax.models.fireedit import EditModel
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
