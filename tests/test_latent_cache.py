"""`fireedit-jax cache-latents` on a tiny VAE (configs/tiny.py): the cache reads back as
encoding on the fly gives, bad records are skipped and counted, and the IP2P loss on a
cached batch equals the loss on the same examples' pixels."""

import contextlib
import dataclasses
import io
import json

import flax
import grain
import jax
import numpy as np
import pytest
from test_data_sources import png_bytes
from test_train_step import load_config

from fireedit_jax import checkpoint, cli
from fireedit_jax.convert.reference import clip_tokenizer
from fireedit_jax.data.latent_cache import LatentSource, LatentTransform
from fireedit_jax.data.pipeline import make_iterator
from fireedit_jax.data.records import Task
from fireedit_jax.data.sources import JsonlSource
from fireedit_jax.data.transforms import EditTransform, clip_text_field
from fireedit_jax.models.fireedit import LATENT_FIELDS, EditModel, encode_latents
from fireedit_jax.train import flops, inputs, losses, run
from fireedit_jax.train import mesh as mesh_lib

RECORDS = 11  # + 1 corrupt: one full batch of 8 and a partial one


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """`cache-latents` of a small JSONL source, run: (config, model, params, the JSONL source, the cache's
    directory, the command's argv, what it printed)."""
    config = load_config("tiny")
    model = EditModel.from_config(config.model)
    params = model.draw_params(1)
    ckpt = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(str(ckpt), params, config)

    root = tmp_path_factory.mktemp("jsonl")
    lines = []
    for i in range(RECORDS + 1):
        for side in ("src", "tgt"):
            (root / f"{i}_{side}.png").write_bytes(png_bytes(2 * i + (side == "tgt"), (80 + 8 * (i % 3), 64)))
        line = {"source_image": f"{i}_src.png", "target_image": f"{i}_tgt.png", "instruction": f"make {i} red"}
        if i % 2:
            line["boxes"] = [[0.05, 0.1, 0.5, 0.9]]
        if i == 3:
            line = {"source_image": "3_src.png", "instruction": "what is it?", "answer": "a cup", "task": "vqa"}
        lines.append(line)
    (root / "5_tgt.png").write_bytes(b"not a png")  # skipped and counted
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = tmp_path_factory.mktemp("cache")
    argv = ["cache-latents", "--checkpoint", str(ckpt), "--source", "jsonl", "--data", str(root), "--out", str(out),
            "--batch-size", "8", "--max-skip-fraction", "0.5"]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return config, model, params, JsonlSource(str(root)), out, argv, printed.getvalue()


def test_cache_matches_encoding_on_the_fly(cached, capsys):
    config, model, params, source, out, argv, printed = cached
    assert f"wrote the latents of {RECORDS} of {RECORDS + 1} records" in printed
    assert "skipped 1 that could not be decoded" in printed
    (path,) = out.glob("latent_triplets/*")
    assert f"to {path}," in printed
    cache = LatentSource(path)
    assert len(cache) == RECORDS
    assert cache.metadata["resolution"] == config.resolution == 64
    assert cache.metadata["latent_shape"] == [32, 32, 4]

    rows = [cache[i] for i in range(len(cache))]
    assert [row["index"] for row in rows] == [i for i in range(RECORDS + 1) if i != 5]  # source order
    pixels = EditTransform(config.resolution)  # the centred crop, no flip
    examples = [pixels(source[row["index"]])[0] for row in rows]
    to_float = lambda key: np.stack([e[key] for e in examples]).astype(np.float32) / 127.5 - 1.0  # noqa: E731
    expected = jax.jit(encode_latents, static_argnums=0)(model, params, to_float("source"), to_float("target"))
    # the VQA record's blank target (a constant image) meets GroupNorm at zero variance,
    # where the devices' different summation orders show: looser there
    blank = np.array([row["task"] == Task.VQA for row in rows])
    for name in LATENT_FIELDS:
        got = np.stack([row[name] for row in rows])
        assert got.shape == (RECORDS, 32, 32, 4) and np.std(got) > 0.01
        loose = name != "source_latents"
        np.testing.assert_allclose(got[~blank], expected[name][~blank], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[blank], expected[name][blank], rtol=1e-5, atol=1e-3 if loose else 1e-5)
    for row, example in zip(rows, examples):
        original = source[row["index"]]
        assert (row["key"], row["instruction"], row["answer"], row["task"]) == (
            original.key, original.instruction, original.answer, original.task,
        )  # fmt: skip
        if original.boxes is None:
            assert row["boxes"] is None
        else:
            np.testing.assert_array_equal(row["boxes"], example["boxes"])  # boxes on the crop
    assert blank.sum() == 1

    assert cli.main(argv) == 2  # an existing cache is kept unless --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_ip2p_loss_on_cached_latents_equals_loss_on_pixels(cached):
    config, model, params, source, out, _, _ = cached
    cache = LatentSource(next(out.glob("latent_triplets/*")))
    text = clip_text_field(clip_tokenizer(), name="input", source="instruction")
    iterator = make_iterator(
        [cache], LatentTransform(EditTransform(texts=(text,))), batch_size=8, num_epochs=1,
        shard=grain.sharding.NoSharding(), seed=3,
    )  # fmt: skip
    latent_batch = next(iterator)
    assert not {"source", "target"} & latent_batch.keys()
    pixels = EditTransform(config.resolution, texts=(text,))
    collated = pixels.collate([pixels(source[cache[int(i)]["index"]])[0] for i in latent_batch["record_index"]])
    pixel_batch = {key: collated[key].astype(np.float32) / 127.5 - 1.0 for key in ("source", "target")}
    pixel_batch["input_ids"] = collated["input_ids"]
    np.testing.assert_array_equal(pixel_batch["input_ids"], latent_batch["input_ids"])

    loss_fn = jax.jit(losses.make_ip2p_loss(model, config))
    keys = jax.random.split(jax.random.key(7), 8)
    batch = {key: latent_batch[key] for key in (*LATENT_FIELDS, "input_ids")}
    from_cache, parts = loss_fn(params, batch, keys)
    from_pixels, _ = loss_fn(params, pixel_batch, keys)
    assert np.isfinite(from_cache) and float(from_cache) > 0
    np.testing.assert_allclose(from_cache, from_pixels, rtol=1e-5)
    np.testing.assert_allclose(parts["diffusion"], from_cache)


