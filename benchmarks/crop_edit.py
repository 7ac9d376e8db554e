"""The crop edit against the whole-image edit of a large image: time in one run, and the picture.

    .venv/bin/python benchmarks/crop_edit.py [--checkpoint CKPT] [--size 512] [--padding 96] [--steps 20]
    .venv/bin/python benchmarks/crop_edit.py --checkpoint outputs/crop_mask/checkpoint --picture docs/crop_edit.png

A ShapeEdit test scene drawn at --size px (a "large" image for a 32 px model) is edited under its
exact edit mask two ways, in turn (so load from other processes falls on both):
  whole   `Editor.edit(mask=...)`: the whole scene resized to the working size, edited, resized back
          and composited under the mask
  crop    `Editor.edit(mask=..., mask_crop=PADDING)`: the crop around the mask, grown by PADDING px,
          edited at the working size and pasted back
Each is the whole edit (resize, encode, denoise, decode, composite; every program compiled before
timing). --checkpoint: a mask-guided checkpoint (default: configs/shapes_mask.py with random
weights, which costs what a trained one does). Prints the medians and the ratio crop / whole.
--picture PATH also writes source | mask | whole-image edit | crop edit, with the crop's region
enlarged below each (meaningful with a trained checkpoint: `fireedit-jax demo --method mask` writes
one; docs/crop_edit.png's is what `demo --method mask --steps 800` trains, see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from timing import interleaved, report

from fireedit_jax import demo, images
from fireedit_jax.data import shapes
from fireedit_jax.pipeline import Editor


def random_editor() -> Editor:
    """configs/shapes_mask.py's model with random weights (`EditModel.draw_params`)."""
    from fireedit_jax.models.fireedit import EditModel
    from fireedit_jax.train.inputs import make_tokenizer
    from fireedit_jax.train.run import load_config

    config = load_config("configs/shapes_mask.py")
    model = EditModel.from_config(config.model)
    return Editor(model, model.draw_params(), config, make_tokenizer(config.data.tokenizer))


def scene(size: int, index: int, kinds: tuple[str, ...]) -> dict:
    """ShapeEdit test sample `index` drawn at `size` px (source, mask, instruction, …)."""
    return shapes.generate(shapes.ShapesConfig(size=size, kinds=kinds), "test", index)


def picture(sample: dict, outputs: dict[str, Image.Image], crop_box, path: str) -> None:
    """Source | mask | each output in a row, the crop's box drawn on the source; below each, the crop's
    region enlarged to the tile's size (nearest)."""
    source = Image.fromarray(sample["source"])
    mask = Image.fromarray(sample["mask"].astype(np.uint8) * 255).convert("RGB")
    tiles = [("source (crop box)", source.copy()), ("mask", mask), *outputs.items()]
    ImageDraw.Draw(tiles[0][1]).rectangle([crop_box[0], crop_box[1], crop_box[2] - 1, crop_box[3] - 1],
                                          outline=(255, 255, 0), width=3)  # fmt: skip
    side, label = source.width, 40
    sheet = Image.new("RGB", (side * len(tiles), 2 * side + label), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=24)
    for i, (name, tile) in enumerate(tiles):
        draw.text((i * side + 8, 6), name, fill="black", font=font)
        sheet.paste(tile, (i * side, label))
        zoom = (tile if i else source).crop(crop_box)
        scale = side / max(zoom.size)
        zoom = zoom.resize((round(zoom.width * scale), round(zoom.height * scale)), Image.NEAREST)
        sheet.paste(zoom, (i * side + (side - zoom.width) // 2, label + side + (side - zoom.height) // 2))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a mask-guided checkpoint (default: random weights)")
    parser.add_argument("--size", type=int, default=512, help="the scene's side in pixels (default 512)")
    parser.add_argument("--padding", type=int, default=96, help="--mask-crop's padding in pixels (default 96)")
    parser.add_argument("--index", type=int, default=4, help="the ShapeEdit test sample (default 4)")
    parser.add_argument("--kinds", default="colour", help="edit kinds drawn, comma-separated (default colour)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", default=None, metavar="PNG", help="also write the picture of both edits")
    args = parser.parse_args()

    editor = Editor.from_pretrained(args.checkpoint) if args.checkpoint else random_editor()
    sample = scene(args.size, args.index, tuple(args.kinds.split(",")))
    source, region, instruction = Image.fromarray(sample["source"]), sample["mask"], sample["instruction"]
    edit = dict(steps=args.steps, image_guidance=demo.GUIDANCE[0], text_guidance=demo.GUIDANCE[1], seed=args.seed,
                mask=region, progress=False)  # fmt: skip
    outputs = {}

    def run(name, **extra):
        def fn():
            outputs[name] = editor.edit(source, instruction, **edit, **extra)

        return fn

    results = interleaved({"crop": run("crop", mask_crop=args.padding), "whole": run("whole")}, args.repeats, warmup=1)
    x0, y0, x1, y1 = images.crop_region(region, args.padding)
    whole_size, crop_size = editor.working_size(*source.size), editor.working_size(x1 - x0, y1 - y0)
    print(f"$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"{args.checkpoint or 'configs/shapes_mask.py, random weights'}: ShapeEdit test scene {args.index} at "
          f"{args.size} px, {instruction!r}; region {region.mean():.1%} of the image; {args.steps} steps, float32, "
          f"CPU ({os.cpu_count()} cores), median of {args.repeats} whole edits")  # fmt: skip
    print(f"  whole: the {args.size} × {args.size} scene at the working size {whole_size[0]} × {whole_size[1]} "
          f"({args.size / whole_size[0]:.1f} image px per model px)")  # fmt: skip
    print(f"  crop:  the {x1 - x0} × {y1 - y0} crop (padding {args.padding}) at {crop_size[0]} × {crop_size[1]} "
          f"({(x1 - x0) / crop_size[0]:.1f} image px per model px)")  # fmt: skip
    report(results, "crop", "whole")
    if args.picture:
        picture(sample, {"whole-image edit": outputs["whole"], f"--mask-crop {args.padding}": outputs["crop"]},
                (x0, y0, x1, y1), args.picture)  # fmt: skip
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
