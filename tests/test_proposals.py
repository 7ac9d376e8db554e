"""User boxes and the offline Deformable DETR proposer (a tiny random one, saved offline)."""

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fireedit_jax.data import proposals
from fireedit_jax.data.proposals import BoxError, DetectorError, validate_boxes
from fireedit_jax.images import ImageError, load_image


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DeformableDetrImageProcessor,
        ResNetConfig,
    )

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"])
    config = DeformableDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, num_feature_levels=2, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_n_points=2, decoder_n_points=2, num_queries=300, num_labels=3,
    )  # fmt: skip
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # at init every query predicts about the same box: spread them out
        for layer in (model.model.reference_points, *model.bbox_embed[0].layers, model.class_embed[0]):
            layer.weight.normal_(0, 2 * layer.weight.shape[1] ** -0.5)
    directory = str(tmp_path_factory.mktemp("detector"))
    model.save_pretrained(directory)
    DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("images")
    paths = [str(directory / "a.png"), str(directory / "b.png")]
    Image.fromarray((rng.random((48, 72, 3)) * 255).astype(np.uint8)).save(paths[0])
    Image.fromarray((rng.random((60, 40, 4)) * 255).astype(np.uint8), "RGBA").save(paths[1])
    return paths


def _reference(detector_dir, path, threshold=0.15, iou=0.6, top=100):
    """The same selection, written out step by step on the raw model outputs."""
    from transformers import AutoImageProcessor, DeformableDetrForObjectDetection

    model = DeformableDetrForObjectDetection.from_pretrained(detector_dir).eval()
    processor = AutoImageProcessor.from_pretrained(detector_dir)
    with torch.no_grad():
        out = model(**processor(images=load_image(path), return_tensors="pt"))
    scores = out.logits[0].sigmoid().amax(-1)
    boxes = torchvision.ops.box_convert(out.pred_boxes[0], "cxcywh", "xyxy").clamp(0, 1)
    order = torch.argsort(scores, descending=True)
    kept = []
    for i in order.tolist():
        if scores[i] < threshold or len(kept) == top:
            continue
        if all(torchvision.ops.box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= iou for j in kept):
            kept.append(i)
    return boxes[kept].numpy(), scores[kept].numpy()


def test_propose_cli_writes_valid_jsonl(detector_dir, image_paths, tmp_path, capsys):
    out = str(tmp_path / "sub" / "boxes.jsonl")
    assert proposals.main(["--detector", detector_dir, "--images", *image_paths, "--out", out]) == 0
    assert "boxes for 2 images" in capsys.readouterr().out
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert [r["image"] for r in records] == image_paths
    for record in records:
        boxes, scores = np.asarray(record["boxes"]), np.asarray(record["scores"])
        assert 0 < len(boxes) <= 100 and boxes.shape == (len(scores), 4)
        assert np.all((boxes >= 0) & (boxes <= 1))
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        assert np.all(scores >= 0.15) and np.all(np.diff(scores) <= 0)
        iou = torchvision.ops.box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
        assert np.all(iou[~np.eye(len(boxes), dtype=bool)] <= 0.6 + 1e-5)
        # The same boxes as the selection done by hand on the model's outputs.
        want_boxes, want_scores = _reference(detector_dir, record["image"])
        np.testing.assert_allclose(boxes, want_boxes, atol=2e-6)
        np.testing.assert_allclose(scores, want_scores, atol=2e-6)
    read = proposals.read_jsonl(out)
    np.testing.assert_array_equal(read[image_paths[0]], proposals.propose(detector_dir, image_paths[:1])[0])


def test_propose_caps_and_thresholds(detector_dir, image_paths):
    # About 290 of the 300 queries survive score ≥ 0.15 and NMS: the 100 best are kept.
    many = proposals.detect(detector_dir, image_paths[:1], max_boxes=1000)
    assert len(many[0][0]) > 200 and len(many[0][0]) < 300 and np.all(many[0][1] >= 0.15)
    capped = proposals.propose(detector_dir, image_paths[:1])
    np.testing.assert_array_equal(capped[0], many[0][0][:100])
    few = proposals.detect(detector_dir, image_paths[:1], max_boxes=3, score_threshold=0.3)
    assert len(few[0][0]) == 3 and np.all(few[0][1] >= 0.3)
    none = proposals.propose(detector_dir, [Image.open(image_paths[1])], score_threshold=0.999)
    assert none[0].shape == (0, 4)


def test_propose_errors_name_the_input(detector_dir, tmp_path, capsys):
    with pytest.raises(DetectorError, match="nowhere"):
        proposals.propose(str(tmp_path / "nowhere"), [])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DetectorError, match="config.json"):
        proposals.propose(str(tmp_path / "empty"), [])
    with pytest.raises(ImageError, match="missing.png"):
        proposals.propose(detector_dir, [str(tmp_path / "missing.png")])
    code = proposals.main(["--detector", detector_dir, "--images", str(tmp_path / "missing.png"),
                           "--out", str(tmp_path / "o.jsonl")])  # fmt: skip
    assert code == 1 and "missing.png" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_more_than_100_user_boxes_keeps_the_first_100():
    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 0.5, (130, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.01, 0.5, (130, 2))], 1)
    with pytest.warns(UserWarning, match="130 boxes given; keeping the first 100"):
        kept = validate_boxes(boxes, (640, 480))
    np.testing.assert_allclose(kept, boxes[:100], atol=1e-7)
    assert kept.dtype == np.float32
    assert validate_boxes([], (640, 480)).shape == (0, 4)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ([0.1, 0.2, 1.3, 0.5], r"box 1 \[0.1, 0.2, 1.3, 0.5\] \(pixels \[64.0, 96.0, 832.0, 240.0\] in a 640×480 image\) lies outside"),
        ([-0.2, 0.2, 0.3, 0.5], r"box 1 \[-0.2, .*lies outside"),
        ([0.4, 0.2, 0.4, 0.5], r"box 1 \[0.4, 0.2, 0.4, 0.5\] .*zero area"),
        ([0.6, 0.2, 0.4, 0.5], r"box 1 \[0.6, 0.2, 0.4, 0.5\] .*zero area"),
        ([0.1, float("nan"), 0.4, 0.5], r"box 1 \[0.1, nan, 0.4, 0.5\] has a non-finite"),
    ],
)
def test_bad_boxes_raise_naming_the_box(bad, pattern):
    with pytest.raises(BoxError, match=pattern):
        validate_boxes([[0.0, 0.0, 1.0, 1.0], bad], (640, 480))


def test_box_shapes_rounding_and_padding():
    with pytest.raises(BoxError, match=r"shape \(4,\)"):
        validate_boxes([0.1, 0.2, 0.3, 0.4], None)
    clipped = validate_boxes([[-1e-8, 0.0, 1 + 1e-8, 1.0]], None)  # float rounding, not an error
    np.testing.assert_array_equal(clipped, [[0, 0, 1, 1]])
    boxes, mask = proposals.pad_boxes([np.full((2, 4), 0.5), np.zeros((0, 4))], 3)
    assert boxes.shape == (2, 3, 4) and mask.tolist() == [[True, True, False], [False] * 3]
    assert np.all(boxes[~mask] == 0)
    with pytest.raises(BoxError, match="image 0 has 4 boxes"):
        proposals.pad_boxes([np.zeros((4, 4))], 3)
