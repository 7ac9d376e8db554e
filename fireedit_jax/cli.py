"""`fireedit-jax` command line: convert, edit, info, propose, eval, shapes, demo, serve.

On Linux with glibc the command re-executes itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1:
XLA:CPU allocates each step's buffers afresh, and with 4 KiB pages the kernel faults in every page
of them every step (90,000 faults per step of the demo, a quarter of its CPU time in the kernel);
transparent huge pages take that to about 400 and the demo's step from 0.44 to 0.37 s
(BENCHMARKS.md). FIREEDIT_JAX_HUGE_PAGES=0 turns this off.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(env) -> dict | None:
    """`env` with glibc's malloc asking for transparent huge pages (see the module docstring), or
    None where that does not apply: not glibc, already set, or FIREEDIT_JAX_HUGE_PAGES=0."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc.hugetlb" in tunables or env.get("FIREEDIT_JAX_HUGE_PAGES") == "0":
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def _convert_ip2p(args) -> int:
    from fireedit_jax.convert.ip2p import convert_ip2p

    errors = convert_ip2p(args.src, args.out, verify=args.verify)
    print(f"wrote {args.out}")
    for name, error in errors.items():
        print(f"  {name:14s} max |torch - flax| = {error:.3e}")
    return 0


def _convert_network(args) -> int:
    from fireedit_jax.convert.networks import convert_network

    error = convert_network(args.family, args.src, args.out, verify=args.verify)
    print(f"wrote {args.out}")
    if error is not None:
        print(f"  {args.family:14s} max |torch - flax| = {error:.3e}")
    return 0


def _convert_fireedit(args) -> int:
    from fireedit_jax.convert.fireedit import convert_fireedit

    errors = convert_fireedit(
        args.ip2p, args.llm, args.dinov2, args.clip_vision, args.out, groma=args.groma, verify=args.verify,
        use_regions=not args.no_regions, use_tati=not args.no_tati, use_hvca=not args.no_hvca,
    )  # fmt: skip
    print(f"wrote {args.out}")
    for name, error in errors.items():
        print(f"  {name:14s} max |torch - flax| = {error:.3e}")
    return 0


def _read_boxes(path: str, count: int) -> list:
    """A JSONL file with one {"boxes": [[x1, y1, x2, y2], ...]} line per image (normalised xyxy)."""
    import json

    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if len(lines) != count:
        raise ValueError(f"{path!r} has box lines for {len(lines)} images, but {count} image(s) are edited")
    if not all(isinstance(line, dict) and "boxes" in line for line in lines):
        raise ValueError(f'{path!r}: each line must be {{"boxes": [[x1, y1, x2, y2], ...]}} (normalised xyxy)')
    return [line["boxes"] for line in lines]


def _info(args) -> int:
    import jax

    from fireedit_jax import checkpoint
    from fireedit_jax.models.fireedit import EditModel, trainable_counts
    from fireedit_jax.train import masks, stages

    config = checkpoint.load_config(args.checkpoint)
    model = EditModel.from_config(config.model)
    tree = jax.eval_shape(model.init, jax.random.key(0))
    print(f"checkpoint {args.checkpoint}: conditioner {config.model.conditioner}")
    for name, count in trainable_counts(tree).items():
        print(f"  {name:14s} {count:>15,d} params")
    print(f"  {'total':14s} {masks.count_params(tree):>15,d} params")
    if model.conditioner == "vlm":
        for stage in stages.STAGES:
            mask = masks.trainable_mask(tree, stages.trainable_patterns(stage))
            print(f"  stage {stage} trains {masks.count_params(tree, mask):>15,d} params")
    return 0


def _propose(args) -> int:
    from fireedit_jax.data.proposals import run

    return run(args)


def _shapes(args) -> int:
    from fireedit_jax.data.shapes import run

    return run(args)


