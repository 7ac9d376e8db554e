"""Learnt edit regions (Beyond Editing Pairs): the region model in a checkpoint, its losses on
caption batches (no target image), the predicted mask driving the mask-guided edit, the CLI."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fireedit_jax import checkpoint, cli
from fireedit_jax.data import shapes
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.pipeline import Editor
from fireedit_jax.train import inputs, losses, masks
from fireedit_jax.train.flops import loss_inputs
from fireedit_jax.train.run import load_config

REGION = "configs/shapes_region.py"


def region_config(variant: str = "region", **train):
    config = load_config(f"{REGION}:{variant}")
    config.train.update(batch_size=2, region_edit_steps=1, **train)
    return config


def caption_batch(config, model, count: int = 2) -> dict:
    """`count` records of ShapeEdit's caption view through the training transform and `model_batch`."""
    transform = inputs.make_transform(config, model, shapes.build_tokenizer())
    records = inputs.ShapeEditRecords("shapes", view="captions", size=32)
    examples = [transform(records[i])[0] for i in range(count)]
    return inputs.model_batch(transform.collate(examples), loss_inputs(config))


@pytest.fixture(scope="module")
def region_setup():
    config = region_config()
    model = EditModel.from_config(config.model)
    params = flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0)))
    return config, model, params


def test_the_loss_reads_captions_and_no_target_image(region_setup):
    config, model, params = region_setup
    batch = caption_batch(config, model)
    assert "target" not in batch and set(batch) == {*losses.REGION_INPUTS, "input_ids"}
    trainable, frozen = masks.split(params, masks.trainable_mask(params, config.train.trainable))
    loss_fn = losses.LOSSES["learnable_region"](model, config)

    def clip_only(trainable):  # L_clip alone: its gradient reaches the predictor through the soft region only
        loss, parts = loss_fn(masks.combine(trainable, frozen), batch, jax.random.split(jax.random.key(1), 2))
        return parts["clip"], parts

    grads, parts = jax.jit(jax.grad(clip_only, has_aux=True))(trainable)
    assert all(np.isfinite(float(v)) for v in parts.values())
    # region_area is the mean edit probability of the predicted cells: at init, every cell near the prior (0.15)
    _, patches = model.region.image_features(params["region"], batch["source"])
    logits = model.region.predict(params["region"], patches, batch["region_ids"], batch["region_mask"]).logits
    np.testing.assert_allclose(float(parts["region_area"]), float(jnp.mean(jax.nn.sigmoid(logits))), rtol=1e-5)
    prior = config.model.learnable_region.predictor.initial_probability
    # (the small output weights move each cell a little: 0.162 measured)
    assert abs(float(parts["region_area"]) - prior) < 0.03, (float(parts["region_area"]), prior)
    norms = {"/".join(k): float(jnp.linalg.norm(v)) for k, v in flax.traverse_util.flatten_dict(grads).items()
             if v is not None}  # fmt: skip
    assert {k.split("/")[1] for k in norms} == {"predictor", "t5"}  # CLIP and the generator are frozen
    head = [n for k, n in norms.items() if k.startswith("region/predictor/head_out")]
    assert head and min(head) > 0  # the CLIP losses on the edited image reach the region's logits


def test_without_the_clip_loss_no_edit_is_made(region_setup, monkeypatch):
    config, model, params = region_setup
    config = region_config("no_clip")
    batch = caption_batch(config, model)
    calls = []
    monkeypatch.setattr(EditModel, "denoise", lambda *a, **k: calls.append(1))
    loss, parts = losses.LOSSES["learnable_region"](model, config)(params, batch, jax.random.split(jax.random.key(1), 2))
    assert not calls and set(parts) == {"semantic_alignment", "region_area"} and np.isfinite(float(loss))


