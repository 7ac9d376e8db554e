"""Seconds per FireEdit edit, split into conditioning (VLM + Q-Former + HVCA, once) and denoising (per step).

    .venv/bin/python benchmarks/fireedit_edit.py [--size 256] [--steps 20] [--repeats 3]

A reduced FireEdit (every module present: a 4-layer 512-wide LLaMA, a 6-layer 384-wide
DINOv2 and CLIP vision, the SD1.5-shaped quarter-width UNet, TATI, HVCA, regions) with
random weights, float32 on this CPU; medians after a warm-up (compile times printed apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fireedit_jax.convert.fireedit import bridge_configs
from fireedit_jax.convert.reference import EDIT_WORDS, word_tokenizer
from fireedit_jax.data.tokenizer import NEW_TOKENS, add_new_tokens
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.clip import CLIPVisionConfig
from fireedit_jax.models.dinov2 import DINOv2Config
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.llama import LlamaConfig
from fireedit_jax.models.unet_config import UNetConfig
from fireedit_jax.models.vae import VAEConfig
from fireedit_jax.pipeline import Editor


def reduced_config(vocab: int) -> ml_collections.ConfigDict:
    llm = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                      num_new_tokens=len(NEW_TOKENS))  # fmt: skip
    vision = DINOv2Config(hidden_size=384, num_layers=6, num_heads=6, image_size=224)
    clip_vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6)
    unet = UNetConfig.sd15(block_out_channels=(80, 160, 320, 320), norm_num_groups=16, decoupled=True)
    vae = VAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=16, layers_per_block=1)
    bridges = bridge_configs(llm, vision, clip_vision, (77, 768))
    bridges["hvca"] = dataclasses.replace(bridges["hvca"], hidden=384, num_heads=6)
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({
        "conditioner": "vlm", "unet": dataclasses.asdict(unet), "vae": dataclasses.asdict(vae),
        "scheduler": dataclasses.asdict(SchedulerConfig()), "sampler": "euler_ancestral",
        "llm": dataclasses.asdict(llm), "vision": dataclasses.asdict(vision),
        "clip_vision": dataclasses.asdict(clip_vision), "use_regions": True, "use_tati": True, "use_hvca": True,
        "vlm_image_size": 224, "hvca_sizes": (224,), "merge": 2,
        **{name: dataclasses.asdict(cfg) for name, cfg in bridges.items()},
    })  # fmt: skip
    config.data = ml_collections.ConfigDict({"length_buckets": (160,), "box_buckets": (8,)})
    return config


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next `repeats`)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = word_tokenizer(EDIT_WORDS)
    vocab = len(tokenizer)
    add_new_tokens(tokenizer, vocab)
    config = reduced_config(vocab)
    model = EditModel.from_config(config.model)
    params = jax.tree.map(np.asarray, flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0))))
    editor = Editor(model, params, config, tokenizer)
    pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size, 3)), jnp.float32)
    boxes = [np.array([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.9]])]
    inputs = editor.text_inputs(["make the left cup blue"], boxes)
    condition_first, condition = median_seconds(lambda: editor._edit_inputs(params, pixels, inputs)[1], args.repeats)
    image_latents, cond, _ = editor._edit_inputs(params, pixels, inputs)
    from fireedit_jax.diffusion.samplers import make_sampler

    sampler = make_sampler("euler_ancestral", editor.scheduler_config, args.steps)
    loop_first, loop = median_seconds(lambda: editor._edit(params, sampler, image_latents, cond), args.repeats)
    total_first, total = median_seconds(
        lambda: editor.edit_arrays(pixels, ["make the left cup blue"], boxes=boxes, steps=args.steps), args.repeats
    )
    print(f"FireEdit (reduced) edit at {args.size}x{args.size}, {args.steps} Euler-ancestral steps, float32, CPU")
    print(f"  conditioning (VLM, Q-Former, HVCA, latents) {condition:7.3f} s   (first call {condition_first:.1f} s)")
    print(f"  denoising per step (TATI + 3-branch UNet)    {loop / args.steps:7.3f} s   "
          f"({args.steps} steps {loop:.2f} s; first call {loop_first:.1f} s)")  # fmt: skip
    print(f"  whole edit (incl. VAE encode/decode)         {total:7.3f} s")


if __name__ == "__main__":
    main()
