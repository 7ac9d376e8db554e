"""Mask-guided editing (PromptEditDiff): masks in, masked sampling against diffusers' inpainting
pipeline (4- and 9-channel UNets), the mask encoder's path, the mask_edit loss, errors users get."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from fireedit_jax import cli, images
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.data import shapes, transforms
from fireedit_jax.data.records import BadRecord, EditRecord
from fireedit_jax.pipeline import Editor

STEPS = 4
SIZE = 64  # the reference pipelines' resolution (32 × 32 latents)


# ------------------------------------------------------------------ masks from files, boxes and arrays


def _png(array, mode):
    return Image.fromarray(array, mode)


def test_mask_conventions_and_errors(tmp_path):
    region = np.zeros((16, 20), bool)
    region[4:9, 5:12] = True
    white = _png(region.astype(np.uint8) * 255, "L")
    np.testing.assert_array_equal(images.load_mask(white, (20, 16)), region)
    rgba = np.full((16, 20, 4), 200, np.uint8)
    rgba[..., 3] = np.where(region, 0, 255)  # transparent where to edit (DALL-E 2's edit masks)
    np.testing.assert_array_equal(images.load_mask(_png(rgba, "RGBA"), (20, 16)), region)
    np.testing.assert_array_equal(images.load_mask(region.astype(np.float32), (20, 16)), region)
    white.save(tmp_path / "mask.png")
    with pytest.warns(UserWarning, match="resized"):
        bigger = images.load_mask(str(tmp_path / "mask.png"), (40, 32))
    assert bigger.shape == (32, 40) and bigger.sum() == 4 * region.sum()
    photo = _png(np.random.default_rng(0).integers(0, 256, (16, 20), np.uint8), "L")
    for bad, match in ((photo, "not a black-and-white mask"), (np.zeros((16, 20)), "empty"),
                       (np.ones((16, 20)), "whole image"), (str(tmp_path / "none.png"), "does not exist")):  # fmt: skip
        with pytest.raises(images.ImageError, match=match):
            images.load_mask(bad, (20, 16))


def test_box_masks_and_soft_edges():
    mask = images.box_mask([0.25, 0.5, 0.75, 1.0], (8, 4))
    assert mask.sum() == 4 * 2 and mask[2:, 2:6].all()
    for box in ([0.2, 0.2, 1.3, 0.9], [0.5, 0.5, 0.4, 0.9], [0.1, 0.2, 0.3]):
        with pytest.raises(images.ImageError, match="mask box"):
            images.box_mask(box, (8, 8))
    point = np.zeros((15, 15), bool)
    point[7, 7] = True
    grown = images.soften_mask(point, dilation=2)
    assert grown.sum() == 25 and set(np.unique(grown)) == {0.0, 1.0}
    soft = images.soften_mask(point, dilation=2, feather=4.0)
    assert (soft[grown == 1] == 1).all()  # the marked region is fully edited
    ring = soft[7, 9:]  # from the grown edge outwards: decreasing, 0 past the feather width
    assert ring[0] == 1 and np.all(np.diff(ring) <= 0) and 0 < ring[2] < 1 and ring[-1] == 0


# ------------------------------------------------------------------ data: ShapeEdit's masks, the transform


def test_shapeedit_masks_cover_every_changed_pixel():
    config = shapes.ShapesConfig(size=32)
    kinds = set()
    for index in range(24):
        sample = shapes.generate(config, "train", index)
        changed = (sample["source"] != sample["target"]).any(-1)
        assert sample["mask"].any() and not (changed & ~sample["mask"]).any(), sample["kind"]
        kinds.add(sample["kind"])
        if sample["kind"] in ("colour", "remove"):  # exactly the object's pixels, all of which change
            np.testing.assert_array_equal(changed, sample["mask"])
    assert kinds == set(shapes.KINDS)


def test_transform_crops_and_flips_the_mask_with_the_images():
    config = shapes.ShapesConfig(size=32)
    sample = next(s for s in (shapes.generate(config, "train", i) for i in range(20)) if s["kind"] == "colour")
    from fireedit_jax.train.inputs import _png as png

    record = EditRecord(key="k", source_image=png(sample["source"]), target_image=png(sample["target"]),
                        instruction=sample["instruction"], mask_image=png(sample["mask"].astype(np.uint8) * 255))  # fmt: skip
    transform = transforms.EditTransform(resolution=32, mask=True, flip_probability=1.0)
    example, _ = transform(record)  # no rng: no flip
    np.testing.assert_array_equal(example["mask"][..., 0], sample["mask"])
    flipped, _ = transform(record, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped["mask"][..., 0], sample["mask"][:, ::-1])
    np.testing.assert_array_equal(flipped["source"], sample["source"][:, ::-1])
    with pytest.raises(BadRecord, match="no mask image"):
        transform(dataclasses.replace(record, mask_image=None))


# ------------------------------------------------------------------ the loss's weights


def test_cell_weighted_diffusion_loss_is_the_hand_computed_mean():
    """With a denoiser predicting 0 under x0-prediction the error is the target squared: the weighted
    mean is Σ w·z² / (Σ w · C) per example, then the plain mean over examples."""
    from fireedit_jax.diffusion.schedules import SchedulerConfig
    from fireedit_jax.train.losses import diffusion_loss

    class Zero:
        image_condition = "source"

        @staticmethod
        def denoise(params, sample, t, cond):
            return jnp.zeros(sample.shape[:-1] + (2,))

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
    weights = np.where(rng.uniform(size=(2, 3, 4, 1)) > 0.5, 1.0, 0.1).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    got = diffusion_loss(Zero, None, latents, latents, {}, keys, SchedulerConfig(prediction_type="sample"),
                         cell_weights=weights)  # fmt: skip
    per_example = (weights * latents**2).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * 2)
    np.testing.assert_allclose(float(got), per_example.mean(), rtol=1e-6)
    plain = diffusion_loss(Zero, None, latents, latents, {}, keys, SchedulerConfig(prediction_type="sample"))
    np.testing.assert_allclose(float(plain), (latents**2).mean(), rtol=1e-6)


# ------------------------------------------------------------------ whole edits against diffusers' inpainting pipeline


@pytest.fixture(scope="module", params=[4, 9], ids=["sd_blend", "sd_inpaint"])
def inpaint(request, tmp_path_factory):
    """(diffusers StableDiffusionInpaintPipeline, our Editor) for a random 4- or 9-channel UNet."""
    root = tmp_path_factory.mktemp(f"inpaint{request.param}")
    pipeline = reference.save_ip2p(str(root / "diffusers"), in_channels=request.param)
    errors = convert_ip2p(str(root / "diffusers"), str(root / "ckpt"), verify=True)
    assert max(errors.values()) < 1e-4, errors
    return pipeline, Editor.from_pretrained(str(root / "ckpt")), request.param, root / "diffusers"


def _block_mask():
    """A mask made of whole 2 × 2 latent cells, so diffusers' nearest downsampling and our per-cell
    max agree; white = edit."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10:40, 22:54] = True
    return mask