def test_clip_contrastive_trains_the_clip_towers_only(region_setup):
    config, model, params = region_setup
    config = region_config("clip")
    batch = caption_batch(config, model, 4)
    assert set(batch) == {"source", "caption_ids"}
    loss_fn = losses.LOSSES["clip_contrastive"](model, config)
    grads = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
    flat = {"/".join(k): float(jnp.linalg.norm(v)) for k, v in flax.traverse_util.flatten_dict(grads).items()}
    assert all(n > 0 for k, n in flat.items() if k.startswith("region/clip_") and k.endswith("kernel"))
    assert all(n == 0 for k, n in flat.items() if not k.startswith("region/clip_"))


def test_an_edit_mask_is_the_patches_above_the_threshold(region_setup):
    _, model, _ = region_setup
    logits = np.full((1, model.region.grid**2), -3.0, np.float32)
    logits[0, model.region.grid + 2] = 0.1  # row 1, column 2: 2-pixel patches on the 32-pixel scene
    probability = np.asarray(model.region.pixel_mask(jnp.asarray(logits), 32, 32))[0, ..., 0]
    want = np.zeros((32, 32), bool)
    want[2:4, 4:6] = True
    np.testing.assert_array_equal(probability > model.region.threshold, want)
    np.testing.assert_allclose(probability[want], 1 / (1 + np.exp(-0.1)), rtol=1e-6)


@pytest.fixture(scope="module")
def region_checkpoint(region_setup, tmp_path_factory):
    """The region config's model at its init (the predictor's prior: every patch at 0.15, no region)."""
    config, model, params = region_setup
    params = jax.tree.map(np.asarray, params)
    directory = tmp_path_factory.mktemp("region") / "ckpt"
    tokenizer_dir = directory.parent / "tokenizer"
    shapes.build_tokenizer().save_pretrained(str(tokenizer_dir))
    checkpoint.save(str(directory), params, config, tokenizer_dir=str(tokenizer_dir))
    return directory


@pytest.fixture(scope="module")
def right_half_checkpoint(region_setup, tmp_path_factory):
    """The region model set to mark the right half of any scene through its own path: the predictor reads the
    cells' coordinates (`coordinates`), image_proj reads nothing, coordinate_proj puts 1e4·x on feature 0 and
    −1e4·x on feature 1 (far above what the blocks add), so head_norm gives ±√(W/2) there by x's sign;
    head_hidden passes feature 0 alone through the GELU and head_out maps it to logit 2·√32 − 5 ≈ 6.3 right of
    the centre, −5 left of it."""
    config, _, params = region_setup
    config = region_config()
    config.model.learnable_region.predictor.coordinates = True
    params = jax.tree.map(np.array, params)
    predictor = params["region"]["predictor"]
    width = predictor["image_proj"]["kernel"].shape[1]
    predictor["image_proj"] = jax.tree.map(np.zeros_like, predictor["image_proj"])
    kernel = np.zeros((2, width), np.float32)
    kernel[0, 0], kernel[0, 1] = 1e4, -1e4
    predictor["coordinate_proj"] = {"kernel": kernel, "bias": np.zeros(width, np.float32)}
    hidden = predictor["head_hidden"]
    hidden["kernel"][:], hidden["bias"][:] = 0, 0
    hidden["kernel"][0, 0] = 1
    out = predictor["head_out"]
    out["kernel"][:], out["bias"][:] = 0, -5
    out["kernel"][0, 0] = 2
    directory = tmp_path_factory.mktemp("right_half") / "ckpt"
    tokenizer_dir = directory.parent / "tokenizer"
    shapes.build_tokenizer().save_pretrained(str(tokenizer_dir))
    checkpoint.save(str(directory), params, config, tokenizer_dir=str(tokenizer_dir))
    return directory


