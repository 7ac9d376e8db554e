"""Editing metrics on hand-made cases, and the preprocessing against torchvision's transforms."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from fireedit_jax.eval import metrics, preprocess
from fireedit_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from fireedit_jax.models.lpips import LPIPS, LPIPSConfig, example_inputs
from fireedit_jax.models.vit import ViTConfig, ViTModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(width, height, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


# (width, height): landscape, portrait with odd sides (size and crop rounding), upscaled, exact, tiny
SIZES = [(300, 200), (181, 333), (100, 150), (224, 224), (256, 301), (37, 23)]


def _torch_pixels(tensor):
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_clip_and_dino_preprocessing_equal_torchvision(size):
    image = _image(*size)
    clip_transform = transforms.Compose([  # clip.load(...)'s preprocess
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        lambda im: im.convert("RGB"), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    dino_transform = transforms.Compose([  # MagicBrush's evaluation/image_eval.py
        transforms.Resize(256, interpolation=3), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    for ours, theirs in ((preprocess.clip_pixels, clip_transform), (preprocess.dino_pixels, dino_transform)):
        got = ours(image)
        want = _torch_pixels(theirs(image))
        assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.float32
        assert np.max(np.abs(got - want)) <= 1e-6


def test_resize_and_crop_rules_are_torchvision_s():
    for width, height in SIZES:
        image = _image(width, height)
        for size in (224, 256, 97):
            resized = preprocess.resize_shorter_side(image, size)
            assert resized.size == transforms.Resize(size)(image).size
            if min(resized.size) >= 97:
                assert np.array_equal(np.asarray(preprocess.center_crop(resized, 97)),
                                      np.asarray(transforms.CenterCrop(97)(resized)))
    with pytest.raises(ValueError, match="smaller than"):
        preprocess.center_crop(_image(50, 80), 64)


@pytest.mark.parametrize("size", [(512, 512), (300, 200), (100, 150)], ids=str)
def test_ip2p_clip_preprocessing_equals_torch_interpolate(size):
    image = _image(*size)
    tensor = transforms.ToTensor()(image)[None]
    resized = F.interpolate(tensor.float(), size=224, mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    want = _torch_pixels(((resized - mean) / std)[0])
    got = preprocess.ip2p_clip_pixels(image)
    assert got.shape == (224, 224, 3)
    assert np.max(np.abs(got - want)) <= 1e-5


def test_modes_and_arrays_are_converted_like_pil():
    rgba = _image(120, 90, "RGBA")
    np.testing.assert_array_equal(preprocess.clip_pixels(rgba), preprocess.clip_pixels(rgba.convert("RGB")))
    gray = _image(120, 90, "L")
    assert preprocess.dino_pixels(gray).shape == (224, 224, 3)
    array = np.asarray(_image(120, 90))
    np.testing.assert_array_equal(preprocess.clip_pixels(array), preprocess.clip_pixels(Image.fromarray(array)))
    with pytest.raises(ValueError, match="uint8"):
        preprocess.clip_pixels(array.astype(np.float32))


def test_l1_l2_follow_magicbrush():
    """MagicBrush: generated resized to the ground truth's size (PIL bicubic), ToTensor, L1Loss / MSELoss."""
    generated, ground_truth = _image(512, 512, seed=1), _image(300, 200, seed=2)
    gen, gt = preprocess.distance_pair(generated, ground_truth)
    want_gen = transforms.ToTensor()(generated.resize(ground_truth.size))
    want_gt = transforms.ToTensor()(ground_truth)
    assert gen.shape == gt.shape == (200, 300, 3)
    np.testing.assert_array_equal(gen, _torch_pixels(want_gen))
    for ours, theirs in ((metrics.l1_distance, torch.nn.L1Loss()), (metrics.l2_distance, torch.nn.MSELoss())):
        np.testing.assert_allclose(float(ours(gen, gt)), theirs(want_gen, want_gt).item(), rtol=1e-5)


