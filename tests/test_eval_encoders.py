"""Metric encoders against their references: DINO ViT vs transformers' ViTModel, LPIPS vs the lpips package."""

import dataclasses
import os
import re

import jax
import lpips
import numpy as np
import pytest
import torch
import torchvision
import transformers
from golden import check_golden

from fireedit_jax.convert import core
from fireedit_jax.convert.lpips import abstract_params as lpips_abstract_params
from fireedit_jax.convert.lpips import convert_lpips, load_lpips, verify_lpips
from fireedit_jax.convert.vit import abstract_params as vit_abstract_params
from fireedit_jax.convert.vit import check_hf_config, convert_vit, load_vit, verify_vit
from fireedit_jax.models.lpips import LPIPSConfig
from fireedit_jax.models.vit import ViTConfig, ViTModel

VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
           patch_size=8, layer_norm_eps=1e-6)
LPIPS_SIZE = (64, 50)  # 50 px wide: SqueezeNet's ceil-mode pools keep a partial last window


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny random transformers ViTModel (with a pooler, which we ignore), saved, and its directory."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    with torch.no_grad():  # random norms and class token, so swapped or dropped ones would show
        for name, p in model.named_parameters():
            if p.ndim == 1 or "cls_token" in name:
                p.add_(0.1 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp("vit"))
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("size", [32, (40, 56), 36], ids=["native", "interpolated-5x7", "remainder-dropped"])
def test_vit_matches_transformers(tiny_vit, size, highest_precision):
    model, directory = tiny_vit
    config = ViTConfig.from_hf(model.config.to_dict())
    assert (config.num_layers, config.patch_size, config.layer_norm_eps) == (3, 8, 1e-6)
    params = load_vit(directory, config)  # saved files have v4 names (encoder.layer.i.attention.attention.query)
    assert verify_vit(model, params, config, size=size) < 1e-4


def test_vit_class_token_is_the_dino_feature(tiny_vit, highest_precision):
    model, directory = tiny_vit
    config = ViTConfig.from_hf(model.config.to_dict())
    params = load_vit(directory, config)
    pixels = np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True)
    out = jax.jit(ViTModel(config).apply)(params, pixels)
    np.testing.assert_allclose(np.asarray(out.class_token), want.last_hidden_state[:, 0].numpy(), atol=1e-4)
    assert out.last_hidden_state.shape == (2, 1 + 6 * 6, 32)


