"""`fireedit-jax demo`: the convert → edit path end to end on a tiny random model.

No pretrained weights can be downloaded here, so the demo builds a tiny random
InstructPix2Pix pipeline in diffusers' format, converts it exactly as a user would
convert a real one, verifies the conversion against torch, and edits an image.
The edit is NOT meaningful (the weights are random); the figures are the point.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw


def demo_image(size: int = 96) -> Image.Image:
    """A small scene: two cups on a table."""
    image = Image.new("RGB", (size, size), (200, 190, 170))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 2 // 3, size, size], fill=(120, 80, 50))
    draw.rectangle([size // 8, size // 3, size * 3 // 8, size * 2 // 3], fill=(220, 40, 40))
    draw.rectangle([size * 5 // 8, size // 3, size * 7 // 8, size * 2 // 3], fill=(40, 160, 60))
    return image


def run_demo(out_dir: str = "outputs/demo", *, fresh: bool = False, steps: int = 20) -> dict:
    from fireedit_jax.convert import reference
    from fireedit_jax.convert.ip2p import convert_ip2p
    from fireedit_jax.pipeline import Editor

    os.makedirs(out_dir, exist_ok=True)
    src, ckpt = os.path.join(out_dir, "random_ip2p_diffusers"), os.path.join(out_dir, "checkpoint")
    print("fireedit-jax demo: a tiny RANDOM InstructPix2Pix model (no weights can be downloaded here);")
    print("it exercises convert → edit end to end, the edit itself is not meaningful.")
    errors = {}
    if fresh or not os.path.exists(os.path.join(ckpt, "config.json")):
        reference.save_ip2p(src)
        errors = convert_ip2p(src, ckpt, verify=True)
        for name, error in errors.items():
            print(f"  converted {name:14s} max |torch - flax| = {error:.2e}")
    else:
        print(f"  reusing {ckpt} (pass --fresh to rebuild)")
    editor = Editor.from_pretrained(ckpt)
    image = demo_image()
    image.save(os.path.join(out_dir, "input.png"))
    start = time.perf_counter()
    edited = editor.edit(image, "make the left cup blue", steps=steps, seed=0)
    seconds = time.perf_counter() - start
    edited.save(os.path.join(out_dir, "edited.png"))
    side_by_side = Image.new("RGB", (image.width * 2, image.height))
    side_by_side.paste(image, (0, 0))
    side_by_side.paste(edited, (image.width, 0))
    side_by_side.save(os.path.join(out_dir, "edits.png"))
    summary = {
        "instruction": "make the left cup blue",
        "steps": steps,
        "seconds_first_edit_including_compile": round(seconds, 2),
        "conversion_max_abs_error": errors,
        "output_mean_abs_change": float(np.abs(np.asarray(edited, np.float32) - np.asarray(image, np.float32)).mean()),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"  edited in {seconds:.1f} s (incl. compilation); wrote {out_dir}/edits.png and metrics.json")
    return summary
