"""`fireedit-jax` command line: convert, edit, info, propose, demo."""

from __future__ import annotations

import argparse
import sys


def _convert_ip2p(args) -> int:
    from fireedit_jax.convert.ip2p import convert_ip2p

    errors = convert_ip2p(args.src, args.out, verify=args.verify)
    print(f"wrote {args.out}")
    for name, error in errors.items():
        print(f"  {name:14s} max |torch - flax| = {error:.3e}")
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
    return [line["boxes"] for line in lines]


def _edit(args) -> int:
    import os

    from fireedit_jax.pipeline import Editor

    editor = Editor.from_pretrained(args.checkpoint, dtype=args.dtype)
    boxes = None
    if args.boxes:
        boxes = _read_boxes(args.boxes, 1)[0]
    elif args.proposer:
        from fireedit_jax.data.proposals import propose

        boxes = propose(args.proposer, [args.image])[0]
    out = editor.edit(
        args.image, args.instruction, steps=args.steps, image_guidance=args.image_guidance,
        text_guidance=args.text_guidance, seed=args.seed, scheduler=args.scheduler, boxes=boxes,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out.save(args.out)
    print(f"wrote {args.out}")
    return 0


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


def _demo(args) -> int:
    from fireedit_jax.demo import run_demo

    run_demo(args.out, fresh=args.fresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fireedit-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert PyTorch weights into a checkpoint directory")
    families = convert.add_subparsers(dest="family", required=True)
    ip2p = families.add_parser("ip2p", help="a diffusers InstructPix2Pix directory")
    ip2p.add_argument("--src", required=True, help="directory with unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    ip2p.add_argument("--out", required=True, help="checkpoint directory to write")
    ip2p.add_argument("--verify", action="store_true", help="run torch and ours on random inputs; print the max error")
    ip2p.set_defaults(run=_convert_ip2p)
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

    edit = commands.add_parser("edit", help="edit an image with an instruction")
    edit.add_argument("--checkpoint", required=True, help="checkpoint directory")
    edit.add_argument("--image", required=True, help="input image file")
    edit.add_argument("--instruction", required=True, help='e.g. "make the left cup blue"')
    edit.add_argument("--out", required=True, help="output image file")
    edit.add_argument("--steps", type=int, default=100, help="denoising steps (default 100)")
    edit.add_argument("--image-guidance", type=float, default=1.5, help="s_I (default 1.5)")
    edit.add_argument("--text-guidance", type=float, default=7.5, help="s_T (default 7.5)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--scheduler", choices=("ddim", "euler_ancestral"), default=None,
                      help="sampler (default: the checkpoint's)")  # fmt: skip
    edit.add_argument("--boxes", default=None,
                      help='JSONL, one line {"boxes": [[x1, y1, x2, y2], ...]} (normalised) for the image')
    edit.add_argument("--proposer", default=None, help="Deformable DETR directory: propose boxes offline")
    edit.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")  # fmt: skip
    edit.set_defaults(run=_edit)

    info = commands.add_parser("info", help="describe a checkpoint: networks and parameter counts")
    info.add_argument("--checkpoint", required=True)
    info.set_defaults(run=_info)

    from fireedit_jax.data.proposals import add_arguments as propose_arguments  # torch loads lazily

    propose = commands.add_parser("propose", help="region proposals from an offline Deformable DETR")
    propose_arguments(propose)
    propose.set_defaults(run=_propose)

    demo = commands.add_parser("demo", help="the end-to-end demo (writes outputs/demo/)")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--fresh", action="store_true", help="rebuild everything instead of reusing outputs")
    demo.set_defaults(run=_demo)
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


if __name__ == "__main__":
    sys.exit(main())