def test_vit_layouts_convert_identically(tiny_vit):
    """In-memory transformers 5 names, saved v4 names, a `vit.`-prefixed classifier and DINO's fused qkv."""
    model, directory = tiny_vit
    config = ViTConfig.from_hf(model.config.to_dict())
    want = convert_vit(core.load_state_dict(directory), config)
    memory = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("layers.0.attention.q_proj") for k in memory)
    classifier = {f"vit.{k}": v for k, v in memory.items()}
    classifier.update({"classifier.weight": np.zeros((5, 32), np.float32), "classifier.bias": np.zeros(5, np.float32)})
    dino = {"cls_token": memory["embeddings.cls_token"], "pos_embed": memory["embeddings.position_embeddings"],
            "patch_embed.proj.weight": memory["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": memory["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": memory["layernorm.weight"], "norm.bias": memory["layernorm.bias"]}
    for i in range(3):
        ours = {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for leaf in ("weight", "bias"):
            for name, theirs in ours.items():
                dino[f"blocks.{i}.{name}.{leaf}"] = memory[f"layers.{i}.{theirs}.{leaf}"]
            dino[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [memory[f"layers.{i}.attention.{p}_proj.{leaf}"] for p in "qkv"])
    for state in (memory, classifier, dino):
        got = convert_vit(state, config)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_vit_conversion_errors_name_the_problem(tiny_vit):
    model, directory = tiny_vit
    config = ViTConfig.from_hf(model.config.to_dict())
    state = core.load_state_dict(directory)
    bad = {k: v for k, v in state.items() if k != "layernorm.bias"}
    bad["encoder.layer.3.intermediate.dense.bias"] = np.zeros(37, np.float32)
    bad["encoder.layer.0.attention.attention.rotary.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(core.ConversionError, match=r"(?s)layers \[\] missing, layers \[3\].*"
                                                   r"attention\.attention\.rotary\.weight.*params/layernorm/bias"):
        convert_vit(bad, config)
    with pytest.raises(core.ConversionError, match="patch_size: checkpoint 8, ours 16"):
        check_hf_config(model.config.to_dict(), dataclasses.replace(config, patch_size=16))
    with pytest.raises(ValueError, match="qkv_bias=False"):
        ViTConfig.from_hf({**VIT, "qkv_bias": False})


@pytest.mark.parametrize(
    "preset,hidden,heads,patch",
    [(ViTConfig.dino_vits16, 384, 6, 16), (ViTConfig.dino_vitb16, 768, 12, 16), (ViTConfig.dino_vitb8, 768, 12, 8)],
)
def test_vit_presets_count_as_transformers(preset, hidden, heads, patch):
    config = preset()
    reference_config = transformers.ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                              num_attention_heads=heads, patch_size=patch, layer_norm_eps=1e-6)
    with torch.device("meta"):
        reference = transformers.ViTModel(reference_config, add_pooling_layer=False)
    abstract = vit_abstract_params(config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert count == sum(p.numel() for p in reference.parameters())
    assert ViTConfig.from_hf(reference_config.to_dict()) == config
    if config == ViTConfig():  # DINO ViT-S/16, the metric's
        assert check_golden("vit_dino_s16", abstract)["total_params"] == 21_665_664


# ---------------------------------------------------------------------------------------------- LPIPS


def _lpips_reference(net: str, pretrained_heads: bool):
    """lpips.LPIPS with a random trunk (no download) and random non-negative heads, or the package's own heads."""
    torch.manual_seed(3)
    model = lpips.LPIPS(net=net, pretrained=pretrained_heads, pnet_rand=True, verbose=False).eval()
    if not pretrained_heads:
        with torch.no_grad():
            for lin in model.lins:
                lin.model[-1].weight.uniform_(0, 1)
    return model


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_matches_the_package(net, highest_precision):
    reference = _lpips_reference(net, pretrained_heads=False)
    config = LPIPSConfig(net)
    params = convert_lpips({k: v.numpy() for k, v in reference.state_dict().items()}, {}, config)
    assert verify_lpips(reference, params, config, size=LPIPS_SIZE) < 1e-4
    # The distances compared (verify_lpips' inputs) are not vanishingly small.
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 2, *LPIPS_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        distance = reference(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in images))
    assert distance.shape == (2, 1, 1, 1) and float(distance.min()) > 0.05


def test_lpips_from_torchvision_trunk_and_package_heads(tmp_path, highest_precision):
    """The usual real-weights path: torchvision's AlexNet file + the package's v0.1 alex.pth."""
    reference = _lpips_reference("alex", pretrained_heads=True)
    torch.manual_seed(4)
    alexnet = torchvision.models.alexnet()
    with torch.no_grad():  # give the reference trunk torchvision's weights, by features index
        for name, p in reference.net.named_parameters():
            p.copy_(alexnet.features.state_dict()[name.split(".", 1)[1]])
    trunk_file = os.path.join(tmp_path, "alexnet.pth")
    torch.save(alexnet.state_dict(), trunk_file)  # features.* and classifier.*
    heads_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    config = LPIPSConfig("alex")
    params = load_lpips(trunk_file, heads_file, config)
    assert verify_lpips(reference, params, config, size=LPIPS_SIZE) < 1e-4


def test_lpips_conversion_errors_and_counts():
    alex = LPIPSConfig("alex")
    reference = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    trunk = {k: v for k, v in state.items() if k.startswith("net.")}
    heads = {k: v for k, v in state.items() if k.startswith("lin") and k != "lin4.model.1.weight"}
    with pytest.raises(core.ConversionError, match="parameters with no source key: params/lin4/kernel"):
        convert_lpips(trunk, heads, alex)
    with pytest.raises(core.ConversionError, match="shape mismatches: params/features_0/kernel"):
        convert_lpips(state, {}, LPIPSConfig("vgg"))
    with pytest.raises(core.ConversionError, match="in both"):
        convert_lpips(state, heads, alex)
    with pytest.raises(ValueError, match="'resnet' not supported"):
        LPIPSConfig("resnet")
    want = sum(v.size for k, v in state.items() if re.match(r"net\.|lin\d", k))  # not the `lins.` duplicates
    assert check_golden("lpips_alex", lpips_abstract_params(alex))["total_params"] == want
    assert LPIPSConfig("squeeze").channels == (64, 128, 256, 384, 384, 512, 512)
    assert LPIPSConfig("vgg").channels == (64, 128, 256, 512, 512)