@pytest.fixture(scope="module")
def cache_in_bucket(cached, bucket):
    """`cache-latents --out gs://bucket/latents --resolution 16` (built locally, uploaded): the
    cache's path. 16 px: configs/tiny_fireedit.py's resolution, and a small train step."""
    argv = list(cached[5])
    argv[argv.index("--out") + 1] = f"{bucket}/latents"
    assert cli.main([*argv, "--resolution", "16"]) == 0
    return f"{bucket}/latents/latent_triplets/1.1.0"


def _latent_config(config, cache: str):
    config = run.run_defaults(config)
    config.data.sources = {"cache": {"kind": "latents", "path": cache}}
    return config


def test_training_reads_the_latent_cache_through_config_data(cached, cache_in_bucket, tmp_path):
    """`train` on a cache in the bucket (read through a local copy): the batches hold latents and
    no pixels (the loss never runs the VAE encoder); a cache made for another resolution, or mixed
    with pixel sources, is refused."""
    config = _latent_config(cached[0], cache_in_bucket)
    config.resolution = 16
    config.train.steps, config.checkpoint.every, config.logging.every, config.logging.sample_every = 2, 2, 1, 0
    assert flops.loss_inputs(config) == ("input_ids", *LATENT_FIELDS)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    result = run.train_and_evaluate(config, str(tmp_path / "run"), mesh=mesh, progress=False)
    assert result.step == 2 and np.isfinite(result.metrics["loss"]) and result.metrics["data/read/cache"] == 16

    transform = EditTransform(16, texts=(clip_text_field(clip_tokenizer(), name="input", source="instruction"),))
    other = config.copy_and_resolve_references()
    other.resolution = 32
    with pytest.raises(ValueError, match="'cache': the latent cache has resolution 16 \\(config.resolution 32\\)"):
        inputs.make_train_iterator(other, transform, 8)
    other = config.copy_and_resolve_references()
    other.data.sources["shapes"] = {"kind": "shapes", "size": 16}
    with pytest.raises(ValueError, match="mixes latent caches with pixel sources"):
        inputs.make_train_iterator(other, transform, 8)


def test_fireedit_on_a_latent_cache_reads_the_same_inputs_without_the_vae_encoder(cached, cache_in_bucket):
    """FireEdit reads the source pixels (its VLM, HVCA) from the cache's source images and the
    latents in place of the target: every other batch entry equals the pixel pipeline's, and the
    loss's model FLOPs on the cached batch are the pixel batch's less exactly the VAE encoder's.
    (Traced, not run: two compilations of the VLM would cost minutes here; the latents' values
    are checked against encoding on the fly above.)"""
    source = cached[3]
    config = _latent_config(load_config("tiny_fireedit"), cache_in_bucket)
    keys = flops.loss_inputs(config)
    assert "source" in keys and "target" not in keys and set(LATENT_FIELDS) <= set(keys)
    model = EditModel.from_config(config.model)
    transform = inputs.make_transform(config, model, inputs.make_tokenizer("builtin:shape_words"))
    from_cache = next(inputs.make_train_iterator(config, transform, 8))
    cache = LatentSource(cache_in_bucket)
    pixels = dataclasses.replace(transform, flip_probability=0.0)  # the cache's crop: centred, not flipped
    from_pixels = pixels.collate([pixels(source[cache[int(i)]["index"]])[0] for i in from_cache["record_index"]])
    for key in keys:
        if key not in LATENT_FIELDS:
            np.testing.assert_array_equal(from_cache[key], from_pixels[key], err_msg=key)
    pixel_keys = tuple(k for k in keys if k not in LATENT_FIELDS) + ("target",)
    cached_flops, _ = flops.step_flops_per_example(config, inputs.model_batch(from_cache, keys))
    pixel_flops, _ = flops.step_flops_per_example(config, inputs.model_batch(from_pixels, pixel_keys))
    vae = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0)))["vae"]
    image = jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32)
    encoder, _ = flops.count(lambda p, x: encode_latents(model, {"vae": p}, x, x), vae, image)
    assert encoder > 0 and pixel_flops - cached_flops == pytest.approx(encoder / 8, rel=1e-9)
