"""The training run (train/run.py) and its checkpoints (train/checkpoints.py).

The subprocess runs of tests/train_runs.py (`runs`: full, killed and resumed, SIGTERMed);
then in this process: a checkpoint saved on a 2×2×2 mesh restored on 8×1×1 and on one
device, export → Editor, a half-written checkpoint, the event files.
"""

import glob
import os
import shutil

import flax
import jax
import numpy as np
import pytest
from PIL import Image
from train_runs import ROOT, STEPS, logged, read_events

from fireedit_jax.pipeline import Editor, load_tokenizer
from fireedit_jax.train import checkpoints as ckpt_lib
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train import run
from fireedit_jax.train.step import Trainer


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(runs):
    full = {line["step"]: line["loss"] for line in logged(runs["full"][0])}
    assert sorted(full) == list(range(1, STEPS + 1))
    workdir, logged_before = runs["killed"]
    lines = logged(workdir)
    before, after = lines[:logged_before], lines[logged_before:]
    assert after, "the resumed run logged nothing"
    assert after[0]["step"] > 1, "the resumed run did not start from a checkpoint"
    assert after[-1]["step"] == STEPS
    assert before[-1]["step"] < STEPS, "the run finished before it was killed"
    for line in before + after:  # exact equality, step for step
        assert line["loss"] == full[line["step"]], line["step"]


def test_sigterm_saves_a_final_checkpoint_and_exits_0(runs):
    workdir, returncode, out = runs["sigterm"]
    assert returncode == 0, out
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    last = logged(workdir)[-1]["step"]
    assert steps == [last] and last < STEPS  # only the preemption checkpoint (every=100)
    assert "stopped for preemption" in out


def test_event_files_hold_the_scalars_and_the_sample_grid(runs):
    workdir, _ = runs["full"]
    events = read_events(os.path.join(workdir, "tensorboard"))
    for tag in ("loss", "diffusion", "learning_rate", "grad_norm", "param_norm", "update_norm",
                "step_time", "examples_per_second", "data/read/shapes"):  # fmt: skip
        assert tag in events, sorted(events)
    assert [step for step, _ in events["loss"]] == list(range(1, STEPS + 1))
    by_step = {line["step"]: line for line in logged(workdir)}
    for step, value in events["loss"]:
        assert value == pytest.approx(by_step[step]["loss"], rel=1e-6)
    assert events["data/read/shapes"][-1] == (STEPS, 8.0 * STEPS)
    assert "tflops_per_device" in events
    assert events["<images>"] == [(STEPS, "samples")]
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_0000008.png")))
    assert grid.shape == (2 * 16, 3 * 16, 3)  # 2 examples × (source | edit | target)


@pytest.fixture(scope="module")
def tiny():
    config = run.run_defaults(run.load_config(os.path.join(ROOT, "configs", "tiny.py")))
    config.resolution = 16
    return config