def test_l1_l2_known_values():
    base = np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 16, 24, 3)).astype(np.float32)
    shifted = base + np.array([0.0, 0.1, -0.2], np.float32)[:, None, None, None]  # per-sample shifts
    np.testing.assert_allclose(metrics.l1_distance(shifted, base), [0.0, 0.1, 0.2], atol=1e-6)
    np.testing.assert_allclose(metrics.l2_distance(shifted, base), [0.0, 0.01, 0.04], atol=1e-6)
    half = base.copy()
    half[:, :8] += 0.5  # half the pixels off by 0.5
    np.testing.assert_allclose(metrics.l1_distance(half, base), [0.25] * 3, atol=1e-6)
    np.testing.assert_allclose(metrics.l2_distance(half, base), [0.125] * 3, atol=1e-6)
    # uint8 images 10 levels apart, through the MagicBrush preprocessing
    image = np.full((20, 30, 3), 100, np.uint8)
    gen, gt = preprocess.distance_pair(image + 10, image)
    np.testing.assert_allclose(float(metrics.l1_distance(gen, gt)), 10 / 255, atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        metrics.l1_distance(base, base[:, :8])


def test_cosine_metrics_on_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 16)).astype(np.float32)
    for fn in (metrics.clip_i, metrics.dino_score, metrics.clip_t, metrics.cosine_similarity):
        np.testing.assert_allclose(fn(a, a), np.ones(5), atol=1e-6)
        np.testing.assert_allclose(fn(a, 3.0 * a), np.ones(5), atol=1e-6)
        np.testing.assert_allclose(fn(a, -a), -np.ones(5), atol=1e-6)
        want = F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(fn(a, b), want, atol=1e-6)
    e = np.eye(4, dtype=np.float32)
    assert float(metrics.cosine_similarity(e[0], e[1])) == 0.0
    assert float(metrics.cosine_similarity(np.zeros(4), e[1])) == 0.0  # torch's eps: 0, not NaN


def test_clip_direction_constructed():
    e = np.eye(4, dtype=np.float32)
    # Image moves e0 → e1; the caption moves e0 → e1 too (at other norms: they are normalised first).
    assert math.isclose(float(metrics.clip_direction(e[0], e[1], 3 * e[0], 5 * e[1])), 1.0, abs_tol=1e-6)
    assert math.isclose(float(metrics.clip_direction(e[0], e[1], e[1], e[0])), -1.0, abs_tol=1e-6)
    # Caption moves e2 → e3: orthogonal to the image's direction.
    assert math.isclose(float(metrics.clip_direction(e[0], e[1], e[2], e[3])), 0.0, abs_tol=1e-6)
    # cos 60°: image direction (e1 − e0), caption direction (e2 − e0) share e0's component.
    assert math.isclose(float(metrics.clip_direction(e[0], e[1], e[0], e[2])), 0.5, abs_tol=1e-6)
    # Identical captions: no text direction → 0.
    assert float(metrics.clip_direction(e[0], e[1], e[2], 2 * e[2])) == 0.0
    # InstructPix2Pix's ClipSimilarity on random batches.
    i0, i1, t0, t1 = np.random.default_rng(1).normal(size=(4, 6, 32)).astype(np.float32)
    i0, i1, t0, t1 = (torch.from_numpy(x) for x in (i0, i1, t0, t1))
    unit = [x / x.norm(dim=1, keepdim=True) for x in (i0, i1, t0, t1)]
    want = F.cosine_similarity(unit[1] - unit[0], unit[3] - unit[2]).numpy()
    np.testing.assert_allclose(metrics.clip_direction(*(x.numpy() for x in (i0, i1, t0, t1))), want, atol=1e-6)


