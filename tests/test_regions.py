"""RoIAlign against torchvision, Groma's region encoder against its computation in torch, conversion."""

import dataclasses
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from golden import check_golden

from fireedit_jax.convert import core
from fireedit_jax.convert.groma import config_from_state, convert_groma, verify_groma
from fireedit_jax.nn.resize import bilinear_resize
from fireedit_jax.models.regions import (
    RegionEncoder,
    RegionEncoderConfig,
    example_inputs,
    roi_align,
)

TINY = RegionEncoderConfig.tiny()

# ---------------------------------------------------------------------------- RoIAlign

H, W, C, SCALE = 9, 11, 5, 0.5  # a 22 × 18 px image on a stride-2 map


def _boxes(rng, batch, count):
    """Pixel xyxy: random (partly outside), border-touching, border-crossing, whole-image, sub-pixel."""
    img_w, img_h = W / SCALE, H / SCALE
    x1, y1 = rng.uniform(-4, img_w + 2, (batch, count)), rng.uniform(-4, img_h + 2, (batch, count))
    size = rng.uniform(0.05, 12, (batch, count, 2))
    boxes = np.stack([x1, y1, x1 + size[..., 0], y1 + size[..., 1]], -1)
    boxes[0, :6] = [
        [0, 0, img_w, img_h],  # the whole image: touches all borders
        [-3, -3, img_w + 3, img_h + 3],  # crosses all borders
        [img_w - 4, 2, img_w, 9],  # touches the right border
        [-2.5, 5, 3, img_h + 1.5],  # crosses the left and bottom borders
        [5.2, 7.1, 5.3, 7.15],  # sub-pixel
        [13.0, 4.0, 13.4, 4.2],  # sub-pixel, also below one feature cell
    ]
    return boxes.astype(np.float32)


def _torchvision(features, boxes, output_size, sampling_ratio, aligned):
    out = torchvision.ops.roi_align(
        torch.from_numpy(features).permute(0, 3, 1, 2), [torch.from_numpy(b) for b in boxes], output_size, SCALE,
        sampling_ratio, aligned,
    ).numpy()  # fmt: skip
    return out.transpose(0, 2, 3, 1).reshape(boxes.shape[0], boxes.shape[1], *out.shape[2:], features.shape[-1])


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_torchvision(aligned):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, H, W, C)).astype(np.float32)
    boxes = _boxes(rng, 2, 24)
    for sampling_ratio in (1, 2, 0):
        for output_size in (1, (3, 4), 7):
            want = _torchvision(features, boxes, output_size, sampling_ratio, aligned)
            # Adaptive: the border-crossing boxes are larger than the map, so more samples than the default bound.
            got = roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size, spatial_scale=SCALE,
                            sampling_ratio=sampling_ratio, aligned=aligned, max_adaptive_grid=16)  # fmt: skip
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0,
                                       err_msg=f"sampling_ratio={sampling_ratio} output_size={output_size}")  # fmt: skip