def test_half_written_checkpoint_is_skipped_with_a_warning(runs, tiny, tmp_path):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(runs["full"][0], "checkpoints"), directory)
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    assert steps[-1] == STEPS and len(steps) == 3  # keep = 3
    # the newest: its params data files truncated to half; and an unfinished temporary save
    for path in glob.glob(os.path.join(directory, str(STEPS), "params", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 1000:
            os.truncate(path, os.path.getsize(path) // 2)
    shutil.copytree(os.path.join(directory, str(steps[0])), os.path.join(directory, f"{STEPS + 2}.orbax-checkpoint-tmp-1"))
    trainer = Trainer.from_config(tiny, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    checkpoints = ckpt_lib.Checkpoints(directory)
    with pytest.warns(UserWarning, match=f"checkpoint .*/{STEPS} cannot be restored"):
        restored = checkpoints.restore_latest(abstract)
    checkpoints.close()
    assert restored.step == steps[-2] and int(restored.state["step"]) == steps[-2]
    assert restored.data_state is not None and restored.config.train.steps == STEPS
    assert os.path.isdir(os.path.join(directory, f"{STEPS}.broken"))


def test_export_edits_like_the_merged_training_weights(runs, tiny, tmp_path):
    workdir, _ = runs["full"]
    out = str(tmp_path / "export")
    step = ckpt_lib.export(workdir, out)
    assert step == STEPS
    assert sorted(os.listdir(out)) == ["config.json", "params", "tokenizer"]  # no optimizer state
    exported = Editor.from_pretrained(out)
    # the reference: the training checkpoint's own params with the EMA's trained leaves
    trainer = Trainer.from_config(tiny, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    restored = checkpoints.restore(STEPS, abstract)
    checkpoints.close()
    merged = ckpt_lib.ema_params(restored.state["params"], restored.state["ema"])
    tokenizer = load_tokenizer(restored.tokenizer_dir)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    instructions = ["make the red circle blue", "remove the square"]
    got = np.asarray(exported.edit_arrays(pixels, instructions, steps=3, seed=1))
    assert exported.tokenizer.get_vocab() == tokenizer.get_vocab()
    exported.params = merged  # the same compiled edit, with the training checkpoint's weights
    want = np.asarray(exported.edit_arrays(pixels, instructions, steps=3, seed=1))
    np.testing.assert_array_equal(got, want)
    unet_ema = restored.state["ema"]["unet"]["conv_in"]["kernel"]
    assert not np.array_equal(unet_ema, restored.state["params"]["unet"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(exported.params["unet"]["conv_in"]["kernel"], unet_ema)


def test_checkpoint_moves_between_meshes(runs, tiny, tmp_path):
    """A checkpoint saved on 2×2×2 restores on 8×1×1 and on one device; the next step's loss agrees.

    The step programs are test_sharding.py's (same config and batch shapes): with its
    entries in the persistent compilation cache nothing compiles here.
    """
    config = tiny.copy_and_resolve_references()
    rng = np.random.default_rng(0)
    batches = [{"source": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                "target": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                "input_ids": rng.integers(0, 514, (8, 77)).astype(np.int32)} for _ in range(2)]  # fmt: skip

    def trainer_on(shape, grad_accum):
        config.train.grad_accum = grad_accum  # 2 on 2×2×2: micro-batches of 4, one row per (data, fsdp) device
        mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), jax.devices()[: int(np.prod(shape))])
        trainer = Trainer.from_config(config, mesh=mesh)
        return trainer, ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)

    trainer, abstract = trainer_on((2, 2, 2), 2)
    full = ckpt_lib.Checkpoints(os.path.join(runs["full"][0], "checkpoints"), read_only=True)
    state = full.restore(STEPS, abstract).state  # the one-device run's checkpoint, onto 2×2×2
    full.close()
    state, _ = trainer.step(state, trainer.shard_batch(batches[0]))
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    checkpoints.save(STEPS + 1, state, config=config, force=True)
    checkpoints.wait()
    _, metrics = trainer.step(state, trainer.shard_batch(batches[1]))
    want = float(metrics["loss"])
    for shape in ((8, 1, 1), (1, 1, 1)):
        other, abstract = trainer_on(shape, 1)
        restored = checkpoints.restore(STEPS + 1, abstract)
        leaf = restored.state["params"]["unet"]["conv_in"]["kernel"]
        assert leaf.sharding.mesh.devices.shape == shape and int(restored.state["step"]) == STEPS + 1
        _, metrics = other.step(restored.state, other.shard_batch(batches[1]))
        assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), shape
    checkpoints.close()


def test_export_merges_lora_into_the_kernels(tmp_path):
    """A FireEdit training checkpoint (random weights, LoRA on the LLM) → export: no adapter
    leaves, W + (α/r)·A·B in their place, lora_rank 0 in the config, and Editor loads it."""
    from fireedit_jax.data.shapes import build_tokenizer
    from fireedit_jax.models.fireedit import EditModel

    config = run.run_defaults(run.load_config(os.path.join(ROOT, "configs", "tiny_fireedit.py")))
    model = EditModel.from_config(config.model)
    rng = np.random.default_rng(0)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    state = {"step": np.int32(5), "skipped": np.int32(0), "consecutive_skips": np.int32(0), "params": params,
             "opt_state": {}}  # fmt: skip
    tokenizer_dir = str(tmp_path / "tokenizer")
    build_tokenizer().save_pretrained(tokenizer_dir)
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "run" / "checkpoints"))
    checkpoints.save(5, state, config=config, tokenizer_dir=tokenizer_dir, force=True)
    checkpoints.close()
    out = str(tmp_path / "export")
    assert ckpt_lib.export(str(tmp_path / "run"), out) == 5
    editor = Editor.from_pretrained(out)
    assert editor.config.model.llm.lora_rank == 0
    q_proj = params["vlm"]["llm"]["layers"]["q_proj"]
    merged = editor.params["vlm"]["llm"]["layers"]["q_proj"]
    assert set(merged) == {"kernel"} and {"lora_a", "lora_b"} <= set(q_proj)
    scale = config.model.llm.lora_alpha / config.model.llm.lora_rank
    want = q_proj["kernel"] + scale * np.einsum("lir,lro->lio", q_proj["lora_a"], q_proj["lora_b"])
    np.testing.assert_allclose(merged["kernel"], want, rtol=1e-5, atol=1e-5)