def _random_params(model, *inputs, seed):
    """Random params of the model's shapes, drawn on the host (jitting init costs seconds of compilation)."""
    rng = np.random.default_rng(seed)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    return jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def test_identical_images_give_perfect_scores():
    """Through random tiny encoders: identical images → CLIP-I 1, DINO 1, LPIPS 0, L1 0; others do not."""
    image, other = _image(64, 48, seed=3), _image(64, 48, seed=4)
    clip_config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4, image_size=224,
                                   patch_size=32, with_projection=True, projection_dim=16)
    clip_model = CLIPVisionModel(clip_config)
    clip_params = _random_params(clip_model, jnp.zeros((1, 224, 224, 3)), seed=0)
    clip_in = np.stack([preprocess.clip_pixels(x) for x in (image, image, other)])
    embeds = jax.jit(clip_model.apply)(clip_params, clip_in).embeds
    dino_config = ViTConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4, patch_size=32)
    dino_model = ViTModel(dino_config)
    dino_params = _random_params(dino_model, jnp.zeros((1, 224, 224, 3)), seed=1)
    dino_in = np.stack([preprocess.dino_pixels(x) for x in (image, image, other)])
    features = jax.jit(dino_model.apply)(dino_params, dino_in).class_token
    for score in (metrics.clip_i(embeds[:2], embeds[1:]), metrics.dino_score(features[:2], features[1:])):
        assert math.isclose(float(score[0]), 1.0, abs_tol=1e-5) and float(score[1]) < 0.9999

    lpips_params = jax.tree.map(np.abs, _random_params(LPIPS(LPIPSConfig()), *example_inputs(), seed=2))  # heads ≥ 0
    pairs = [preprocess.distance_pair(image, image), preprocess.distance_pair(other, image)]
    gen, ref = (np.stack(x) for x in zip(*pairs))
    distance = metrics.lpips_distance(lpips_params, gen, ref)
    assert abs(float(distance[0])) < 1e-12 and float(distance[1]) > 1e-3  # XLA may round the pair's features apart
    np.testing.assert_allclose(metrics.lpips_distance(lpips_params, ref, gen), distance, rtol=1e-5)  # symmetric
    in_minus1_1 = metrics.lpips_distance(lpips_params, 2 * gen - 1, 2 * ref - 1, normalize=False)
    np.testing.assert_allclose(in_minus1_1, distance, rtol=1e-5)
    assert float(metrics.l1_distance(gen[0], ref[0])) == 0.0


def test_aggregate_per_benchmark_and_task():
    samples = [
        {"benchmark": "emu_edit", "task": "add", "idx": 0, "clip_i": 0.9, "clip_dir": 0.2, "l1": np.float32(0.1)},
        {"benchmark": "emu_edit", "task": "add", "idx": 1, "clip_i": 0.7, "clip_dir": None, "l1": 0.3},
        {"benchmark": "emu_edit", "task": "style", "idx": 2, "clip_i": 0.5, "clip_dir": float("nan"), "l1": 0.2},
        {"benchmark": "magicbrush", "task": "add", "idx": 3, "clip_i": 0.8, "l1": 0.05, "dino": jnp.float32(0.6)},
    ]
    overall = metrics.aggregate(samples)
    assert set(overall) == {"count", "clip_i", "clip_dir", "l1", "dino"}  # idx is an int label, not averaged
    assert overall["count"] == 4
    assert math.isclose(overall["clip_i"], 0.725) and math.isclose(overall["clip_dir"], 0.2)
    assert math.isclose(overall["l1"], 0.1625, rel_tol=1e-6) and math.isclose(overall["dino"], 0.6, rel_tol=1e-6)
    by_benchmark = metrics.aggregate(samples, by="benchmark")
    assert list(by_benchmark) == ["emu_edit", "magicbrush"]
    assert by_benchmark["emu_edit"]["count"] == 3 and math.isclose(by_benchmark["emu_edit"]["clip_i"], 0.7)
    assert math.isnan(by_benchmark["emu_edit"]["dino"]) and math.isnan(by_benchmark["magicbrush"]["clip_dir"])
    by_task = metrics.aggregate([s for s in samples if s["benchmark"] == "emu_edit"], by="task", metrics=["clip_i"])
    assert by_task == {"add": {"count": 2, "clip_i": pytest.approx(0.8)}, "style": {"count": 1, "clip_i": 0.5}}
    with pytest.raises(KeyError, match="'split'"):
        metrics.aggregate(samples, by="split")
