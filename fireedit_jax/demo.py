"""`fireedit-jax demo`: a tiny FireEdit trained from scratch on ShapeEdit, judged against exact targets.

No pretrained weights can be downloaded here, so the demo trains every component of a tiny
FireEdit (configs/shapes.py: VLM with regions, Q-Former, TATI, HVCA, decoupled UNet over
a fixed pixel-unshuffle autoencoder) on the synthetic ShapeEdit set (data/shapes.py), then
edits the test split and scores the edits with eval/shapes_metrics.py against

  trained      the model just trained
  untrained    the same model at its initialisation (what training added)
  copy_input   the source image unchanged (perfect preservation, no edit)

OUT (default outputs/demo):
  train/        the training run (Orbax checkpoints, metrics.jsonl; `fireedit-jax train`'s workdir)
  checkpoint/   the exported inference checkpoint: `fireedit-jax edit --checkpoint OUT/checkpoint`
  edits.png     rows: input · instruction · output · target (test samples)
  metrics.json  per model: overall, per edit kind and per referring type; the run's figures

A re-run resumes / reuses OUT/train (training only continues up to --steps) unless --fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time

import numpy as np
from PIL import Image, ImageDraw

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG, MASK_CONFIG = os.path.join(CONFIGS, "shapes.py"), os.path.join(CONFIGS, "shapes_mask.py")
# `fireedit-jax demo --method M` trains this variant; "mask*" variants are configs/shapes_mask.py's
METHOD_VARIANTS = {"fireedit": "full", "mask": "mask"}
MODELS = ("trained", "untrained", "copy_input")
ROWS_SHOWN = 8
ZOOM = 4  # edits.png shows the 32 px images at 128 px
# (s_I, s_T) of the demo's edits: the paper's 1.5 / 7.5 amplify every difference between the
# branches of a model trained from scratch into halos (L1 outside the box 0.028 against 0.010)
GUIDANCE = (1.0, 3.0)
STEPS = 1500  # training steps of 16 (about 8-14 minutes on a 2-core CPU)


def use_compilation_cache(out_dir: str) -> None:
    """Caches compilations in OUT/jax_cache unless a cache is set: a re-run loads its step and edit loop."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, "jax_cache"))


def config_spec(variant: str) -> str:
    """A demo / ablation variant → FILE:ARG: configs/shapes.py's variants, and configs/shapes_mask.py's
    as "mask" (its default), "mask_blend", "mask_fireedit"."""
    if variant.startswith("mask"):
        return f"{MASK_CONFIG}:{variant.removeprefix('mask').removeprefix('_') or 'mask'}"
    return f"{CONFIG}:{variant}"