def _demo(args) -> int:
    from fireedit_jax.demo import run_demo, run_region_demo

    out = args.out or ("outputs/demo" if args.method == "grounded" else f"outputs/demo_{args.method}")
    common = dict(fresh=args.fresh, steps=args.steps, batch_size=args.batch_size, samples=args.samples,
                  edit_steps=args.edit_steps, guidance=(args.image_guidance, args.text_guidance), seed=args.seed)
    if args.method == "region":
        run_region_demo(out, generator=args.generator, **common)
    else:
        if args.generator:
            raise ValueError("--generator is for --method region")
        run_demo(out, method=args.method, **common)
    return 0


def _edit_settings(args):
    from fireedit_jax.eval.batch_edit import EditSettings

    return EditSettings(steps=args.steps, image_guidance=args.image_guidance, text_guidance=args.text_guidance,
                        seed=args.seed, scheduler=args.scheduler)


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and the sampling options, shared by edit and eval."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps (default 100)")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="s_I (default 1.5)")
    parser.add_argument("--text-guidance", type=float, default=7.5, help="s_T (default 7.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=("ddim", "euler_ancestral"), default=None,
                        help="sampler (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--proposer", default=None,
                        help="Deformable DETR directory: propose FireEdit's region boxes offline")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")  # fmt: skip


def _edit(args) -> int:
    import numpy as np
    from PIL import Image

    from fireedit_jax import images, storage
    from fireedit_jax.pipeline import Editor

    instructions = args.instruction or []
    if args.jsonl and instructions:
        raise ValueError("--jsonl files carry their own instructions: drop --instruction")
    if args.images and len(instructions) != 1:
        raise ValueError("--images takes one --instruction for the whole folder (use --jsonl for one per image)")
    if args.image and not instructions:
        raise ValueError("--image needs --instruction (repeat it to edit in several turns)")
    if args.image and len(instructions) == 1 and os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a folder: give the output image's file name, e.g. {args.out}/edited.png")
    if args.boxes and not (args.image and len(instructions) == 1):
        raise ValueError('--boxes is for one single-turn edit; a --jsonl line takes its own "boxes"')
    batch = bool(args.images or args.jsonl)
    # One mask or box is one image's region: over a folder or a JSONL of other images (other sizes, other
    # scenes) it would mark the wrong place in all but one, so a batch takes a region per line instead.
    if batch and args.mask == "auto":
        raise ValueError("--mask auto (DiffEdit) is for one --image: batch edits take a region per --jsonl line, "
                         "--mask-from CKPT or the checkpoint's own region head")  # fmt: skip
    if batch and (args.mask or args.mask_box):
        raise ValueError('--mask / --mask-box are one --image\'s region: a --jsonl line takes its own "mask" (a file) '
                         'or "mask_box", and --mask-from CKPT predicts the region of every image')  # fmt: skip
    if args.image and len(instructions) > 1 and (args.mask or args.mask_box or args.mask_from):
        raise ValueError("--mask / --mask-box / --mask-from are for a single-turn edit: give one --instruction")
    if not (args.image and len(instructions) == 1) and (args.mask_crop is not None or args.save_mask):
        raise ValueError("--mask-crop and --save-mask are for one single-turn edit of --image (batch and multi-turn "
                         "edits are made at each image's working size and write no masks)")  # fmt: skip
    if args.mask_from and args.whole_image:
        raise ValueError("--mask-from predicts the region to edit and --whole-image edits without one: give one")
    editor = Editor.from_pretrained(args.checkpoint, dtype=args.dtype)
    mask_from = Editor.from_pretrained(args.mask_from, dtype=args.dtype) if args.mask_from else None
    if batch:
        from fireedit_jax.eval.batch_edit import edit_folder, edit_jsonl

        common = dict(settings=_edit_settings(args), batch_size=args.batch_size, overwrite=args.overwrite,
                      proposer=args.proposer, whole_image=args.whole_image, mask_from=mask_from,
                      mask_dilation=args.mask_dilate, mask_feather=args.mask_feather)  # fmt: skip
        if args.jsonl:
            result = edit_jsonl(editor, args.jsonl, args.out, **common)
        else:
            result = edit_folder(editor, args.images, instructions[0], args.out, **common)
        kept = f", kept {len(result.existing)} already there" if result.existing else ""
        print(f"wrote {len(result.written)} images to {args.out}{kept}")
        for image, reason in result.failed:
            print(f"fireedit-jax edit: skipped {image}: {reason}", file=sys.stderr)
        return 1 if result.failed else 0
    if len(instructions) > 1:
        from fireedit_jax.eval.batch_edit import edit_turns

        for path in edit_turns(editor, args.image, instructions, args.out, settings=_edit_settings(args),
                               proposer=args.proposer):
            print(f"wrote {path}")
        return 0
    boxes = None
    if args.boxes:
        boxes = _read_boxes(args.boxes, 1)[0]
    elif args.proposer:
        from fireedit_jax.data.proposals import propose

        boxes = propose(args.proposer, [args.image])[0]
    mask_box = _parse_box(args.mask_box) if args.mask_box else None
    (region,) = editor.find_regions([args.image], instructions, boxes=[boxes], masks=[args.mask], mask_boxes=[mask_box],
                                    mask_from=mask_from, whole_image=args.whole_image, method=args.method,
                                    seed=args.seed)  # fmt: skip
    if args.save_mask:
        if region is None:
            raise ValueError("--save-mask writes the edit's region, and this edit has none (the whole image is "
                             "edited: a checkpoint without a region head, --whole-image or --method ip2p/fireedit)")  # fmt: skip
        storage.save_image(Image.fromarray(region.astype(np.uint8) * 255), args.save_mask)
        print(f"wrote the edit's region to {args.save_mask}")
    if region is not None and not region.any():  # nothing to edit (warned): the source as it is
        storage.save_image(images.load_image(args.image), args.out)
        print(f"wrote {args.out} (unchanged)")
        return 0
    out = editor.edit(
        args.image, instructions[0], steps=args.steps, image_guidance=args.image_guidance,
        text_guidance=args.text_guidance, seed=args.seed, scheduler=args.scheduler, boxes=boxes,
        mask=region, whole_image=region is None, mask_dilation=args.mask_dilate, mask_feather=args.mask_feather,
        mask_crop=args.mask_crop,
        method="mask" if region is not None else None,
    )  # fmt: skip
    storage.save_image(out, args.out)
    print(f"wrote {args.out}")
    return 0