def test_predicted_region_drives_the_masked_edit(right_half_checkpoint):
    editor = Editor.from_pretrained(str(right_half_checkpoint))
    assert editor.methods == ("ip2p", "mask", "region") and editor.default_method == "region"
    right = np.zeros((32, 32), bool)
    right[:, 16:] = True
    sample = shapes.generate(shapes.ShapesConfig(size=32), "test", 0)
    source = Image.fromarray(sample["source"])
    (predicted,) = editor.predict_regions([source], [sample["instruction"]])
    np.testing.assert_array_equal(predicted, right)  # the predictor's own region, not a patched one
    out = np.asarray(editor.edit(source, sample["instruction"], steps=2, progress=False))
    np.testing.assert_array_equal(out[:, :16], sample["source"][:, :16])  # outside the predicted region: the source
    assert np.abs(out[:, 16:].astype(int) - sample["source"][:, 16:]).max() > 20
    with pytest.raises(ValueError, match="predicts where to edit"):
        editor.edit(source, "remove the red circle", mask_box=[0, 0, 0.5, 0.5], method="region")
    # a region the user gives overrides the predicted one
    out = np.asarray(editor.edit(source, sample["instruction"], mask_box=[0, 0, 1, 0.5], steps=2, progress=False))
    np.testing.assert_array_equal(out[16:], sample["source"][16:])
    assert np.abs(out[:16].astype(int) - sample["source"][:16]).max() > 20


def test_edit_cli_region_saves_the_mask_and_lends_it(region_checkpoint, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(shapes.generate(shapes.ShapesConfig(size=32), "test", 0)["source"]).save(image)
    common = ["edit", "--image", str(image), "--instruction", "make the red circle blue", "--steps", "2"]
    with pytest.warns(UserWarning, match="is empty"):  # the untrained predictor marks no patch
        code = cli.main([*common, "--checkpoint", str(region_checkpoint), "--out", str(tmp_path / "out.png"),
                         "--save-mask", str(tmp_path / "mask.png")])  # fmt: skip
    assert code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(image)))
    assert np.asarray(Image.open(tmp_path / "mask.png")).max() == 0
    with pytest.warns(UserWarning, match="is empty"):  # another checkpoint edits under its mask
        code = cli.main([*common, "--checkpoint", str(region_checkpoint), "--method", "mask",
                         "--mask-from", str(region_checkpoint), "--out", str(tmp_path / "lent.png")])  # fmt: skip
    assert code == 0
    assert cli.main([*common, "--checkpoint", str(region_checkpoint), "--method", "ip2p", "--out",
                     str(tmp_path / "x.png"), "--save-mask", str(tmp_path / "m.png")]) == 2  # fmt: skip
    assert "--save-mask writes the edit's region" in capsys.readouterr().err


def test_init_from_an_exported_generator_adds_the_region_model(region_setup, tmp_path):
    """`--init` an inference checkpoint without a region model (the demo's generator; its VAE has no
    parameters): the region's leaves are initialised anew and named, everything else restored."""
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.step import Trainer

    _, model, params = region_setup
    config = region_config()
    config.train.batch_size = 8  # over the test's 8 devices
    generator = load_config("configs/shapes_mask.py")
    generator_params = {k: v for k, v in jax.tree.map(np.asarray, params).items() if k != "region"}
    checkpoint.save(str(tmp_path / "generator"), generator_params, generator)
    trainer = Trainer.from_config(config)
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)["params"]
    with pytest.warns(UserWarning, match=r"has no region model \(\d+ leaves\)"):
        restored, _ = ckpt_lib.init_params(str(tmp_path / "generator"), abstract, model.init, jax.random.key(3))
    assert restored["vae"] == {} and set(restored) == set(params) | {"vae"}
    np.testing.assert_array_equal(restored["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
    assert jax.tree.structure(restored["region"]) == jax.tree.structure(params["region"])


def test_region_config_takes_the_generators_unet(tmp_path):
    """The region stages build the generator's UNet and mask encoder as its checkpoint has them
    (here GLIGEN's layer), so a generator of any configs/shapes_mask.py variant loads strictly."""
    from fireedit_jax import demo

    generator = load_config("configs/shapes_mask.py:gligen")
    generator.model.mask_encoder.channels = (16, 32)
    (tmp_path / "config.json").write_text(generator.to_json())
    config = demo.region_config("region", 3, str(tmp_path))
    assert config.model.unet.injection_layer == "self" and tuple(config.model.mask_encoder.channels) == (16, 32)
    assert config.seed == 3 and config.train.loss == "learnable_region"
    assert demo.region_config("region", 3).model.unet.injection_layer == "cross"
