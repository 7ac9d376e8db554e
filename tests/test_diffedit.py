"""DiffEdit's mask against diffusers' StableDiffusionDiffEditPipeline.generate_mask, and on an IP2P model."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from fireedit_jax import images
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.diffusion import diffedit
from fireedit_jax.pipeline import Editor

SIZE, MAPS = 64, 3  # 32 × 32 latents; noise draws per mask


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers' DiffEdit pipeline, our Editor) for one random 4-channel Stable Diffusion."""
    from diffusers import DDIMScheduler, StableDiffusionDiffEditPipeline

    root = tmp_path_factory.mktemp("diffedit")
    base = reference.save_ip2p(str(root / "diffusers"), in_channels=4)
    assert max(convert_ip2p(str(root / "diffusers"), str(root / "ckpt"), verify=False).values(), default=0) < 1e-4
    ddim = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
    scheduler = DDIMScheduler.from_pretrained(str(root / "diffusers" / "scheduler"), **ddim)
    pipeline = StableDiffusionDiffEditPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                               unet=base.unet, scheduler=scheduler, safety_checker=None,
                                               feature_extractor=None, inverse_scheduler=None,
                                               requires_safety_checker=False)  # fmt: skip
    editor = Editor.from_pretrained(str(root / "ckpt"))
    editor.scheduler_config = dataclasses.replace(editor.scheduler_config, **ddim)
    return pipeline, editor


def test_mask_matches_diffusers_generate_mask(sd, monkeypatch):
    pipeline, editor = sd
    vae = pipeline.vae
    # our latents are the VAE's mode: make diffusers' posterior draw the mode too (it then draws no noise there)
    monkeypatch.setattr(pipeline, "prepare_image_latents", lambda image, batch_size, dtype, device, generator=None:
                        vae.encode(image.to(dtype)).latent_dist.mode() * vae.config.scaling_factor)  # fmt: skip
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    target, strength = "a blue cat", 0.5
    # The same computation as ours: the source prompt "" equals its negative, so diffusers' guided source
    # prediction is ε(""), its target ε("") + s·(ε(target) − ε("")), and s cancels in the normalised map.
    # (guidance_scale ≤ 1, the unguided form, fails inside diffusers: its encode_prompt results are swapped.)
    with torch.no_grad():
        want = pipeline.generate_mask(image=source, target_prompt=target, source_prompt="", num_maps_per_mask=MAPS,
                                      mask_encode_strength=strength, guidance_scale=7.5, output_type="np",
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
        noise = torch.randn((MAPS, 4, SIZE // 8 * 4, SIZE // 8 * 4), generator=torch.Generator().manual_seed(0))
    pipeline.scheduler.set_timesteps(diffedit.STEPS)
    timesteps, _ = pipeline.get_timesteps(diffedit.STEPS, strength, "cpu")
    assert diffedit.encode_timestep(editor.scheduler_config, diffedit.STEPS, strength) == int(timesteps[0])
    pixels = images.to_model_array(source, source.size)[None]
    with jax.default_matmul_precision("highest"):
        got = diffedit.edit_model_diffedit(editor.model, editor.params, editor.scheduler_config, pixels,
                                           editor.text_inputs([target]), noise=noise.permute(0, 2, 3, 1).numpy(),
                                           repeats=MAPS, strength=strength)  # fmt: skip
    got, want = np.asarray(got[0]) > 0.5, np.asarray(want[0]) > 0.5
    agree = float(np.mean(got == want))
    print(f"DiffEdit mask: {agree:.4f} of {got.size} latent cells agree with diffusers; {want.mean():.3f} marked")
    assert 0.02 < want.mean() < 0.98  # a mask, not a constant
    assert agree >= 0.995


def test_guidance_map_mask_is_each_images_own():
    """The clamp is each image's own mean: an image's mask does not change with its batch (diffusers'
    batch-wide mean would), and the rule is clip(map, 0, 3·mean) / (3·mean) > 0.5."""
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(2, 2 * MAPS, 4, 4, 3)).astype(np.float32)
    both = np.asarray(diffedit.guidance_map_mask(source, target, MAPS))
    alone = np.asarray(diffedit.guidance_map_mask(source[:MAPS], target[:MAPS], MAPS))
    np.testing.assert_array_equal(both[0], alone[0])
    guidance_map = np.abs(target - source).reshape(2, MAPS, 4, 4, 3).mean(axis=(1, 4))
    want = guidance_map > 0.5 * 3.0 * guidance_map.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(both, want)


def test_auto_mask_on_an_instruction_model(sd):
    """`mask="auto"`: the Editor's DiffEdit region at the image's own size, and the edit keeps the rest."""
    _, editor = sd
    source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), np.uint8))
    (region,) = editor.find_regions([source], ["a blue cat"], masks=["auto"])
    assert region.shape == (48, 80) and region.dtype == bool and 0 < region.mean() < 1
    out = np.asarray(editor.edit(source, "a blue cat", mask="auto", steps=2, text_guidance=3.0, progress=False))
    np.testing.assert_array_equal(out[~region], np.asarray(source)[~region])
