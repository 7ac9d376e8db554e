"""DINOv2 (with and without registers) against transformers: resampling, conversion, parity, golden tree."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from golden import check_golden

from fireedit_jax.convert import core
from fireedit_jax.convert.dinov2 import (
    abstract_params,
    check_hf_config,
    convert_dinov2,
    load_dinov2,
    verify_dinov2,
)
from fireedit_jax.models.dinov2 import DINOv2Config, DINOv2Model, interpolate_grid, patch_grid

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
# name: (transformers model, its config, input height × width). The grids are chosen so
# both axes resample differently: 2×2 → 4×3 (enlarging), and for the registers model
# 4×4 → 3×5 (one axis shrinks, where antialiasing widens the kernel; remainders dropped).
CASES = {
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config(**TINY, image_size=28), (56, 42)),
    "dinov2-swiglu": (transformers.Dinov2Model, transformers.Dinov2Config(**TINY, image_size=28, use_swiglu_ffn=True),
                      (56, 42)),
    "registers": (transformers.Dinov2WithRegistersModel,
                  transformers.Dinov2WithRegistersConfig(**TINY, image_size=56, num_register_tokens=4), (45, 72)),
}


def _randomise(model):
    """Layer scales, norms, tokens and biases away from their initial values, so a dropped or swapped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """(torch model, its saved directory, our config, converted params, input size) for a CASES name."""
    model_class, hf_config, size = CASES[request.param]
    torch.manual_seed(0)
    model = _randomise(model_class(hf_config))
    directory = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(directory)
    config = DINOv2Config.from_hf(model.config.to_dict())
    return model, directory, config, load_dinov2(directory, config), size


@pytest.mark.parametrize(("grid", "size"), [((2, 2), (4, 3)), ((4, 4), (3, 5)), ((37, 37), (32, 32)), ((4, 4), (4, 4))])
@pytest.mark.parametrize("antialias", [False, True])
def test_position_interpolation_matches_torch(grid, size, antialias):
    positions = np.random.default_rng(0).normal(size=(*grid, 8)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(positions).permute(2, 0, 1)[None], size=size, mode="bicubic", align_corners=False,
        antialias=antialias,
    )[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(interpolate_grid(positions, size, antialias)), want, atol=2e-6)


@pytest.mark.parametrize("reference", list(CASES), indirect=True)
def test_hidden_states_match_transformers(reference, highest_precision):
    model, _, config, params, (height, width) = reference
    assert config.num_register_tokens == getattr(model.config, "num_register_tokens", 0)
    assert config.antialias == (config.num_register_tokens > 0)
    pixels = np.random.default_rng(1).normal(size=(2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    layers = (0, 1, 2, 3, -3, -1)
    out = jax.jit(lambda p, x: DINOv2Model(config).apply(p, x, hidden_layers=layers))(params, pixels)
    h, w = height // 14, width // 14
    assert out.grid == (h, w)
    assert out.last_hidden_state.shape == (2, config.num_prefix_tokens + h * w, 32)
    for got, expected in zip(out.hidden_states, [want.hidden_states[i] for i in layers], strict=True):
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), want.last_hidden_state.numpy(), atol=1e-4)
    # Patches in row-major order, class and register tokens dropped (transformers' backbone reshape).
    patches = want.last_hidden_state[:, config.num_prefix_tokens :].reshape(2, h, w, 32).numpy()
    np.testing.assert_allclose(np.asarray(patch_grid(out.last_hidden_state, out.grid, config)), patches, atol=1e-4)


@pytest.mark.parametrize("reference", ["dinov2-swiglu", "registers"], indirect=True)
def test_module_state_dict_converts_like_the_saved_file(reference):
    """transformers 5 modules name q_proj/o_proj/gate_proj; saved files query/output.dense/fused weights_in."""
    model, _, config, params, _ = reference
    from_module = convert_dinov2({k: v.numpy() for k, v in model.state_dict().items()}, config)
    assert jax.tree.structure(from_module) == jax.tree.structure(params)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_module, params))
    # As held by *ForImageClassification: under the base model's prefix, beside a classifier.
    prefix = "dinov2_with_registers." if config.num_register_tokens else "dinov2."
    state = {prefix + k: v.numpy() for k, v in model.state_dict().items()}
    state["classifier.weight"] = np.zeros((2, 64), np.float32)
    assert jax.tree.all(jax.tree.map(np.array_equal, convert_dinov2(state, config), params))