def demo_config(steps: int, batch_size: int, variant: str = "full", seed: int = 0):
    """configs/shapes.py or configs/shapes_mask.py (`config_spec(variant)`) with the demo's budget."""
    from fireedit_jax.train.run import load_config

    config = load_config(config_spec(variant))
    config.train.steps, config.train.batch_size, config.seed = steps, batch_size, seed
    config.checkpoint.every = max(steps // 4, 1)
    return config


def test_samples(config, count: int, split: str = "test") -> list[dict]:
    """The first `count` ShapeEdit samples of `split` drawn as the config's eval source draws them."""
    from fireedit_jax.data.shapes import ShapeEditSource, ShapesConfig

    fields = {k: v for k, v in config.data.eval.items() if k not in ("kind", "split", "num_samples")}
    source = ShapeEditSource(split, max(count, 1), ShapesConfig(**fields))
    return [source[i] for i in range(count)]


def masked(config) -> bool:
    """Whether the config's model edits under the samples' exact masks (trained with mask_edit)."""
    return config.train.loss == "mask_edit"


def edit_samples(editor, samples, *, steps: int, batch_size: int, guidance: tuple[float, float] = GUIDANCE,
                 seed: int = 0, desc: str = "editing") -> np.ndarray:  # fmt: skip
    """uint8[N, S, S, 3]: the editor's outputs for the samples' sources, instructions and boxes (and
    their exact edit masks, for a mask-guided checkpoint); guidance: (s_I, s_T)."""
    from tqdm.auto import tqdm

    outputs = []
    batches = range(0, len(samples), batch_size)
    with tqdm(total=len(batches) * steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for start in batches:
            chunk = samples[start : start + batch_size]
            pixels = np.stack([s["source"] for s in chunk]).astype(np.float32) / 127.5 - 1.0
            boxes = [s["boxes"] for s in chunk] if editor.model.conditioner == "vlm" else None
            masks = np.stack([s["mask"] for s in chunk]).astype(np.float32) if masked(editor.config) else None
            edited = editor.edit_arrays(pixels, [s["instruction"] for s in chunk], boxes=boxes, masks=masks, steps=steps,
                                        image_guidance=guidance[0], text_guidance=guidance[1], seed=seed,
                                        progress=lambda _: bar.update(1))  # fmt: skip
            outputs.append(np.clip((np.asarray(edited) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8))
    return np.concatenate(outputs)


def score(outputs, samples) -> dict:
    from fireedit_jax.eval import shapes_metrics

    targets = np.stack([s["target"] for s in samples])
    return shapes_metrics.summarize(shapes_metrics.evaluate(outputs, targets, samples))


def untrained_params(config):
    """The run's parameters at step 0 (its init compiled as in training: the compilation cache serves it)."""
    from fireedit_jax.train.step import Trainer

    return Trainer.from_config(config).init_state()["params"]


def edits_grid(samples, outputs, rows: int = ROWS_SHOWN, zoom: int = ZOOM) -> Image.Image:
    """input · instruction · output · target, one sample per row."""
    rows = min(rows, len(samples))
    side = samples[0]["source"].shape[0] * zoom
    text_width, pad = side * 3 // 2, 4  # 28 characters of PIL's default font
    grid = Image.new("RGB", (3 * side + text_width + 4 * pad, rows * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    up = lambda a: Image.fromarray(a).resize((side, side), Image.NEAREST)  # noqa: E731
    for r in range(rows):
        y = pad + r * (side + pad)
        grid.paste(up(samples[r]["source"]), (pad, y))
        draw.multiline_text((2 * pad + side, y + side // 3), textwrap.fill(samples[r]["instruction"], 28), fill="black")
        grid.paste(up(outputs[r]), (3 * pad + side + text_width, y))
        grid.paste(up(samples[r]["target"]), (4 * pad + 2 * side + text_width, y))
    return grid


def table(results: dict) -> str:
    """The console table per model (test split): edit success, success with every other object kept,
    other objects kept, L1, L2, preservation L1."""
    lines = [f"{'model':12s} {'edit success':>12s} {'specific':>8s} {'kept':>6s} {'L1':>7s} {'L2':>7s} "
             f"{'L1 outside box':>15s}"]
    for name, summary in results.items():
        o = summary["overall"]
        lines.append(f"{name:12s} {o['success']:12.3f} {o['specific']:8.3f} {o['kept']:6.3f} {o['l1']:7.4f} "
                     f"{o['l2']:7.4f} {o['l1_outside']:15.4f}")
    return "\n".join(lines)


def run_demo(
    out_dir: str = "outputs/demo",
    *,
    fresh: bool = False,
    steps: int = STEPS,
    batch_size: int = 16,
    samples: int = 64,
    edit_steps: int = 20,
    guidance: tuple[float, float] = GUIDANCE,
    seed: int = 0,
    method: str = "fireedit",
) -> dict:
    """Trains (or reuses) the demo model of `method` (METHOD_VARIANTS), edits `samples` test scenes,
    writes OUT; returns metrics.json's content."""
    from fireedit_jax.pipeline import Editor
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import train_and_evaluate

    if fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    use_compilation_cache(out_dir)
    workdir, export_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "checkpoint")
    config = demo_config(steps, batch_size, METHOD_VARIANTS[method], seed=seed)
    what = "a tiny FireEdit" if method == "fireedit" else "a tiny mask-guided editor (PromptEditDiff)"
    told = " under their exact masks" if masked(config) else ""
    print(f"fireedit-jax demo: {what} trained from scratch on ShapeEdit ({steps} steps of {batch_size}),")
    print(f"then {samples} test edits{told} scored against exact targets. Output: {out_dir}/")
    found = ckpt_lib.find_training_checkpoint(workdir) if os.path.isdir(workdir) else None
    if found is not None:
        print(f"  reusing the training run in {workdir} (step {found[1]}; pass --fresh to retrain)")
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    train_seconds = time.perf_counter() - start
    ckpt_lib.export(workdir, export_dir)
    editor = Editor.from_pretrained(export_dir)

    tests = test_samples(config, samples)
    edit = dict(steps=edit_steps, batch_size=batch_size, guidance=guidance)
    outputs = {"trained": edit_samples(editor, tests, **edit, desc="editing (trained)")}
    editor.params = untrained_params(config)
    outputs["untrained"] = edit_samples(editor, tests, **edit, desc="editing (untrained)")
    outputs["copy_input"] = np.stack([s["source"] for s in tests])
    results = {name: score(outputs[name], tests) for name in MODELS}

    edits_grid(tests, outputs["trained"]).save(os.path.join(out_dir, "edits.png"))
    summary = {
        "split": "test", "samples": samples, "edit_steps": edit_steps, "guidance": list(guidance),
        "train_steps": result.step,
        "batch_size": batch_size, "train_seconds_this_run": round(train_seconds, 1),
        "final_train_metrics": result.metrics, "checkpoint": export_dir, "models": results,
    }  # fmt: skip
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table(results))
    settings = f"--steps {edit_steps} --image-guidance {guidance[0]} --text-guidance {guidance[1]}"
    print(f"wrote {out_dir}/edits.png and {out_dir}/metrics.json; edit with\n"
          f"  fireedit-jax edit --checkpoint {export_dir} {settings} --image IMAGE --instruction 'make the red circle blue'\n"
          f"or in a web page:\n  fireedit-jax serve --checkpoint {export_dir} {settings}")  # fmt: skip
    return summary