def _eval(args) -> int:
    from fireedit_jax.eval.benchmarks import markdown, run_emu, run_magicbrush
    from fireedit_jax.eval.scorer import Scorer
    from fireedit_jax.pipeline import Editor

    scorer = Scorer.from_paths(clip=args.clip, dino=args.dino, lpips_trunk=args.lpips_trunk,
                               lpips_heads=args.lpips_heads, lpips_net=args.lpips_net,
                               clip_preprocess=args.clip_preprocess)  # fmt: skip
    editor = Editor.from_pretrained(args.checkpoint, dtype=args.dtype)
    common = dict(scorer=scorer, split=args.split, limit=args.limit, batch_size=args.batch_size,
                  settings=_edit_settings(args), proposer=args.proposer, grid_size=args.grid)
    if args.benchmark == "magicbrush":
        summary = run_magicbrush(editor, args.data, args.out, turns=args.turns, captions=args.captions,
                                 masks=args.masks, mask_dilation=args.mask_dilate, mask_feather=args.mask_feather,
                                 **common)  # fmt: skip
    else:
        summary = run_emu(editor, args.data, args.out, **common)
    print(markdown(summary))
    print(f"wrote {args.out}: summary.json, summary.md, grid.png, results.jsonl, images/")
    return 0


def _parse_box(text: str) -> list[float]:
    """"x0,y0,x1,y1" → four floats (ValueError naming the text otherwise)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--mask-box {text!r}: expected four comma-separated numbers x0,y0,x1,y1 (normalised)")
    return values


def _edit_parser(commands) -> None:
    edit = commands.add_parser("edit", help="edit an image, a folder, a JSONL of edits, or one image in turns")
    source = edit.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input image file")
    source.add_argument("--images", metavar="DIR", help="edit every image in DIR with --instruction → OUT/<stem>.png")
    source.add_argument("--jsonl", metavar="FILE",
                        help='one {"image": path, "instruction": text} per line (optional "output" stem, '
                             '"boxes", and "mask" (a file) or "mask_box" to edit in) → OUT/<stem>.png')  # fmt: skip
    edit.add_argument("--instruction", action="append",
                      help='e.g. "make the left cup blue"; repeat it to edit --image in turns, each turn '
                           "editing the previous output (→ OUT/<stem>_turn<k>.png)")  # fmt: skip
    edit.add_argument("--out", required=True,
                      help="output image file; a folder with --images, --jsonl or several --instruction")  # fmt: skip
    _add_generation_arguments(edit)
    edit.add_argument("--boxes", default=None,
                      help='JSONL, one line {"boxes": [[x1, y1, x2, y2], ...]} (normalised) for the image')
    edit.add_argument("--method", choices=("ip2p", "fireedit", "mask", "region"), default=None,
                      help="the edit method (default: the checkpoint's own); a method the checkpoint cannot serve "
                           "is refused with the ones it can")  # fmt: skip
    edit.add_argument("--mask", default=None, metavar="PNG|auto",
                      help="where to edit: a mask image (white, or transparent, where to edit; resized with a "
                           "warning if its size differs), or 'auto': DiffEdit's mask from the checkpoint's own "
                           "predictions with and without the instruction. Outside it the image is kept exactly. "
                           "Default: a checkpoint with a region head predicts the region, any other edits the "
                           "whole image")  # fmt: skip
    edit.add_argument("--mask-box", default=None, metavar="X0,Y0,X1,Y1",
                      help="the region to edit as a normalised box, instead of --mask")
    edit.add_argument("--mask-from", default=None, metavar="CKPT",
                      help="a checkpoint with a region head (a region model, or FireEdit's grounding): its predicted "
                           "region is the edit's, e.g. for a FireEdit or InstructPix2Pix --checkpoint (with --images / "
                           "--jsonl: of every image without a region of its own)")  # fmt: skip
    edit.add_argument("--whole-image", action="store_true",
                      help="edit the whole image, even with a checkpoint that predicts regions")
    edit.add_argument("--mask-crop", type=int, default=None, metavar="PX",
                      help="edit a crop around the region, grown by PX pixels on each side, at the model's working "
                           "size, and paste it back (a small region of a large image edited in detail; default: "
                           "the whole image at the working size, so the model sees the whole scene)")  # fmt: skip
    edit.add_argument("--save-mask", default=None, metavar="PNG",
                      help="write the edit's region (given or predicted; white = edited)")
    _add_mask_softening(edit)
    edit.add_argument("--batch-size", type=int, default=None,
                      help="edits per batch with --images/--jsonl, rounded up to a multiple of the local "
                           "devices (default: one per device)")  # fmt: skip
    edit.add_argument("--overwrite", action="store_true",
                      help="redo outputs that exist (--images/--jsonl keep them by default: a re-run resumes)")
    edit.set_defaults(run=_edit)


def _add_mask_softening(parser) -> None:
    parser.add_argument("--mask-dilate", type=int, default=0, help="grow the mask by this many pixels (default 0)")
    parser.add_argument("--mask-feather", type=float, default=0.0,
                        help="soft mask edges: fade the blend out over this many pixels around the mask (default 0)")


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="run a benchmark: edit, score, summarise (re-running resumes)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True)
    magicbrush = benchmarks.add_parser("magicbrush", help="MagicBrush: its test release, or osunlp/MagicBrush parquet")
    emu = benchmarks.add_parser("emu", help="Emu Edit: facebook/emu_edit_test_set parquet")
    for bench in (magicbrush, emu):
        _add_generation_arguments(bench)
        bench.add_argument("--data", required=True, help="the data set's directory")
        bench.add_argument("--out", required=True,
                           help="run directory: images/, results.jsonl, summary.json, summary.md, grid.png")
        bench.add_argument("--split", default="test",
                           help="<split>-*.parquet files, or MagicBrush's <split>/ release folder (default test)")
        bench.add_argument("--limit", type=int, default=None,
                           help="only the first N edit sessions (MagicBrush) or rows (Emu Edit)")
        bench.add_argument("--batch-size", type=int, default=None,
                           help="edits per batch, rounded up to a multiple of the local devices (default: one each)")
        bench.add_argument("--clip", metavar="DIR", default=None,
                           help="transformers CLIPModel directory with its tokenizer, for CLIP-I, CLIP-T and "
                                "CLIP-dir (MagicBrush used ViT-B/32)")  # fmt: skip
        bench.add_argument("--clip-preprocess", choices=("clip", "ip2p"), default="clip",
                           help="OpenAI CLIP's resize + centre crop (MagicBrush), or InstructPix2Pix's plain resize")
        bench.add_argument("--dino", metavar="PATH", default=None,
                           help="transformers ViTModel directory or DINO .pth, for the DINO score "
                                "(MagicBrush used dino_vits16)")  # fmt: skip
        bench.add_argument("--lpips-trunk", metavar="FILE", default=None,
                           help="torchvision state dict of the LPIPS trunk (e.g. alexnet-owt-7be5be79.pth)")
        bench.add_argument("--lpips-heads", metavar="FILE", default=None,
                           help="LPIPS linear heads (default: the lpips package's weights/v0.1/<net>.pth)")
        bench.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex")
        bench.add_argument("--grid", type=int, default=8, help="rows of grid.png (default 8)")
        bench.set_defaults(run=_eval)
    magicbrush.add_argument("--turns", choices=("single", "multi", "both"), default="both",
                            help="single: every turn from the ground-truth input (all_turn); multi: each turn "
                                 "edits the previous output (final_turn); both (default)")  # fmt: skip
    magicbrush.add_argument("--captions", choices=("local", "global"), default="local",
                            help="caption file for CLIP-T (the paper: local; image_eval.py's default: global)")
    magicbrush.add_argument("--masks", action="store_true",
                            help="edit under each turn's annotated mask (masked sampling; the mask method)")
    _add_mask_softening(magicbrush)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fireedit-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert PyTorch weights into a checkpoint directory")
    families = convert.add_subparsers(dest="family", required=True)
    ip2p = families.add_parser("ip2p", aliases=["sd"], help="a diffusers InstructPix2Pix directory (or Stable Diffusion: "
                               "a 9-channel inpainting UNet, or a 4-channel one edited by masked sampling)")
    ip2p.add_argument("--src", required=True, help="directory with unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    ip2p.add_argument("--out", required=True, help="checkpoint directory to write")
    ip2p.add_argument("--verify", action="store_true", help="run torch and ours on random inputs; print the max error")
    ip2p.set_defaults(run=_convert_ip2p)
    from fireedit_jax.convert.networks import NETWORKS

    for name in NETWORKS:
        network = families.add_parser(name, help=f"one {name} network (transformers / diffusers directory)")
        network.add_argument("--src", required=True, help="directory with config.json and the weights")
        network.add_argument("--out", required=True, help="directory to write (config.json + params/)")
        network.add_argument("--verify", action="store_true", help="run torch and ours on random inputs")
        network.set_defaults(run=_convert_network)
    fire = families.add_parser("fireedit", help="assemble an initial FireEdit checkpoint from pretrained parts")
    fire.add_argument("--ip2p", required=True, help="diffusers InstructPix2Pix directory (UNet, VAE, CLIP text)")
    fire.add_argument("--llm", required=True, help="LLaMA / Vicuna / LLaVA directory with its tokenizer")
    fire.add_argument("--dinov2", required=True, help="transformers Dinov2Model directory")
    fire.add_argument("--clip-vision", required=True, help="transformers CLIPVisionModel / CLIPModel directory")
    fire.add_argument("--groma", default=None, help="Groma weights for the region encoder (else initialised)")
    fire.add_argument("--out", required=True, help="checkpoint directory to write")
    fire.add_argument("--verify", action="store_true", help="run torch and ours on random inputs; print the max error")
    for module in ("regions", "tati", "hvca"):
        fire.add_argument(f"--no-{module}", action="store_true", help=f"build without {module} (ablation)")
    fire.set_defaults(run=_convert_fireedit)

    _edit_parser(commands)
    _eval_parser(commands)

    info = commands.add_parser("info", help="describe a checkpoint: networks and parameter counts")
    info.add_argument("--checkpoint", required=True)
    info.set_defaults(run=_info)

    from fireedit_jax.data.proposals import add_arguments as propose_arguments  # torch loads lazily

    propose = commands.add_parser("propose", help="region proposals from an offline Deformable DETR")
    propose_arguments(propose)
    propose.set_defaults(run=_propose)

    from fireedit_jax.data.shapes import add_arguments as shapes_arguments

    shapes = commands.add_parser("shapes", help="write the synthetic ShapeEdit set (folder + JSONL) and its tokenizer")
    shapes_arguments(shapes)
    shapes.set_defaults(run=_shapes)

    from fireedit_jax.data import latent_cache

    cache = commands.add_parser("cache-latents", help="precompute the VAE latents of a data set (ArrayRecord)")
    latent_cache.add_arguments(cache)
    cache.set_defaults(run=latent_cache.run)

    from fireedit_jax.train import run as train_run

    train_run.register(commands)  # train, export

    from fireedit_jax.train import plan

    plan_parser = commands.add_parser("plan", help="per-device memory of the train step (no weights allocated)")
    plan.add_arguments(plan_parser)
    plan_parser.set_defaults(run=plan.run)

    from fireedit_jax.demo import GUIDANCE, METHOD_STEPS, STEPS  # numpy and PIL only

    demo = commands.add_parser("demo", help="the end-to-end demo (writes outputs/demo/)")
    demo.add_argument("--method", choices=("grounded", "fireedit", "mask", "region"), default="grounded",
                      help="grounded: configs/shapes_grounded.py's mask-guided editor with a region model, edited "
                           "where it finds the region itself (the default); fireedit: configs/shapes.py's FireEdit "
                           "(the whole image); mask: configs/shapes_mask.py's mask-guided editor, edited under the "
                           "exact masks; region: learnt edit regions (configs/shapes_region.py: a mask-guided "
                           "generator, then CLIP and the region model on captions alone)")  # fmt: skip
    demo.add_argument("--out", default=None,
                      help="output directory (default outputs/demo, or outputs/demo_<method> for the others)")
    demo.add_argument("--generator", default=None, metavar="CKPT",
                      help="--method region: an exported mask-guided checkpoint to use as the generator (e.g. "
                           "outputs/demo_mask/checkpoint) instead of training one")  # fmt: skip
    demo.add_argument("--fresh", action="store_true", help="retrain from scratch instead of reusing OUT/train")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"training steps (default {METHOD_STEPS['grounded']} for grounded, {STEPS} for the others)")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0, help="the run's seed: init, data order, noise (default 0)")
    demo.add_argument("--samples", type=int, default=64, help="test scenes edited and scored")
    demo.add_argument("--edit-steps", type=int, default=20, help="denoising steps per edit")
    demo.add_argument("--image-guidance", type=float, default=GUIDANCE[0], help=f"s_I (default {GUIDANCE[0]})")
    demo.add_argument("--text-guidance", type=float, default=GUIDANCE[1], help=f"s_T (default {GUIDANCE[1]})")
    demo.set_defaults(run=_demo)

    from fireedit_jax import serve  # gradio loads lazily

    serve_parser = commands.add_parser("serve", help="a web page over one checkpoint (Gradio; the `ui` extra)")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fireedit_jax.checkpoint import CheckpointError
    from fireedit_jax.convert.core import ConversionError
    from fireedit_jax.images import ImageError

    try:
        return args.run(args)
    except (CheckpointError, ConversionError, ImageError, FileNotFoundError, ValueError) as err:
        print(f"fireedit-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


def run_command() -> int:
    """The `fireedit-jax` program: re-executed once with huge pages (module docstring), then `main`."""
    env = with_huge_pages(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "fireedit_jax.cli", *sys.argv[1:]], env)
    return main()


if __name__ == "__main__":
    sys.exit(run_command())