def test_masked_edit_matches_diffusers_inpainting(inpaint, monkeypatch, highest_precision):
    from diffusers import DDIMScheduler
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    pipeline, editor, channels, directory = inpaint
    # our image latents are the VAE's mode; make diffusers' draws from the posterior the mode too
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    ddim = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
    # from the saved file, as `convert` reads it (its timestep spacing included)
    pipeline.scheduler = DDIMScheduler.from_pretrained(str(directory / "scheduler"), **ddim)
    editor.scheduler_config = dataclasses.replace(editor.scheduler_config, **ddim)
    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    mask = _block_mask()
    latents = rng.normal(size=(1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    with torch.no_grad():
        want = pipeline("make it blue", image=source, mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
                        num_inference_steps=STEPS, guidance_scale=5.0, strength=1.0, height=SIZE, width=SIZE,
                        latents=torch.from_numpy(latents).permute(0, 3, 1, 2), output_type="np").images[0]  # fmt: skip
    pixels = images.to_model_array(source, source.size)[None]
    got = editor.edit_arrays(pixels, ["make it blue"], masks=mask[None].astype(np.float32), steps=STEPS,
                             scheduler="ddim", text_guidance=5.0, initial_noise=latents)  # fmt: skip
    got = (np.asarray(got[0]) + 1) / 2
    err = np.abs(got - want).max()
    print(f"{channels}-channel UNet: max |ours − diffusers| {err:.2e}")
    assert err <= 1e-3
    assert np.abs(want[mask] - (pixels[0][mask] + 1) / 2).max() > 0.05  # the edit changed the masked region
    assert editor.model.guidance == "text" and editor.methods == (("ip2p", "mask") if channels == 4 else ("mask",))


def test_inpainting_checkpoint_needs_a_mask(inpaint):
    """A 9-channel (inpainting) UNet refuses an edit without a mask and the mask-free method; a
    4-channel one (SD text-to-image) serves both, so it edits without a mask too."""
    _, editor, channels, _ = inpaint
    pixels = np.zeros((1, SIZE, SIZE, 3), np.float32)
    if channels == 9:
        with pytest.raises(ValueError, match="needs a mask"):
            editor.edit_arrays(pixels, ["make it blue"], steps=1)
        with pytest.raises(ValueError, match="cannot edit with --method ip2p"):
            editor.check_method("ip2p", has_mask=True)
    else:
        assert editor.check_method("ip2p", has_mask=True) == "ip2p"
        out = np.asarray(editor.edit_arrays(pixels, ["make it blue"], steps=1))
        assert out.shape == pixels.shape and np.isfinite(out).all()


# ------------------------------------------------------------------ the demo-size mask-guided model


@pytest.fixture(scope="module")
def mask_checkpoint(tmp_path_factory):
    """configs/shapes_mask.py's model with random weights (`EditModel.draw_params`), saved as an inference
    checkpoint."""
    from fireedit_jax import checkpoint
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train.inputs import make_tokenizer
    from fireedit_jax.train.run import load_config

    config = load_config("configs/shapes_mask.py")
    model = EditModel.from_config(config.model)
    params = model.draw_params()
    directory = tmp_path_factory.mktemp("shapes_mask") / "ckpt"
    tokenizer_dir = directory.parent / "tokenizer"
    make_tokenizer(config.data.tokenizer).save_pretrained(str(tokenizer_dir))
    checkpoint.save(str(directory), params, config, tokenizer_dir=str(tokenizer_dir))
    return directory


@pytest.fixture(scope="module")
def mask_editor(mask_checkpoint):
    return Editor.from_pretrained(str(mask_checkpoint))


def test_outside_the_mask_the_edit_is_the_source_exactly(mask_editor):
    """Masked sampling through the exact pixel-unshuffle autoencoder: every pixel outside the mask's
    latent cells is the source's (the random model paints noise inside)."""
    sample = next(s for s in (shapes.generate(shapes.ShapesConfig(size=32), "test", i) for i in range(9))
                  if s["kind"] == "colour")  # fmt: skip
    assert mask_editor.default_method == "mask"
    out = np.asarray(mask_editor.edit(Image.fromarray(sample["source"]), sample["instruction"], mask=sample["mask"],
                                      steps=2, progress=False))  # fmt: skip
    cells = np.kron(sample["mask"].reshape(16, 2, 16, 2).any((1, 3)), np.ones((2, 2), bool))
    np.testing.assert_array_equal(out[~cells], sample["source"][~cells])
    assert np.abs(out[cells].astype(int) - sample["source"][cells]).max() > 20
    plain = np.asarray(mask_editor.edit(Image.fromarray(sample["source"]), sample["instruction"], steps=2,
                                        method="ip2p", progress=False))  # fmt: skip
    assert np.abs(plain[~cells].astype(int) - sample["source"][~cells]).max() > 0  # without a mask: no such guarantee


def test_at_the_inputs_own_size_the_pixels_outside_the_mask_are_the_inputs(mask_editor):
    """Images that are no working size (landscape and portrait): the edit is composited at the input's
    size, so beyond the feathered seam every pixel is the input's, exactly."""
    rng = np.random.default_rng(0)
    for width, height in ((300, 200), (200, 300)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
        mask = np.zeros((height, width), bool)
        mask[height // 4 : height // 2, width // 3 : width // 2] = True
        out = np.asarray(mask_editor.edit(image, "make the red circle blue", mask=mask, mask_feather=4.0, steps=2,
                                          progress=False))  # fmt: skip
        assert out.shape == (height, width, 3)
        seam = images.soften_mask(mask, feather=4.0) > 0
        np.testing.assert_array_equal(out[~seam], np.asarray(image)[~seam])
        assert np.abs(out[mask].astype(int) - np.asarray(image)[mask]).mean() > 10  # edited inside


def test_crop_editing_changes_nothing_outside_the_crop(mask_editor, mask_checkpoint, tmp_path):
    """A small region of a large image (1,000 × 700): the crop around it is edited at the working size and
    pasted back; outside the crop, and outside the region, the image is the input's."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (700, 1000, 3), np.uint8))
    region = np.zeros((700, 1000), bool)
    region[300:340, 600:660] = True
    out = np.asarray(mask_editor.edit(image, "make the red circle blue", mask=region, mask_crop=20, steps=2,
                                      progress=False))  # fmt: skip
    source = np.asarray(image)
    assert images.crop_region(region, 20) == (580, 280, 680, 360)
    np.testing.assert_array_equal(out[~region], source[~region])
    detail = np.abs(out[region].astype(int) - source[region]).mean()
    whole = np.asarray(mask_editor.edit(image, "make the red circle blue", mask=region, steps=2, progress=False))
    assert detail > 10 and not np.array_equal(whole[region], out[region])  # another edit: the crop's
    image.save(tmp_path / "big.png")
    Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert cli.main(["edit", "--checkpoint", str(mask_checkpoint), "--image", str(tmp_path / "big.png"),
                     "--instruction", "make the red circle blue", "--mask", str(tmp_path / "mask.png"),
                     "--mask-crop", "20", "--steps", "2", "--out", str(tmp_path / "out.png")]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), out)


def test_a_mask_thinner_than_a_latent_cell_is_edited_with_a_warning(mask_editor, mask_checkpoint, tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), np.uint8))
    line = np.zeros((200, 300), bool)
    line[100, 50:250] = True  # one pixel thick: thinner than a cell at the working size
    with pytest.warns(UserWarning, match="thinner than one latent cell"):
        out = np.asarray(mask_editor.edit(image, "make the red circle blue", mask=line, steps=2, progress=False))
    np.testing.assert_array_equal(out[~line], np.asarray(image)[~line])
    assert (out[line] != np.asarray(image)[line]).any()  # it did not vanish
    # a batch edit's line with that mask: the same warning, the same rule
    image.save(tmp_path / "image.png")
    Image.fromarray(line.astype(np.uint8) * 255).save(tmp_path / "line.png")
    (tmp_path / "edits.jsonl").write_text(json.dumps({"image": "image.png", "instruction": "make the red circle blue",
                                                      "mask": "line.png", "output": "lined"}))  # fmt: skip
    with pytest.warns(UserWarning, match="thinner than one latent cell"):
        assert cli.main(["edit", "--checkpoint", str(mask_checkpoint), "--jsonl", str(tmp_path / "edits.jsonl"),
                         "--steps", "2", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    batch = np.asarray(Image.open(tmp_path / "out" / "lined.png"))
    np.testing.assert_array_equal(batch[~line], np.asarray(image)[~line])
    assert (batch[line] != np.asarray(image)[line]).any()
    block = np.zeros((200, 300), bool)
    block[50:150, 100:200] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask of whole cells: no warning
        mask_editor.edit(image, "make the red circle blue", mask=block, steps=2, progress=False)


def test_mask_inputs_get_one_clear_error(mask_editor):
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    cases = [
        (dict(mask=np.zeros((32, 32))), "empty"),
        (dict(mask=np.ones((32, 32))), "whole image"),
        (dict(mask=Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8))), "black-and-white"),
        (dict(mask_box=[0.5, 0.5, 1.2, 0.9]), r"\[0, 1\]"),
        (dict(mask=np.eye(32), mask_box=[0.1, 0.1, 0.5, 0.5]), "not both"),
        (dict(method="mask"), "needs the region to edit"),
        (dict(method="fireedit", mask_box=[0.1, 0.1, 0.5, 0.5]), "It serves: ip2p, mask"),
        (dict(method="region", mask_box=[0.1, 0.1, 0.5, 0.5]), "no region head"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            mask_editor.edit(image, "make the red circle blue", steps=2, progress=False, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = np.zeros((16, 16), bool)
        mask[2:6, 2:6] = True
        out = mask_editor.edit(image, "make the red circle blue", mask=mask, steps=2, progress=False)
    assert out.size == (32, 32) and any("resized" in str(w.message) for w in caught)


def test_edit_cli_takes_a_mask_box_and_names_bad_ones(mask_checkpoint, tmp_path, capsys):
    from fireedit_jax import cli

    image = tmp_path / "scene.png"
    Image.fromarray(shapes.generate(shapes.ShapesConfig(size=32), "test", 0)["source"]).save(image)
    common = ["edit", "--checkpoint", str(mask_checkpoint), "--image", str(image), "--instruction",
              "make the red circle blue", "--steps", "2", "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert cli.main(common + ["--mask-box", "0.1,0.1,0.5,0.6", "--mask-feather", "2"]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    assert cli.main(common + ["--mask-box", "0.1,0.1,0.5"]) == 2
    assert "four comma-separated numbers" in capsys.readouterr().err
    assert cli.main(common + ["--method", "mask"]) == 2
    assert "needs the region to edit" in capsys.readouterr().err


def test_init_from_a_checkpoint_without_the_mask_leaves_initialises_them_and_says_so(tmp_path):
    """`train --init` of a mask-guided config from a plain checkpoint (here configs/shapes.py's clip_text
    model; a converted IP2P one is the same): the old leaves as stored, the mask encoder and the UNet's
    fusers fresh (gates at 0: the UNet computes what it did), listed in a warning; other gaps stay errors."""
    import flax

    from fireedit_jax import checkpoint
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import load_config
    from fireedit_jax.train.step import Trainer

    plain = load_config("configs/shapes.py:clip_text")
    model = EditModel.from_config(plain.model)
    stored = jax.tree.map(np.asarray, flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(3))))
    checkpoint.save(str(tmp_path / "plain"), stored, plain)
    trainer = Trainer.from_config(load_config("configs/shapes_mask.py"))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)["params"]
    # configs/shapes_mask.py's injection layer is "cross": PromptEditDiff's gated cross-attention
    with pytest.warns(UserWarning, match=r"mask encoder \(\d+ leaves\) or gated cross-attention to the mask tokens "
                                         r"\(unet.injection_layer 'cross'\) in 7 UNet transformer blocks"):
        params, _ = ckpt_lib.init_params(str(tmp_path / "plain"), abstract, trainer.model.init)
    flat = flax.traverse_util.flatten_dict(params)
    assert set(flat) == set(flax.traverse_util.flatten_dict(abstract))
    for key, value in flax.traverse_util.flatten_dict(stored).items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value)
    gates = [np.asarray(v) for k, v in flat.items() if k[-1].startswith("alpha")]
    assert gates and all(g == 0 for g in gates) and any(k[0] == "mask_encoder" for k in flat)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        ckpt_lib.init_params(str(tmp_path / "plain"), abstract)  # without an init for them: an error


@pytest.mark.parametrize("layer", ["self", "cross"])
def test_init_warning_names_the_unet_injection_layer_it_adds(layer):
    """The --init warning names the gated layer that the new fuser leaves make: GLIGEN's gated
    self-attention or PromptEditDiff's gated cross-attention, from the leaves themselves."""
    import flax

    from fireedit_jax.models.unet import UNet
    from fireedit_jax.models.unet_config import CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, UNetConfig
    from fireedit_jax.train.checkpoints import _injection_layer

    config = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, down_block_types=(CROSS_DOWN, PLAIN_DOWN),
                        up_block_types=(PLAIN_UP, CROSS_UP), num_heads=2, cross_attention_dim=16, norm_num_groups=8,
                        gated_injection=True, injection_layer=layer)  # fmt: skip
    abstract = jax.eval_shape(UNet(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                              jnp.zeros((1, 3, 16)))  # fmt: skip
    names = ["/".join(k) for k in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract)) if "fuser" in k]
    assert names
    named = _injection_layer(names)
    assert f"unet.injection_layer '{layer}'" in named
    assert named.startswith("gated self-attention" if layer == "self" else "gated cross-attention")