def test_roi_align_adaptive_exact_on_integer_grids_and_reversed_boxes():
    """Samples landing exactly on the border, whole-number grids (ceil), reversed boxes (Groma's cxcywh)."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1, H, W, C)).astype(np.float32)
    boxes = np.array([[[-1, -1, 21, 17], [0, 0, 22, 18], [0, 0, 14, 14]]], np.float32)
    reversed_ = np.array([[[6, 8, 2, 3], [10, 2, 3, 12]]], np.float32)  # torchvision takes these at fixed ratios only
    for aligned in (True, False):
        for sampling_ratio, output_size in ((0, 1), (-1, 7), (2, 2), (2, 14)):
            if sampling_ratio > 0:
                boxes = np.concatenate([boxes[:, :3], reversed_], 1)
            want = _torchvision(features, boxes, output_size, sampling_ratio, aligned)
            got = roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size, spatial_scale=SCALE,
                            sampling_ratio=sampling_ratio, aligned=aligned)  # fmt: skip
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    # A box 14 cells wide needs 14 samples per bin at output 1: more than the default bound (11) …
    big = np.array([[[-3, -3, 25, 21]]], np.float32)
    want = _torchvision(features, big, 1, 0, False)
    capped = roi_align(jnp.asarray(features), jnp.asarray(big), 1, spatial_scale=SCALE, sampling_ratio=0, aligned=False)
    assert np.abs(np.asarray(capped) - want).max() > 1e-3
    exact = roi_align(jnp.asarray(features), jnp.asarray(big), 1, spatial_scale=SCALE, sampling_ratio=0, aligned=False,
                      max_adaptive_grid=14)  # fmt: skip
    np.testing.assert_allclose(np.asarray(exact), want, atol=1e-5, rtol=0)


def test_roi_align_padding_mask_and_no_boxes():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.normal(size=(2, H, W, C)).astype(np.float32))
    boxes = _boxes(rng, 2, 7)
    mask = np.array([[True, True, False, True, False, True, False], [False] * 7])
    padded = boxes.copy()
    padded[~mask] = np.nan  # whatever sits in padding slots must not leak
    got = np.asarray(roi_align(features, jnp.asarray(padded), 3, spatial_scale=SCALE, sampling_ratio=2, mask=mask))
    alone = np.asarray(roi_align(features[:1], jnp.asarray(boxes[:1, mask[0]]), 3, spatial_scale=SCALE, sampling_ratio=2))
    assert np.all(got[~mask] == 0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0, mask[0]], alone[0], atol=1e-6)
    assert np.abs(alone).max() > 0.1

    empty = roi_align(features, jnp.zeros((2, 0, 4)), (3, 4), spatial_scale=SCALE, mask=np.zeros((2, 0), bool))
    assert empty.shape == (2, 0, 3, 4, C)


def test_roi_align_jits_and_differentiates_features():
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(1, H, W, C)).astype(np.float32))
    boxes = jnp.asarray(_boxes(rng, 1, 8))
    fn = jax.jit(lambda f: roi_align(f, boxes, 2, spatial_scale=SCALE, sampling_ratio=2).sum())
    grad = np.asarray(jax.grad(fn)(features))
    want = torch.autograd.functional.jacobian(
        lambda f: torchvision.ops.roi_align(f.permute(0, 3, 1, 2), [torch.from_numpy(np.array(boxes[0]))], 2, SCALE,
                                            2, True).sum(),
        torch.from_numpy(np.array(features)),
    ).numpy()  # fmt: skip
    np.testing.assert_allclose(grad, want, atol=1e-5)


def test_bilinear_resize_matches_torch_align_corners():
    x = np.random.default_rng(4).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for size in ((20, 28), (10, 14), (3, 4), (1, 1)):
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True)
        got = bilinear_resize(jnp.asarray(x), size)
        np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


# ---------------------------------------------------------------------------- region encoder


def groma_state(config: RegionEncoderConfig, prefix: str = "region_encoder.", seed: int = 0) -> dict:
    """Random weights under Groma's names and shapes, plus keys of other Groma towers."""
    rng = np.random.default_rng(seed)
    d, e, s, f, p, l = (config.feature_dim, config.embed_dim, config.roi_size, config.region_dim,
                        config.pos_hidden_dim, config.llm_dim)  # fmt: skip
    shapes = {}
    for level in range(config.num_levels):
        shapes[f"mlvl_fuse.input_conv.{level}.weight"] = (e, d + 2, 1, 1)
        shapes[f"mlvl_fuse.input_conv.{level}.bias"] = (e,)
        shapes[f"roi_align.pconvs.{level}.weight"] = (e, e, 3, 3)
        shapes[f"roi_align.pconvs.{level}.bias"] = (e,)
    for i in range(config.num_fuse):
        shapes[f"mlvl_fuse.fuse_convs.{i}.conv.weight"] = (e, e, 3, 3)
        shapes[f"mlvl_fuse.fuse_convs.{i}.gn.weight"] = (e,)
        shapes[f"mlvl_fuse.fuse_convs.{i}.gn.bias"] = (e,)
    shapes.update({
        "roi_align.flatten_linear.weight": (f, e * s * s), "roi_align.flatten_linear.bias": (f,),
        "roi_align.pos_embedd.0.weight": (p, 4), "roi_align.pos_embedd.0.bias": (p,),
        "roi_align.pos_embedd.2.weight": (p,), "roi_align.pos_embedd.2.bias": (p,),
        "roi_align.pos_embedd.3.weight": (f, p), "roi_align.pos_embedd.3.bias": (f,),
        "roi_align.pos_embedd.5.weight": (f,), "roi_align.pos_embedd.5.bias": (f,),
        "roi_align.updims.weight": (l, f), "roi_align.updims.bias": (l,),
    })  # fmt: skip
    state = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 if len(shape) == 1 and "weight" in name else fan_in**-0.5 if len(shape) > 1 else 0.1
        offset = 1.0 if len(shape) == 1 and "weight" in name else 0.0  # norm scales near 1
        state[prefix + name] = (offset + scale * rng.normal(size=shape)).astype(np.float32)
    state["llm.model.embed_tokens.weight"] = np.zeros((8, 4), np.float32)
    state["perceiver.input_proj.0.0.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    return state


@pytest.fixture(scope="module")
def tiny_state():
    return groma_state(TINY)


@pytest.fixture(scope="module")
def tiny_params(tiny_state):
    return convert_groma(tiny_state, TINY)


def test_conversion_is_exact(tiny_state, tiny_params):
    p = flax.traverse_util.flatten_dict(tiny_params["params"], sep="/")
    g = {k[len("region_encoder."):]: v for k, v in tiny_state.items() if k.startswith("region_encoder.")}
    pairs = {
        "mlvl_fuse/input_conv_1/kernel": g["mlvl_fuse.input_conv.1.weight"].transpose(2, 3, 1, 0),
        "mlvl_fuse/input_conv_1/bias": g["mlvl_fuse.input_conv.1.bias"],
        "mlvl_fuse/fuse_1/conv/kernel": g["mlvl_fuse.fuse_convs.1.conv.weight"].transpose(2, 3, 1, 0),
        "mlvl_fuse/fuse_1/norm/scale": g["mlvl_fuse.fuse_convs.1.gn.weight"],
        "mlvl_fuse/fuse_0/norm/bias": g["mlvl_fuse.fuse_convs.0.gn.bias"],
        "level_conv_2/kernel": g["roi_align.pconvs.2.weight"].transpose(2, 3, 1, 0),
        "level_conv_2/bias": g["roi_align.pconvs.2.bias"],
        "pos_fc_1/kernel": g["roi_align.pos_embedd.0.weight"].T,
        "pos_norm_1/scale": g["roi_align.pos_embedd.2.weight"],
        "pos_fc_2/bias": g["roi_align.pos_embedd.3.bias"],
        "pos_norm_2/bias": g["roi_align.pos_embedd.5.bias"],
        "out_proj/kernel": g["roi_align.updims.weight"].T,
        "flatten_linear/bias": g["roi_align.flatten_linear.bias"],
    }
    for path, want in pairs.items():
        np.testing.assert_array_equal(p[path], want, err_msg=path)
    # Flattening: torch reads its RoI features as (E, S, S), we as (S, S, E).
    s, e = TINY.roi_size, TINY.embed_dim
    torch_w = g["roi_align.flatten_linear.weight"].reshape(-1, e, s, s)
    np.testing.assert_array_equal(p["flatten_linear/kernel"].reshape(s, s, e, -1), torch_w.transpose(2, 3, 1, 0))
    # Every leaf is produced and nothing else.
    assert set(p) == {"/".join(k) for k in core.flat_shapes(jax.eval_shape(
        RegionEncoder(TINY).init, jax.random.key(0), *example_inputs(TINY))["params"])}  # fmt: skip
    assert sum(v.size for v in p.values()) == sum(
        v.size for k, v in tiny_state.items() if k.startswith("region_encoder.")
    )


def test_conversion_prefixes_and_config_from_shapes():
    bare = groma_state(TINY, prefix="")
    del bare["llm.model.embed_tokens.weight"], bare["perceiver.input_proj.0.0.weight"]
    nested = groma_state(TINY, prefix="model.region_encoder.")
    for state in (bare, nested):
        converted = convert_groma(state, TINY)
        want = groma_state(TINY)["region_encoder.roi_align.updims.bias"]
        np.testing.assert_array_equal(converted["params"]["out_proj"]["bias"], want)
    # Norm groups and patch size are not in the weights: Groma's unless given.
    assert config_from_state(nested, norm_groups=4, patch_size=4) == dataclasses.replace(TINY, groma_compat=True)


def test_conversion_names_missing_and_extra_keys(tiny_state):
    state = dict(tiny_state)
    del state["region_encoder.roi_align.pconvs.1.bias"]
    del state["region_encoder.mlvl_fuse.fuse_convs.0.gn.weight"]
    state["region_encoder.roi_align.pconvs.3.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    state["region_encoder.roi_align.extra_head.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(core.ConversionError) as err:
        convert_groma(state, TINY)
    message = str(err.value)
    for name in ("level_conv_1/bias", "mlvl_fuse/fuse_0/norm/scale", "region_encoder.roi_align.pconvs.3.weight",
                 "region_encoder.roi_align.extra_head.weight"):  # fmt: skip
        assert name in message, message
    state = dict(tiny_state)
    state["region_encoder.roi_align.updims.weight"] = np.zeros((7, TINY.region_dim), np.float32)
    with pytest.raises(core.ConversionError, match="out_proj/kernel"):
        convert_groma(state, TINY)
    with pytest.raises(core.ConversionError, match="not a Groma region-encoder checkpoint"):
        convert_groma({"llm.lm_head.weight": np.zeros((2, 2))}, TINY)


@pytest.mark.parametrize("compat", [True, False])
def test_region_encoder_matches_groma_computation(tiny_state, compat, highest_precision):
    config = RegionEncoderConfig.tiny(groma_compat=compat)
    params = convert_groma(tiny_state, config)
    error = verify_groma(tiny_state, params, config, grid=4)
    assert error < 1e-4, error


def test_region_encoder_masks_and_box_independence(tiny_params, highest_precision):
    rng = np.random.default_rng(5)
    levels = tuple(jnp.asarray(rng.normal(size=(2, 3, 3, TINY.feature_dim)), jnp.float32) for _ in range(3))
    lo = rng.uniform(0, 0.5, (2, 4, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (2, 4, 2))], -1).astype(np.float32)
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    model = RegionEncoder(TINY)
    apply = jax.jit(model.apply)
    tokens = np.asarray(apply(tiny_params, levels, boxes, mask))
    assert tokens.shape == (2, 4, TINY.llm_dim)
    assert np.all(tokens[~mask] == 0) and np.all(np.abs(tokens[mask]).max(-1) > 1e-3)
    # Moving the other boxes (real or padding) leaves box 0's token unchanged.
    moved = boxes.copy()
    moved[:, 1:] = rng.uniform(0, 1, (2, 3, 4)).astype(np.float32)
    again = np.asarray(apply(tiny_params, levels, moved, mask))
    np.testing.assert_allclose(again[:, 0], tokens[:, 0], atol=1e-6)
    assert np.abs(again[0, 1] - tokens[0, 1]).max() > 1e-3
    # A box's token is the same alone as in a batch.
    alone = np.asarray(model.apply(tiny_params, tuple(x[:1] for x in levels), boxes[:1, 2:3]))
    np.testing.assert_allclose(alone[0, 0], tokens[0, 2], atol=1e-5)
    # No boxes at all.
    none = model.apply(tiny_params, levels, jnp.zeros((2, 0, 4)), jnp.zeros((2, 0), bool))
    assert none.shape == (2, 0, TINY.llm_dim)


def test_groma_golden():
    config = RegionEncoderConfig.groma()
    tree = jax.eval_shape(RegionEncoder(config).init, jax.random.key(0), *example_inputs(config))
    got = check_golden("regions_groma", tree["params"])
    # Groma's module: flatten_linear alone is 1024·196 × 1024.
    assert got["params"]["flatten_linear/kernel"]["shape"] == [1024 * 196, 1024]
    assert got["params"]["mlvl_fuse/input_conv_0/kernel"]["shape"] == [1, 1, 1026, 1024]
