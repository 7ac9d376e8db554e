"""One UNet forward, ours (jitted Flax) against diffusers (torch, no_grad), float32, same weights, same CPU.

A reduced-width SD1.5-shaped UNet (the SD1.5 block layout, 8 heads, cross-attention
width 768, 8 input channels as in InstructPix2Pix) on 64×64 latents with 77 context
tokens: the widths are cut so one forward takes seconds on a small CPU. The torch
model is built with random weights and converted, so both run the same network.

  python benchmarks/unet_vs_torch.py [--widths 64,128,256,256] [--batch 3] [--size 64] [--runs 5]

Prints the median wall and CPU time of each after warm-up (runs alternate between the
two, so load from other processes on a shared CPU falls on both) and the ratios ours /
torch. Both sides get every core: torch's intra-op threads are set to the core count,
which is what XLA's CPU client uses. No XLA flags are needed: the installed jaxlib already
lowers dots, convolutions and their fused elementwise tails to YNNPACK, and none of the
CPU flags tried (XNNPACK / oneDNN fusion types, 512-bit vectors, fast math) was faster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel

from fireedit_jax.convert.unet import convert_unet
from fireedit_jax.models.unet import UNet
from fireedit_jax.models.unet_config import UNetConfig
from timing import interleaved, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="64,128,256,256", help="block_out_channels")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="latent side")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print("$ " + shlex.join([os.path.relpath(sys.executable), *sys.argv]), flush=True)

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    widths = tuple(int(w) for w in args.widths.split(","))
    reference = UNet2DConditionModel(
        in_channels=8, out_channels=4, block_out_channels=widths, attention_head_dim=args.heads,
        cross_attention_dim=768, norm_num_groups=32,
    ).eval()
    config = UNetConfig.from_diffusers(dict(reference.config))
    params = convert_unet({k: v.numpy() for k, v in reference.state_dict().items()}, config)
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    sample = rng.normal(size=(args.batch, args.size, args.size, 8)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, size=args.batch).astype(np.float32)
    context = rng.normal(size=(args.batch, args.tokens, 768)).astype(np.float32)
    sample_t = torch.from_numpy(sample).permute(0, 3, 1, 2).contiguous()
    timesteps_t, context_t = torch.from_numpy(timesteps), torch.from_numpy(context)
    inputs = [jax.device_put(a) for a in (sample, timesteps, context)]

    forward = jax.jit(UNet(config).apply)
    start = time.perf_counter()
    ours_out = np.asarray(forward(params, *inputs))
    compile_s = time.perf_counter() - start

    def run_torch():
        with torch.no_grad():
            return reference(sample_t, timesteps_t, context_t).sample

    torch_out = run_torch().permute(0, 2, 3, 1).numpy()
    print(f"UNet widths {widths}, {args.heads} heads, cross dim 768, batch {args.batch}, "
          f"{args.size}x{args.size} latents, {args.tokens} tokens, "
          f"{sum(p.numel() for p in reference.parameters()) / 1e6:.1f}M params, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}")
    print(f"max abs difference of the outputs: {np.max(np.abs(ours_out - torch_out)):.2e}")
    print(f"ours: first call (trace + compile + run) {compile_s:.1f} s")

    ours, theirs = "ours (jax.jit, float32)", "torch (diffusers, no_grad, float32)"
    results = interleaved(
        {ours: lambda: forward(params, *inputs).block_until_ready(), theirs: run_torch}, args.runs, args.warmup
    )
    print(f"one forward, {args.runs} runs each after {args.warmup} warm-up:")
    report(results, ours, theirs, unit=1e3, label="ms")


if __name__ == "__main__":
    main()