@pytest.mark.parametrize("reference", ["registers"], indirect=True)
def test_verify_and_remat(reference, highest_precision):
    model, directory, config, params, _ = reference
    assert verify_dinov2(directory, params, config, size=(42, 70)) < 1e-4
    assert verify_dinov2(model, params, config) < 1e-4  # the trained grid: no resampling

    pixels = jnp.asarray(np.random.default_rng(2).normal(size=(1, 42, 56, 3)), jnp.float32)

    def loss(p, remat):  # through the kept output of block 2 only
        out = DINOv2Model(dataclasses.replace(config, remat=remat)).apply(p, pixels, hidden_layers=(-2,))
        return jnp.sum(out.hidden_states[0] ** 2)

    plain, rematerialised = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in (False, True))
    np.testing.assert_allclose(plain[0], rematerialised[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain[1], rematerialised[1])
    per_block = np.abs(plain[1]["params"]["layers"]["fc1"]["kernel"]).max(axis=(1, 2))
    assert per_block[0] > 0 and per_block[1] > 0 and per_block[2] == 0
    assert not np.any(plain[1]["params"]["layernorm"]["scale"])


@pytest.mark.parametrize("reference", ["registers"], indirect=True)
def test_mismatches_name_the_field_or_key(reference):
    model, directory, config, params, _ = reference
    with pytest.raises(core.ConversionError, match="num_register_tokens: checkpoint 4, ours 0"):
        load_dinov2(directory, dataclasses.replace(config, num_register_tokens=0))
    with pytest.raises(core.ConversionError, match="hidden_size: checkpoint 32, ours 64"):
        check_hf_config(model.config.to_dict(), dataclasses.replace(config, hidden_size=64))
    with pytest.raises(core.ConversionError, match="antialias"):
        check_hf_config(model.config.to_dict(), dataclasses.replace(config, interpolate_antialias=False))
    state = core.load_state_dict(directory)
    del state["embeddings.register_tokens"]
    with pytest.raises(core.ConversionError, match="no source key: params/register_tokens"):
        convert_dinov2(state, config)
    with pytest.raises(IndexError, match="out of range"):
        DINOv2Model(config).apply(params, np.zeros((1, 56, 56, 3), np.float32), hidden_layers=(4,))


def _analytic_count(config: DINOv2Config) -> int:
    d, f, g = config.hidden_size, config.mlp_dim, config.grid_size
    ffn = (2 * (d * f + f) if config.use_swiglu_ffn else d * f + f) + f * d + d
    block = 2 * 2 * d + 4 * (d * d + d) + 2 * d + ffn  # 2 norms, q/k/v/o, 2 layer scales, FFN
    embeddings = config.patch_size**2 * config.num_channels * d + d + d + (g * g + 1) * d + config.num_register_tokens * d
    return embeddings + config.num_layers * block + 2 * d


def test_golden_vit_l14_and_counts():
    config = DINOv2Config.vit_l14()
    described = check_golden("dinov2_l14", abstract_params(config))
    assert described["total_params"] == _analytic_count(config) == 304_367_616
    assert described["params"]["params/layers/q_proj/kernel"] == {"shape": [24, 1024, 1024], "axes": ["layers", "embed", "heads"]}
    with torch.device("meta"):
        hf = transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14))
    hf_count = sum(p.numel() for name, p in hf.named_parameters() if not name.endswith("mask_token"))
    assert hf_count == described["total_params"]
    # The other presets by formula (giant: SwiGLU with F = 4096; with registers: 4 more tokens).
    for preset in (DINOv2Config.vit_s14(), DINOv2Config.vit_g14(), DINOv2Config.vit_l14(num_register_tokens=4)):
        tree = flax.linen.meta.unbox(abstract_params(preset))
        assert sum(x.size for x in jax.tree.leaves(tree)) == _analytic_count(preset)
    assert DINOv2Config.vit_g14().mlp_dim == 4096
