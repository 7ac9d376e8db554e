"""InstructPix2Pix end to end: diffusers directory → `convert ip2p` → Editor, against diffusers' pipeline."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fireedit_jax import cli, images
from fireedit_jax.checkpoint import CheckpointError
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.pipeline import Editor

STEPS = 5


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory):
    """(diffusers pipeline, its directory, our converted checkpoint directory)."""
    root = tmp_path_factory.mktemp("ip2p")
    pipeline = reference.save_ip2p(str(root / "diffusers"))
    errors = convert_ip2p(str(root / "diffusers"), str(root / "ckpt"), verify=True)
    assert max(errors.values()) < 1e-4, errors
    return pipeline, root / "diffusers", root / "ckpt"


@pytest.fixture(scope="module")
def editor(ip2p):
    return Editor.from_pretrained(str(ip2p[2]))


@pytest.fixture(scope="module")
def source_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8))


def _diffusers_edit(pipeline, image, instruction, latents, **kwargs):
    with torch.no_grad():
        out = pipeline(
            instruction, image=image, num_inference_steps=STEPS, guidance_scale=7.5, image_guidance_scale=1.5,
            latents=torch.from_numpy(latents).permute(0, 3, 1, 2), output_type="np", **kwargs,
        ).images  # fmt: skip
    return out[0]


def test_whole_edit_matches_diffusers_ddim(ip2p, editor, source_image, highest_precision):
    from diffusers import DDIMScheduler

    pipeline = ip2p[0]
    ddim = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
    # from the saved file, as a user's pipeline would load it (and as `convert ip2p` reads it)
    pipeline.scheduler = DDIMScheduler.from_pretrained(str(ip2p[1] / "scheduler"), **ddim)
    latents = np.random.default_rng(1).normal(size=(1, 32, 32, 4)).astype(np.float32)
    want = _diffusers_edit(pipeline, source_image, "make it blue", latents, eta=0.0)

    editor.scheduler_config = dataclasses.replace(editor.scheduler_config, **ddim)
    pixels = images.to_model_array(source_image, source_image.size)[None]
    got = editor.edit_arrays(pixels, ["make it blue"], steps=STEPS, scheduler="ddim", initial_noise=latents)
    got = (np.asarray(got[0]) + 1) / 2
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(want - (pixels[0] + 1) / 2).max() > 0.05  # the edit changed the image: the check is not vacuous


def test_whole_edit_matches_diffusers_euler_ancestral(ip2p, editor, source_image, monkeypatch, highest_precision):
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    pipeline = ip2p[0]
    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_pretrained(str(ip2p[1] / "scheduler"))
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(1, 32, 32, 4)).astype(np.float32)
    step_noise = rng.normal(size=(STEPS, 1, 32, 32, 4)).astype(np.float32)
    draws = iter(torch.from_numpy(n).permute(0, 3, 1, 2) for n in step_noise)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(draws))
    want = _diffusers_edit(pipeline, source_image, "add snow", latents)

    pixels = images.to_model_array(source_image, source_image.size)[None]
    got = editor.edit_arrays(
        pixels, ["add snow"], steps=STEPS, scheduler="euler_ancestral", initial_noise=latents, step_noise=step_noise
    )
    assert np.abs((np.asarray(got[0]) + 1) / 2 - want).max() <= 1e-3


def test_batched_edits_equal_single_edits(editor, source_image):
    other = source_image.transpose(Image.FLIP_LEFT_RIGHT)
    both = editor.edit([source_image, other], ["make it blue", "add snow"], steps=2, progress=False)
    alone = editor.edit(other, "add snow", steps=2, progress=False)
    # the same seed draws noise for the whole batch, so compare what does not depend on it: sizes and determinism
    assert [im.size for im in both] == [(64, 64), (64, 64)]
    again = editor.edit([source_image, other], ["make it blue", "add snow"], steps=2, progress=False)
    np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(again[1]))
    assert alone.size == (64, 64)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "RGB-odd-size"])
def test_odd_inputs_keep_their_size(ip2p, tmp_path, mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 50), np.uint16))
    elif mode == "RGB-odd-size":
        img = Image.fromarray(rng.integers(0, 256, (333, 517, 3), np.uint8))
    else:
        img = Image.fromarray(rng.integers(0, 256, (40, 50, 4), np.uint8), "RGBA").convert(mode)
    path = tmp_path / "input.png"
    img.save(path)
    out = tmp_path / "out.png"
    code = cli.main(
        ["edit", "--checkpoint", str(ip2p[2]), "--image", str(path), "--instruction", "make it blue",
         "--out", str(out), "--steps", "2"]
    )  # fmt: skip
    assert code == 0
    assert Image.open(out).size == img.size and Image.open(out).mode == "RGB"


def test_bad_inputs_get_one_clear_error(ip2p, tmp_path, capsys):
    ckpt = str(ip2p[2])

    def run(*args):
        code = cli.main(["edit", "--checkpoint", *args, "--instruction", "x", "--out", str(tmp_path / "o.png")])
        return code, capsys.readouterr().err

    code, err = run(ckpt, "--image", str(tmp_path / "missing.png"))
    assert code == 2 and "missing.png" in err and "does not exist" in err
    (tmp_path / "text.png").write_text("hello")
    code, err = run(ckpt, "--image", str(tmp_path / "text.png"))
    assert code == 2 and "not a readable image" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    code, err = run(str(tmp_path / "no_ckpt"), "--image", str(tmp_path / "ok.png"))
    assert code == 2 and "no_ckpt" in err and "does not exist" in err


def test_checkpoint_that_does_not_match_its_config_names_the_keys(ip2p, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ip2p[2], broken)
    config = json.loads((broken / "config.json").read_text())
    config["model"]["text_encoder"]["num_layers"] += 1
    config["model"]["unet"]["cross_attention_dim"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        Editor.from_pretrained(str(broken))
    message = str(err.value)
    assert "text_encoder/" in message and "attn2/to_k/kernel" in message


def test_convert_cli_verifies(ip2p, tmp_path, capsys):
    code = cli.main(["convert", "ip2p", "--src", str(ip2p[1]), "--out", str(tmp_path / "c"), "--verify"])
    out = capsys.readouterr().out
    assert code == 0 and "unet" in out and "max |torch - flax|" in out
    assert (tmp_path / "c" / "config.json").exists()
    code = cli.main(["convert", "ip2p", "--src", str(tmp_path), "--out", str(tmp_path / "d")])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_overlong_instruction_is_truncated_with_a_warning(editor):
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ids = editor.tokenize(["x " * 200])
    assert ids.shape == (1, 77)


def test_truncated_weight_file_is_one_clear_error(ip2p, tmp_path):
    """A data file under params/ cut short: the CLI says the checkpoint is damaged, naming the leaf, and exits 2 with
    nothing after the line (Orbax's restore left reads in flight that each printed "Event loop is closed")."""
    import subprocess
    import sys

    broken = tmp_path / "broken"
    shutil.copytree(ip2p[2], broken)
    data = max((p for p in (broken / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    command = [sys.executable, "-m", "fireedit_jax.cli", "edit", "--checkpoint", str(broken), "--image",
               str(tmp_path / "in.png"), "--instruction", "make it blue", "--out", str(tmp_path / "out.png")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr
    assert lines[0].startswith("fireedit-jax edit: error: checkpoint") and "is damaged" in lines[0]
    assert re.search(r"stored bytes of (unet|vae|text_encoder)/\S+/(kernel|bias|scale|embedding)", lines[0]), lines[0]
    assert "export it again" in lines[0] and not (tmp_path / "out.png").exists()
