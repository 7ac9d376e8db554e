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
                (the same for the same seed on the same machine: no times in it)
  timings.json  the seconds each phase of this run took (also printed at the end)

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
GROUNDED_CONFIG = os.path.join(CONFIGS, "shapes_grounded.py")
# `fireedit-jax demo --method M` trains this variant; "mask*" variants are configs/shapes_mask.py's,
# "grounded*" configs/shapes_grounded.py's
METHOD_VARIANTS = {"grounded": "grounded", "fireedit": "full", "mask": "mask"}
MODELS = ("trained", "untrained", "copy_input")
ROWS_SHOWN = 8
ZOOM = 4  # edits.png shows the 32 px images at 128 px
# (s_I, s_T) of the demo's edits: the paper's 1.5 / 7.5 amplify every difference between the
# branches of a model trained from scratch into halos (L1 outside the box 0.028 against 0.010)
GUIDANCE = (1.0, 3.0)
STEPS = 1500  # training steps of 16 of the FireEdit and mask demos (about 8-14 minutes on a 2-core CPU)
# the grounded demo's: its step costs what the mask demo's does (~0.5 s here), and a fresh clone's
# demo must stay within 15 minutes on a machine a third slower than this one
METHOD_STEPS = {"grounded": 1000}


def prepare_out(out_dir: str, fresh: bool) -> None:
    """Creates OUT (emptied first if `fresh`) and caches the run's compilations there."""
    if fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    use_compilation_cache(out_dir)


def write_json(out_dir: str, name: str, content) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(content, f, indent=1)


def source_pixels(samples) -> np.ndarray:
    """float32[N, S, S, 3] in [-1, 1]: the samples' source scenes, as the editor reads them."""
    return np.stack([s["source"] for s in samples]).astype(np.float32) / 127.5 - 1.0


