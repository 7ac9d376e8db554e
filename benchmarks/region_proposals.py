"""Where a grounded checkpoint's region head looks with and without proposal boxes (test scenes).

    .venv/bin/python benchmarks/region_proposals.py [--checkpoint outputs/demo/checkpoint] [--samples 64]

The demo's evaluation hands the region model the scene's object boxes as proposals; a user of the
web page or `edit` gives none unless they click or pass boxes (or run `fireedit-jax propose`). Prints
the predicted region's bounding-box IoU with the edit's box, its area and how often it is empty, both ways.
"""

import argparse

import numpy as np
from PIL import Image

from fireedit_jax.data import shapes
from fireedit_jax.eval import shapes_metrics
from fireedit_jax.pipeline import Editor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/demo/checkpoint")
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    editor = Editor.from_pretrained(args.checkpoint)
    samples = [shapes.generate(shapes.ShapesConfig(size=32), "test", i) for i in range(args.samples)]
    scenes = [Image.fromarray(s["source"]) for s in samples]
    instructions = [s["instruction"] for s in samples]
    for name, boxes in (("object boxes as proposals", [s["boxes"] for s in samples]),
                        ("no proposals", [None] * len(samples))):  # fmt: skip
        regions = np.stack(editor.find_regions(scenes, instructions, boxes=boxes))
        iou = shapes_metrics.bounding_box_iou(regions, samples)
        empty = np.mean([not region.any() for region in regions])
        print(f"{name}: box IoU {iou.mean():.3f}, region area {regions.mean():.3f}, empty {empty:.3f}")


if __name__ == "__main__":
    main()
