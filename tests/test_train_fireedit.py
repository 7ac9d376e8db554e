"""FireEdit's train step on configs/tiny_fireedit.py: stages 1–3, per-task loss weights, the
VLM template from token ids, and one sharded run.

Batches go through the real data path: ShapeEdit scenes as EditRecords → EditTransform
(the VLM template from the ids its text fields tokenise) → collate. One parameter
initialisation (the stage-1 model: the stage-2/3 model + the CLIP text encoder) serves
every stage; stages 2 and 3 start from it without the text encoder.
"""

import dataclasses
import importlib.util
import io
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from fireedit_jax import cli
from fireedit_jax.data import shapes
from fireedit_jax.data.records import EditRecord, Task
from fireedit_jax.data.tokenizer import add_new_tokens
from fireedit_jax.data.transforms import EditTransform
from fireedit_jax.data.vlm_inputs import build_vlm_inputs
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.train import inputs, losses, masks
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
LENGTH_BUCKETS = (96,)  # one bucket: the VQA and edit batches share one compiled step
DIFFUSION_ONLY = ("unet", "qformer", "tati", "hvca")  # stages 2, 3: trained by L_diff alone


def tiny_config(stage: int):
    spec = importlib.util.spec_from_file_location("configs_tiny_fireedit", os.path.join(ROOT, "configs", "tiny_fireedit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(stage))


def single_device_mesh():
    return mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def records(task: Task = Task.EDIT, n: int = BATCH) -> list[EditRecord]:
    """ShapeEdit scenes (32 px) as records: edits, VQA samples (answer: the edited object's
    colour) or, for stage 1, with a caption."""
    out = []
    for i in range(n):
        scene = shapes.generate(shapes.ShapesConfig(size=32), "train", i)
        out.append(EditRecord(
            key=f"shapes#{i}", source_image=_png(scene["source"]), instruction=scene["instruction"],
            target_image=None if task == Task.VQA else _png(scene["target"]), boxes=scene["boxes"],
            answer=scene["colour"] if task == Task.VQA else None, task=task,
            target_caption=f"a {scene['colour']} object",
        ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tokenizers():
    tokenizer = shapes.build_tokenizer()
    ids = add_new_tokens(tokenizer, len(tokenizer))
    return tokenizer, ids


def make_transform(tokenizers, stage: int) -> EditTransform:
    """The training run's transform (train/inputs.py) for the tiny config of `stage`."""
    config = tiny_config(stage)
    config.data.length_buckets = LENGTH_BUCKETS
    config.data.clip_tokenizer = "builtin:clip_chars"  # stage 1's captions for the tiny CLIP text encoder
    return inputs.make_transform(config, EditModel.from_config(config.model), tokenizers[0])


def loss_batch(transform: EditTransform, recs, stage: int) -> dict:
    """The pipeline's batch → the entries the stage's loss reads, images as float32 in [-1, 1]."""
    batch = transform.collate([transform(r)[0] for r in recs])
    return inputs.model_batch(batch, losses.FIREEDIT_INPUTS[stage])


def test_vlm_template_from_ids_equals_template_from_strings(tokenizers):
    """The training path (TextField ids → VLMTemplate in collate) gives build_vlm_inputs' batch (strings)."""
    tokenizer, ids = tokenizers
    transform = make_transform(tokenizers, 3)
    assert transform.vlm.num_image_tokens == 4  # 32 px, 8-px patches, 2 × 2 merge
    mixed = records(Task.EDIT, 3) + records(Task.VQA, 2)
    mixed[1] = dataclasses.replace(mixed[1], boxes=None)  # no boxes at all
    batch = transform.collate([transform(r)[0] for r in mixed])
    counts = [0 if r.boxes is None else len(r.boxes) for r in mixed]
    want = build_vlm_inputs(
        tokenizer, ids, [r.instruction for r in mixed], counts, num_image_tokens=transform.vlm.num_image_tokens,
        answers=[r.answer for r in mixed], length_buckets=LENGTH_BUCKETS, box_buckets=transform.box_buckets,
    )  # fmt: skip
    np.testing.assert_array_equal(batch["vlm_input_ids"], want.input_ids)
    np.testing.assert_array_equal(batch["vlm_attention_mask"], want.attention_mask)
    np.testing.assert_array_equal(batch["vlm_target_mask"], want.target_mask)
    np.testing.assert_array_equal(batch["box_mask"], want.box_mask)
    assert (batch["vlm_input_ids"] == ids.region).sum(1).tolist() == counts
    targets = [row[mask].tolist() for row, mask in zip(batch["vlm_input_ids"], batch["vlm_target_mask"])]
    assert targets[:3] == [list(ids.img)] * 3
    assert targets[3] == tokenizer(mixed[3].answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    np.testing.assert_array_equal(batch["diffusion_weight"], [1, 1, 1, 0, 0])

    # stage 1: a caption, no image block, no region slots
    captions = make_transform(tokenizers, 1)
    captioned = records(Task.EDIT, 2)
    batch = captions.collate([captions(r)[0] for r in captioned])
    want = build_vlm_inputs(tokenizer, ids, [r.target_caption for r in captioned], [0, 0], num_image_tokens=0,
                            length_buckets=LENGTH_BUCKETS)  # fmt: skip
    np.testing.assert_array_equal(batch["vlm_input_ids"], want.input_ids)
    assert not np.isin(batch["vlm_input_ids"], [ids.image, ids.region, ids.im_start, ids.im_end]).any()
    assert batch["clip_ids"].shape == (2, 77)


@pytest.fixture(scope="module")
def initial_params():
    """Random host params of the stage-1 model's shapes (stages 2, 3 drop its "text_encoder"),
    `EditModel.draw_params`: compiling the jitted `model.init` of every FireEdit network takes
    minutes on this CPU (sharded init is tested in test_sharding.py); the steps tested here do
    not depend on the initialisers."""
    return EditModel.from_config(tiny_config(1).model).draw_params()


@pytest.fixture(scope="module")
def batches(tokenizers):
    out = {}
    for stage in (1, 2, 3):
        transform = make_transform(tokenizers, stage)
        edits = loss_batch(transform, records(Task.EDIT), stage)
        out[stage] = [edits] * 3 if stage == 1 else [loss_batch(transform, records(Task.VQA), stage), edits, edits]
    return out


def run_stage(stage: int, initial_params, batches, mesh) -> dict:
    """Three steps of `stage` (stages 2, 3: a VQA-only batch, then two edit batches) on `mesh`;
    stage 2 weighs L_VLM by 0.5 (train.vlm_weight)."""
    config = tiny_config(stage)
    if stage == 2:
        config.train.vlm_weight = 0.5
    trainer = Trainer.from_config(config, mesh=mesh)
    params = dict(initial_params)
    if stage > 1:
        del params["text_encoder"]
    state = trainer.init_state(params=params)
    history, metrics = [], []
    for batch in batches[stage]:
        state, step_metrics = trainer.step(state, trainer.shard_batch(batch))
        history.append(jax.device_get(state["params"]))
        metrics.append(jax.device_get(step_metrics))
    assert trainer.step._cache_size() == 1  # the VQA and edit batches share the buckets: one compilation
    return dict(trainer=trainer, before=params, history=history, metrics=metrics)


@pytest.fixture(scope="module")
def single_device_runs(initial_params, batches):
    cache = {}
    return lambda stage: cache.setdefault(stage, run_stage(stage, initial_params, batches, single_device_mesh()))


def _flat(tree) -> dict:
    return {masks._path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _info_counts(config, directory, capsys) -> dict[int, int]:
    """{stage: trainable count} as `fireedit-jax info` prints them for this config."""
    (directory / "config.json").write_text(config.to_json())
    capsys.readouterr()
    assert cli.main(["info", "--checkpoint", str(directory)]) == 0
    found = re.findall(r"stage (\d) trains\s+([\d,]+) params", capsys.readouterr().out)
    return {int(stage): int(count.replace(",", "")) for stage, count in found}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_steps_train_exactly_the_stage_leaves(stage, single_device_runs, tmp_path, capsys):
    run = single_device_runs(stage)
    trainer = run["trainer"]
    assert trainer.trainable_count() == _info_counts(trainer.config, tmp_path, capsys)[stage]
    parts = {"vlm": 1.0, "align": 1.0} if stage == 1 else {"vlm": trainer.config.train.vlm_weight, "diffusion": 1.0}
    for metrics in run["metrics"]:
        assert np.isfinite([metrics[k] for k in ("loss", "grad_norm", *parts)]).all() and metrics["skipped"] == 0
        assert metrics["loss"] == pytest.approx(sum(w * metrics[k] for k, w in parts.items()), rel=1e-5)
    mask, before, after = _flat(trainer.mask), _flat(run["before"]), _flat(run["history"][-1])
    assert before.keys() == after.keys() == mask.keys()
    frozen = [k for k, trained in mask.items() if not trained]
    # every trainable leaf moved but attention key biases (softmax ignores a shift common to all keys: no gradient)...
    unchanged = [k for k, trained in mask.items() if trained and np.array_equal(before[k], after[k])]
    assert frozen and all(k.endswith("key/bias") for k in unchanged), unchanged
    for key in frozen:  # ...and no frozen one did
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("stage", [2, 3])
def test_vqa_samples_give_no_diffusion_gradient(stage, single_device_runs):
    """Step 1 sees only VQA samples (diffusion_weight 0): L_diff is 0 and the leaves only
    L_diff trains (UNet, Q-Former, TATI, HVCA) stay bit-identical, while LoRA moves.
    The edit batches after it do move them (previous test)."""
    run = single_device_runs(stage)
    assert run["metrics"][0]["diffusion"] == 0.0 and run["metrics"][0]["vlm"] > 0
    assert run["metrics"][1]["diffusion"] > 0
    mask, before, after = _flat(run["trainer"].mask), _flat(run["before"]), _flat(run["history"][0])
    diffusion_only = [k for k in mask if mask[k] and k.split("/")[0] in DIFFUSION_ONLY]
    assert diffusion_only
    for key in diffusion_only:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    lora_b = [k for k in mask if mask[k] and k.endswith("lora_b")]
    assert lora_b and all(not np.array_equal(after[k], before[k]) for k in lora_b)


def test_sharded_stage3_equals_single_device(initial_params, batches, single_device_runs):
    """Mesh data=2 × fsdp=2 × tensor=2: losses after each of the 3 steps equal the single-device
    run's (rtol 1e-5, atol 1e-6); params too: all but a few elements of each leaf to 1e-5, and every
    element within how far two runs of 3 Adam steps can drift apart (below)."""
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharded = run_stage(3, initial_params, batches, mesh)
    single = single_device_runs(3)
    for got, want in zip(sharded["metrics"], single["metrics"]):
        np.testing.assert_allclose([got["loss"], got["vlm"], got["diffusion"]],
                                   [want["loss"], want["vlm"], want["diffusion"]], rtol=1e-5, atol=1e-6)  # fmt: skip
    # No tight elementwise tolerance holds on every machine: where an element's gradient is near zero, the
    # summation order of the sharded reductions decides its sign and size, and Adam's m̂/√v̂ turns that into a
    # step of up to the learning rate (measured after 3 steps: 1 of 9,216 UNet conv weights 1.25e-6 apart and 1
    # of 18,432 LLaMA weights 6.7e-6 on one machine, 1.7e-5 on another of the same kind). What does hold:
    # every element within twice the farthest 3 Adam steps move it (|m̂/√v̂| ≤ 1.004 for t ≤ 3 at β 0.9 / 0.999:
    # 2 · 3 · 1.004 · lr, lr 1e-4), and all but a handful (≤ max(2, 0.1 %)) of each leaf's elements within
    # 1e-5, a tenth of one step: a wrong update (a missing all-reduce, a wrong shard) moves most of a leaf by ~lr.
    reach = 2 * len(sharded["history"]) * 1.004 * float(tiny_config(3).train.learning_rate)
    got, want = _flat(sharded["history"][-1]), _flat(single["history"][-1])
    for key, value in want.items():
        apart = np.abs(np.asarray(got[key], np.float64) - np.asarray(value, np.float64))
        assert apart.max() <= reach, (key, float(apart.max()), reach)
        off = int(np.sum(apart > 1e-5 + 1e-5 * np.abs(value)))
        assert off <= max(2, value.size // 1000), (key, off, value.size, float(apart.max()))