def use_compilation_cache(out_dir: str) -> None:
    """Caches compilations in OUT/jax_cache unless a cache is set: a re-run loads its step and edit loop."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, "jax_cache"))


def config_spec(variant: str) -> str:
    """A demo / ablation variant → FILE:ARG: configs/shapes.py's variants, configs/shapes_mask.py's as
    "mask" (its default), "mask_blend", "mask_fireedit", and configs/shapes_grounded.py's as "grounded"
    (its default), "grounded_exact", "grounded_fireedit", …."""
    for prefix, path, default in (("mask", MASK_CONFIG, "mask"), ("grounded", GROUNDED_CONFIG, "region")):
        if variant.startswith(prefix):
            return f"{path}:{variant.removeprefix(prefix).removeprefix('_') or default}"
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


def sample_boxes(samples) -> list[np.ndarray]:
    """The samples' region proposals (their objects' boxes), as the editor reads them."""
    return [s["boxes"] for s in samples]


def predicted_regions(editor, samples, batch_size: int) -> np.ndarray:
    """bool[N, S, S]: where the editor's region head would edit each sample (from its source, instruction
    and proposals)."""
    return np.concatenate([editor.region_mask_arrays(source_pixels(samples[i : i + batch_size]),
                                                     [s["instruction"] for s in samples[i : i + batch_size]],
                                                     sample_boxes(samples[i : i + batch_size]))
                           for i in range(0, len(samples), batch_size)])  # fmt: skip


def edit_samples(editor, samples, *, steps: int, batch_size: int, guidance: tuple[float, float] = GUIDANCE,
                 seed: int = 0, desc: str = "editing", masks: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """uint8[N, S, S, 3]: the editor's outputs for the samples' sources, instructions and boxes;
    guidance: (s_I, s_T). masks: bool[N, S, S] to edit under (default: the region head's predicted
    regions for a checkpoint with one, the samples' exact edit masks for a mask-guided checkpoint, none
    otherwise); an empty region leaves its sample's source as it is."""
    from tqdm.auto import tqdm

    if masks is None and editor.region_head:
        masks = predicted_regions(editor, samples, batch_size)
    elif masks is None and masked(editor.config):
        masks = np.stack([s["mask"] for s in samples])
    outputs = []
    batches = range(0, len(samples), batch_size)
    with tqdm(total=len(batches) * steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for start in batches:
            chunk = samples[start : start + batch_size]
            pixels = source_pixels(chunk)
            boxes = sample_boxes(chunk) if editor.model.conditioner == "vlm" else None
            chunk_masks = None if masks is None else masks[start : start + batch_size].astype(np.float32)
            edited = editor.edit_arrays(pixels, [s["instruction"] for s in chunk], boxes=boxes, masks=chunk_masks, steps=steps,
                                        image_guidance=guidance[0], text_guidance=guidance[1], seed=seed,
                                        progress=lambda _: bar.update(1))  # fmt: skip
            edited = np.clip((np.asarray(edited) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
            if chunk_masks is not None:  # nothing to edit: the source
                empty = ~chunk_masks.any(axis=(1, 2))
                edited[empty] = np.stack([s["source"] for s in chunk])[empty]
            outputs.append(edited)
    return np.concatenate(outputs)


def score(outputs, samples, regions: np.ndarray | None = None) -> dict:
    """eval/shapes_metrics.py's summary of the outputs; with the regions they were edited under (bool[N, S, S]),
    also "region": the IoU of each region's bounding box with the edit's box (overall and per kind) and
    how often the object it overlaps most is the edited one (colour, shape and remove edits)."""
    from fireedit_jax.eval import shapes_metrics

    targets = np.stack([s["target"] for s in samples])
    summary = shapes_metrics.summarize(shapes_metrics.evaluate(outputs, targets, samples))
    if regions is not None:
        summary["region"] = region_scores(regions, samples)
    return summary


def region_scores(regions: np.ndarray, samples) -> dict:
    """{"box_iou", "box_iou_by_kind", "referred_object", "area"} of predicted regions bool[N, S, S]."""
    from fireedit_jax.eval import shapes_metrics

    iou = shapes_metrics.bounding_box_iou(regions, samples)
    hits = [h for h in shapes_metrics.referred_object(regions, samples) if h is not None]
    kinds = sorted({s["kind"] for s in samples})
    return {"box_iou": float(np.mean(iou)),
            "box_iou_by_kind": {k: float(np.mean([v for v, s in zip(iou, samples) if s["kind"] == k])) for k in kinds},
            "referred_object": float(np.mean(hits)) if hits else None, "area": float(np.mean(regions))}  # fmt: skip


def untrained_params(config):
    """The run's parameters at step 0 as host arrays, as `Editor.from_pretrained` holds the trained
    ones: the edit program compiled for those serves these too (the init's compilation comes from the
    compilation cache)."""
    import jax

    from fireedit_jax.train.step import Trainer

    return jax.device_get(Trainer.from_config(config).init_state()["params"])


# Seconds of an edit pass per second of a train step, and of the edit program's compilation per
# second of the step's, both measured here (2-core CPU, the demo's sizes): the estimate's editing part.
EDIT_STEP_PER_TRAIN_STEP, EDIT_COMPILE_PER_TRAIN_COMPILE = 0.4, 0.25


class Clock:
    """The seconds each phase took, and the estimate printed once training's step time is known."""

    def __init__(self, train_steps: int, edit_steps: int, edit_passes: int = 2):
        self.start = time.perf_counter()
        self.train_steps, self.edit_steps, self.edit_passes = train_steps, edit_steps, edit_passes
        self.phases: dict[str, float] = {}
        self._mark = self.start
        self._estimated = False

    def phase(self, name: str) -> None:
        """Ends the phase `name` (it began where the previous one ended)."""
        now = time.perf_counter()
        self.phases[name] = round(now - self._mark, 1)
        self._mark = now

    def on_log(self, step: int, values: dict) -> None:
        """train_and_evaluate's hook: the first step time measured gives the estimate."""
        if self._estimated or "step_time" not in values:
            return
        self._estimated = True
        elapsed = time.perf_counter() - self.start
        training = (self.train_steps - step) * values["step_time"]
        compile_seconds = elapsed - step * values["step_time"]  # start-up and compilation so far
        editing = self.edit_passes * (self.edit_steps * EDIT_STEP_PER_TRAIN_STEP * values["step_time"]
                       + EDIT_COMPILE_PER_TRAIN_COMPILE * compile_seconds)  # fmt: skip
        total = elapsed + training + editing
        print(f"\n  estimate: about {total / 60:.0f} min in all ({elapsed:.0f} s so far, training "
              f"{training / 60:.1f} min more at {values['step_time']:.2f} s per step, editing ~{editing / 60:.1f} min)",
              flush=True)  # fmt: skip

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.phases.items())
        return f"took {total / 60:.1f} min ({total:.0f} s): {parts}"


def edits_grid(samples, outputs, regions: np.ndarray | None = None, rows: int = ROWS_SHOWN, zoom: int = ZOOM,
               ) -> Image.Image:  # fmt: skip
    """input · instruction · [the region edited (the input, dimmed outside it)] · output · target, a sample
    per row; the instruction's column is as wide as its longest wrapped line."""
    rows = min(rows, len(samples))
    side = samples[0]["source"].shape[0] * zoom
    pad = 4
    texts = [textwrap.fill(s["instruction"], 24) for s in samples[:rows]]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.multiline_textbbox((0, 0), t) for t in texts]
    text_width = max(b[2] for b in boxes) + 2 * pad
    pictures = 3 if regions is None else 4
    grid = Image.new("RGB", (pictures * side + text_width + (pictures + 1) * pad, rows * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    up = lambda a: Image.fromarray(a).resize((side, side), Image.NEAREST)  # noqa: E731
    for r in range(rows):
        y = pad + r * (side + pad)
        columns = [samples[r]["source"]]
        if regions is not None:
            dimmed = (samples[r]["source"] * 0.3 + 255 * 0.7).astype(np.uint8)
            columns.append(np.where(regions[r][..., None], samples[r]["source"], dimmed))
        columns += [outputs[r], samples[r]["target"]]
        x = pad
        for i, picture in enumerate(columns):
            grid.paste(up(picture), (x, y))
            x += side + pad
            if i == 0:
                draw.multiline_text((x + pad, y + (side - boxes[r][3]) // 2), texts[r], fill="black")
                x += text_width
    return grid


def table(results: dict) -> str:
    """The console table per model (test split): edit success, success with every other object kept,
    other objects kept, L1, L2, preservation L1; for a model that found its own regions, their bounding
    boxes' IoU with the edit's box and the share of edits on the right object."""
    lines = [f"{'model':12s} {'edit success':>12s} {'specific':>8s} {'kept':>6s} {'L1':>7s} {'L2':>7s} "
             f"{'L1 outside box':>15s} {'region IoU':>10s} {'right object':>12s}"]
    for name, summary in results.items():
        o, region = summary["overall"], summary.get("region")
        found = "" if region is None else f" {region['box_iou']:10.3f} {region['referred_object']:12.3f}"
        lines.append(f"{name:12s} {o['success']:12.3f} {o['specific']:8.3f} {o['kept']:6.3f} {o['l1']:7.4f} "
                     f"{o['l2']:7.4f} {o['l1_outside']:15.4f}{found}")
    return "\n".join(lines)


DESCRIPTIONS = {
    "grounded": "a tiny mask-guided editor with a region model that finds where to edit (grounded editing)",
    "fireedit": "a tiny FireEdit",
    "mask": "a tiny mask-guided editor (PromptEditDiff)",
}


def run_demo(
    out_dir: str = "outputs/demo",
    *,
    fresh: bool = False,
    steps: int | None = None,
    batch_size: int = 16,
    samples: int = 64,
    edit_steps: int = 20,
    guidance: tuple[float, float] = GUIDANCE,
    seed: int = 0,
    method: str = "grounded",
) -> dict:
    """Trains (or reuses) the demo model of `method` (METHOD_VARIANTS), edits `samples` test scenes,
    writes OUT; returns metrics.json's content. steps: training steps (None: the method's default,
    METHOD_STEPS or STEPS). A grounded model edits where its region head says (no mask given), and
    once more under the exact masks (what finding the region costs)."""
    from fireedit_jax.pipeline import Editor
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import train_and_evaluate

    steps = steps or METHOD_STEPS.get(method, STEPS)
    config = demo_config(steps, batch_size, METHOD_VARIANTS[method], seed=seed)
    grounded = config.train.loss == "grounded"
    passes = 3 if grounded else 2
    clock = Clock(steps, edit_steps * -(-samples // batch_size), passes)
    prepare_out(out_dir, fresh)
    workdir, export_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "checkpoint")
    told = (" under their exact masks" if masked(config) else
            " where the model finds the region itself (no mask given)" if grounded else "")  # fmt: skip
    print(f"fireedit-jax demo: {DESCRIPTIONS[method]},\ntrained from scratch on ShapeEdit ({steps} steps of {batch_size}, "
          f"seed {seed}), then {samples} test edits{told},\nscored against exact targets. Output: {out_dir}/")  # fmt: skip
    found = ckpt_lib.find_training_checkpoint(workdir) if os.path.isdir(workdir) else None
    if found is not None:
        print(f"  reusing the training run in {workdir} (step {found[1]}; pass --fresh to retrain)")
    clock.phase("start-up")
    result = train_and_evaluate(config, workdir, on_log=clock.on_log)
    clock.phase("training")
    ckpt_lib.export(workdir, export_dir)
    editor = Editor.from_pretrained(export_dir)
    clock.phase("export")

    tests = test_samples(config, samples)
    edit = dict(steps=edit_steps, batch_size=batch_size, guidance=guidance)
    regions = {"trained": predicted_regions(editor, tests, batch_size)} if grounded else {}
    outputs = {"trained": edit_samples(editor, tests, **edit, masks=regions.get("trained"), desc="editing (trained)")}
    clock.phase("editing (trained)")
    if grounded:
        regions["exact_mask"] = np.stack([s["mask"] for s in tests])
        outputs["exact_mask"] = edit_samples(editor, tests, **edit, masks=regions["exact_mask"],
                                             desc="editing (trained, exact masks)")  # fmt: skip
        clock.phase("editing (exact masks)")
    editor.params = untrained_params(config)
    if grounded:
        regions["untrained"] = predicted_regions(editor, tests, batch_size)
    outputs["untrained"] = edit_samples(editor, tests, **edit, masks=regions.get("untrained"), desc="editing (untrained)")
    clock.phase("editing (untrained)")
    outputs["copy_input"] = np.stack([s["source"] for s in tests])
    names = ("trained", "exact_mask", "untrained", "copy_input") if grounded else MODELS
    results = {name: score(outputs[name], tests, regions.get(name) if name != "exact_mask" else None)
               for name in names}  # fmt: skip

    edits_grid(tests, outputs["trained"], regions.get("trained")).save(os.path.join(out_dir, "edits.png"))
    timing_keys = ("step_time", "examples_per_second", "tflops_per_device")
    summary = {
        "split": "test", "samples": samples, "edit_steps": edit_steps, "guidance": list(guidance), "seed": seed,
        "method": method, "train_steps": result.step, "batch_size": batch_size,
        "final_train_metrics": {k: v for k, v in result.metrics.items() if k not in timing_keys},
        "checkpoint": export_dir, "models": results,
    }  # fmt: skip
    write_json(out_dir, "metrics.json", summary)
    clock.phase("scoring")
    timings = {"seconds": clock.phases, "final_train_metrics": {k: result.metrics[k] for k in timing_keys
                                                                if k in result.metrics}}  # fmt: skip
    write_json(out_dir, "timings.json", timings)
    print(table(results))
    print(f"the demo {clock.summary()}")
    settings = f"--steps {edit_steps} --image-guidance {guidance[0]} --text-guidance {guidance[1]}"
    shown = "input · instruction · the region it found · output · target" if grounded else "input · instruction · output · target"
    print(f"wrote {out_dir}/edits.png ({shown}) and {out_dir}/metrics.json; edit with\n"
          f"  fireedit-jax edit --checkpoint {export_dir} {settings} --image IMAGE --instruction 'make the red circle blue'\n"
          f"or in a web page:\n  fireedit-jax serve --checkpoint {export_dir} {settings}")  # fmt: skip
    return summary


REGION_CONFIG = os.path.join(CONFIGS, "shapes_region.py")
REGION_SPLITS = ("test", "heldout")


def region_config(variant: str, seed: int, generator: str | None = None):
    """configs/shapes_region.py's `variant` ("clip" for the CLIP stage) with the run's seed; with
    `generator` (an exported mask-guided checkpoint) its UNet and mask encoder as that checkpoint
    has them (e.g. configs/shapes_mask.py:gligen's gated self-attention)."""
    from fireedit_jax import checkpoint
    from fireedit_jax.train.run import load_config

    config = load_config(f"{REGION_CONFIG}:{variant}")
    config.seed = seed
    if generator is not None:
        trained = checkpoint.load_config(generator).model
        config.model.unet, config.model.mask_encoder = trained.unet, trained.get("mask_encoder")
    return config


def train_region_model(out_dir: str, *, generator: str, variant: str = "region", seed: int = 0,
                       clip_run: str | None = None) -> str:  # fmt: skip
    """The CLIP stage (in OUT/clip, unless `clip_run` gives one) then the region stage (OUT/train)
    from the exported mask-guided `generator`; exports OUT/checkpoint and returns it."""
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import train_and_evaluate

    if clip_run is None:
        clip_run = os.path.join(out_dir, "clip")
        print(f"CLIP on ShapeEdit's scene captions (contrastive) in {clip_run}")
        train_and_evaluate(region_config("clip", seed, generator), clip_run, init=generator)
    workdir, export_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "checkpoint")
    print(f"the region model ({variant}) on captions, generator and CLIP frozen, in {workdir}")
    train_and_evaluate(region_config(variant, seed, generator), workdir, init=clip_run)
    ckpt_lib.export(workdir, export_dir)
    return export_dir


def evaluate_regions(editor, config, count: int, *, steps: int, batch_size: int,
                     guidance: tuple[float, float] = GUIDANCE) -> dict:  # fmt: skip
    """Per split (REGION_SPLITS): the predicted regions' IoU with the edit boxes (all, by referring
    type, and "position/size": the references that need the scene's layout), and the mask-guided
    edits under the predicted and under the exact masks, scored (`score`)."""
    from fireedit_jax.eval import shapes_metrics

    results = {}
    for split in REGION_SPLITS:
        tests = test_samples(config, count, split)
        predicted = predicted_regions(editor, tests, batch_size)
        iou = shapes_metrics.region_iou(predicted, tests)
        by_refer = {r: float(np.mean([v for v, s in zip(iou, tests) if s["refer"] == r]))
                    for r in sorted({s["refer"] for s in tests})}  # fmt: skip
        layout = [v for v, s in zip(iou, tests) if s["refer"] in ("position", "size")]
        edit = dict(steps=steps, batch_size=batch_size, guidance=guidance)
        results[split] = {
            "iou": float(np.mean(iou)), "iou_position_size": float(np.mean(layout)) if layout else None,
            "iou_by_refer": by_refer, "region_area": float(np.mean(predicted)),
            "region_edit": score(edit_samples(editor, tests, masks=predicted, desc=f"editing ({split}, predicted)",
                                              **edit), tests),
            "exact_mask_edit": score(edit_samples(editor, tests, masks=np.stack([s["mask"] for s in tests]),
                                                  desc=f"editing ({split}, exact masks)", **edit), tests),
        }  # fmt: skip
    return results


def region_table(results: dict) -> str:
    lines = [f"{'split':8s} {'IoU':>6s} {'IoU pos/size':>12s} {'area':>6s} {'specific (predicted)':>21s} "
             f"{'specific (exact mask)':>22s}"]
    for split, r in results.items():
        layout = "–" if r["iou_position_size"] is None else f"{r['iou_position_size']:.3f}"
        lines.append(f"{split:8s} {r['iou']:6.3f} {layout:>12s} {r['region_area']:6.3f} "
                     f"{r['region_edit']['overall']['specific']:21.3f} {r['exact_mask_edit']['overall']['specific']:22.3f}")
    return "\n".join(lines)


def run_region_demo(
    out_dir: str = "outputs/demo_region",
    *,
    fresh: bool = False,
    steps: int | None = None,
    batch_size: int = 16,
    samples: int = 64,
    edit_steps: int = 20,
    guidance: tuple[float, float] = GUIDANCE,
    seed: int = 0,
    generator: str | None = None,
) -> dict:
    """Learnt edit regions (Beyond Editing Pairs) on ShapeEdit: the mask-guided generator (trained
    here as `--method mask` trains it, or `generator`, an exported one), the region's CLIP and the
    region model, trained on captions alone; then `evaluate_regions` on the test and held-out splits.
    Writes OUT/metrics.json, OUT/timings.json and OUT/regions.png (input · instruction · predicted
    region · edit); returns metrics.json's content."""
    from fireedit_jax.pipeline import Editor
    from fireedit_jax.train import checkpoints as ckpt_lib
    from fireedit_jax.train.run import train_and_evaluate

    steps = steps or STEPS
    clock = Clock(steps, 0)
    prepare_out(out_dir, fresh)
    print(f"fireedit-jax demo: learnt edit regions (Beyond Editing Pairs) on ShapeEdit, seed {seed}: a mask-guided\n"
          f"generator, then CLIP and the region model trained on captions alone. Output: {out_dir}/")  # fmt: skip
    if generator is None:
        generator = os.path.join(out_dir, "generator", "checkpoint")
        workdir = os.path.join(out_dir, "generator", "train")
        print(f"the mask-guided generator on edit pairs ({steps} steps of {batch_size}) in {workdir}")
        train_and_evaluate(demo_config(steps, batch_size, "mask", seed=seed), workdir)
        ckpt_lib.export(workdir, generator)
    clock.phase("generator")
    checkpoint = train_region_model(out_dir, generator=generator, seed=seed)
    clock.phase("region model")
    editor = Editor.from_pretrained(checkpoint)
    results = evaluate_regions(editor, editor.config, samples, steps=edit_steps, batch_size=batch_size,
                               guidance=guidance)  # fmt: skip
    clock.phase("editing")
    tests = test_samples(editor.config, ROWS_SHOWN)
    regions = predicted_regions(editor, tests, batch_size)
    edited = edit_samples(editor, tests, masks=regions, steps=edit_steps, batch_size=batch_size, guidance=guidance,
                          desc="editing (shown)")  # fmt: skip
    edits_grid(tests, edited, regions).save(os.path.join(out_dir, "regions.png"))
    summary = {"samples": samples, "edit_steps": edit_steps, "guidance": list(guidance), "seed": seed,
               "generator": generator, "checkpoint": checkpoint, "splits": results}  # fmt: skip
    write_json(out_dir, "metrics.json", summary)
    write_json(out_dir, "timings.json", {"seconds": clock.phases})
    print(region_table(results))
    print(f"wrote {out_dir}/regions.png (input · instruction · the predicted region · the edit under it · target) and "
          f"{out_dir}/metrics.json; the demo {clock.summary()}")
    return summary
