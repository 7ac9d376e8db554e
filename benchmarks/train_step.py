"""Train-step throughput: examples/s and model TFLOP/s per device, ours against PyTorch on this CPU.

  python benchmarks/train_step.py [--batch 4] [--fireedit-batch 8] [--runs 5] [--warmup 1]

Rows, float32, one device:
  ip2p      our jitted IP2P train step (train/step.py Trainer: condition dropout, CLIP text
            forward, UNet forward + backward, clipping, AdamW, NaN check) on cached VAE
            latents, for a reduced SD1.5-shaped model (`IP2PSizes.sd15_shaped()`: SD1.5's
            block layout at a quarter of its width, cross-attention 768, 32×32 latents)
  torch     the same step in PyTorch: diffusers UNet2DConditionModel + transformers CLIP
            text encoder (no_grad), the same weights (converted), MSE on ε, clip_grad_norm_,
            torch AdamW
  fireedit  our full FireEdit stage-3 step (configs/tiny_fireedit.py:3: VLM with regions,
            Q-Former, HVCA, TATI, decoupled UNet; L_VLM + L_diff) on pixels
  fire_scan the same step with train.unroll_accumulation=False: the micro-batch loop as
            lax.scan (one trip), where XLA:CPU's convolution gradients take a slow path

Model FLOPs per example come from train/flops.py (matrix products of the loss, 3F for
trained layers, 2F for frozen ones the gradient passes, F for the frozen rest); the torch
step does the same products. ours and torch run alternately, so a shared CPU's load falls
on both (benchmarks/timing.py); their ratio is the figure to read, the absolute rates
move with the load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from timing import interleaved
from timing import report as report_ratio

from fireedit_jax import checkpoint
from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.convert import reference
from fireedit_jax.convert.ip2p import convert_ip2p
from fireedit_jax.data.tokenizer import NEW_TOKENS, NewTokenIds
from fireedit_jax.data.vlm_inputs import VLMTemplate
from fireedit_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod
from fireedit_jax.models.fireedit import LATENT_FIELDS, EditModel
from fireedit_jax.train import flops
from fireedit_jax.train import run as run_lib
from fireedit_jax.train.step import Trainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def ip2p_setup(batch: int):
    """(config, our params, torch pipeline) of the reduced SD1.5-shaped IP2P model, same weights."""
    sizes = reference.IP2PSizes.sd15_shaped()
    with tempfile.TemporaryDirectory() as directory:
        pipeline = reference.save_ip2p(os.path.join(directory, "src"), sizes)
        convert_ip2p(os.path.join(directory, "src"), os.path.join(directory, "ckpt"))
        model = checkpoint.load_config(os.path.join(directory, "ckpt"))
        abstract = jax.eval_shape(EditModel.from_config(model.model).init, jax.random.key(0))
        params = checkpoint.load_params(os.path.join(directory, "ckpt"), abstract)
    config = run_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model, config.resolution = model.model, model.resolution
    config.train.update(batch_size=batch, grad_accum=1, dtype="float32")
    config.train.ema.enabled = False
    return config, params, pipeline


def ip2p_batch(config, batch: int, rng) -> dict:
    """Cached-latent IP2P batch: LATENT_FIELDS float32[B, h, w, 4] and CLIP ids int32[B, 77]."""
    side = config.resolution // (2 ** (len(config.model.vae.block_out_channels) - 1))
    latents = {name: rng.normal(size=(batch, side, side, 4)).astype(np.float32) for name in LATENT_FIELDS}
    latents["target_latents_logvar"] = np.full_like(latents["target_latents_logvar"], -10.0)
    vocab = config.model.text_encoder.vocab_size
    return {**latents, "input_ids": rng.integers(0, vocab, (batch, 77), dtype=np.int32)}


def fireedit_batch(config, trainer: Trainer, batch: int, rng, num_boxes: int = 4) -> dict:
    """A FireEdit stage-3 batch: random pixels and instruction words in the VLM's template
    (image and region placeholders, the 32 [IMG] targets), `num_boxes` random boxes each."""
    vlm, llm = trainer.model.vlm, trainer.model.vlm.llm
    new = [llm.vocab_size + i for i in range(len(NEW_TOKENS))]  # ids V, V+1, … (data/tokenizer.py)
    grid = trainer.model.vlm_image_size // vlm.vision.patch_size // vlm.merge
    template = VLMTemplate(
        NewTokenIds(*new[:4], tuple(new[4:])), user=(5, 6), assistant=(7, 8), bos=1, eos=2, pad=0,
        num_image_tokens=grid * grid, length_buckets=tuple(config.data.length_buckets),
        box_buckets=tuple(config.data.box_buckets),
    )  # fmt: skip
    words = [rng.integers(10, llm.vocab_size, 12) for _ in range(batch)]
    inputs = template(words, [num_boxes] * batch)
    side = int(config.resolution)
    corner = rng.uniform(0, 0.5, (batch, inputs.box_mask.shape[1], 2))
    return {
        "source": rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32),
        "target": rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32),
        "vlm_input_ids": inputs.input_ids, "vlm_attention_mask": inputs.attention_mask,
        "vlm_target_mask": inputs.target_mask, "vlm_weight": np.ones(batch, np.float32),
        "boxes": np.concatenate([corner, corner + 0.4], axis=-1).astype(np.float32), "box_mask": inputs.box_mask,
        "diffusion_weight": np.ones(batch, np.float32),
    }  # fmt: skip


def jax_step(trainer: Trainer, host_batch: dict, params=None):
    """A callable running one step (state threaded through, donated) and waiting for it."""
    state = {"state": trainer.init_state(params=params)}
    batch = trainer.shard_batch(host_batch)

    def run():
        state["state"], metrics = trainer.step(state["state"], batch)
        return float(metrics["loss"])

    return run


def torch_step(pipeline, config, host_batch: dict):
    """The same IP2P step in PyTorch (float32): frozen text encoder, UNet trained with AdamW."""
    unet, text_encoder = pipeline.unet.train(), pipeline.text_encoder.eval()
    train = config.train
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train.learning_rate, betas=(train.adam_b1, train.adam_b2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)  # fmt: skip
    abar = torch.from_numpy(np.asarray(alphas_cumprod(dataclass_from_dict(SchedulerConfig, config.model.scheduler))))
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    image, target = nchw(host_batch["source_latents"]), nchw(host_batch["target_latents_mean"])
    ids = torch.from_numpy(host_batch["input_ids"]).long()
    generator = torch.Generator().manual_seed(0)

    def run():
        with torch.no_grad():
            context = text_encoder(ids).last_hidden_state
        t = torch.randint(0, len(abar), (len(ids),), generator=generator)
        noise = torch.randn(target.shape, generator=generator)
        a = abar[t].sqrt().float()[:, None, None, None]
        s = (1 - abar[t]).sqrt().float()[:, None, None, None]
        latents = target * config.model.vae.scaling_factor
        pred = unet(torch.cat([a * latents + s * noise, image], dim=1), t, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), train.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def row(name: str, seconds: float, batch: int, flops_per_example: float, devices: int = 1) -> str:
    rate = batch / seconds
    return (f"{name:9s} {seconds * 1e3:10.1f} {rate:12.2f} {flops_per_example / 1e9:14.2f} "
            f"{rate * flops_per_example / devices / 1e12:18.4f}")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="IP2P examples per step")
    parser.add_argument("--fireedit-batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    print("$ " + shlex.join([os.path.relpath(sys.executable), *sys.argv]), flush=True)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)

    config, params, pipeline = ip2p_setup(args.batch)
    host = ip2p_batch(config, args.batch, rng)
    trainer = Trainer.from_config(config)
    ip2p_flops = flops.train_flops_per_example(config, host)
    start = time.perf_counter()
    ours = jax_step(trainer, host, params)
    ours()
    print(f"ip2p: {trainer.trainable_count() / 1e6:.1f}M trainable (UNet), {config.resolution} px, "
          f"first step (compile + run) {time.perf_counter() - start:.0f} s", flush=True)
    results = interleaved({"ours": ours, "torch": torch_step(pipeline, config, host)}, args.runs, args.warmup)

    fire_steps = {}
    for name, unroll in (("fireedit", None), ("fire_scan", False)):  # the default (unrolled on CPU), lax.scan
        fire_config = run_lib.load_config(os.path.join(ROOT, "configs", "tiny_fireedit.py") + ":3")
        fire_config.train.batch_size, fire_config.train.unroll_accumulation = args.fireedit_batch, unroll
        fire_trainer = Trainer.from_config(fire_config)
        fire_host = fireedit_batch(fire_config, fire_trainer, args.fireedit_batch, np.random.default_rng(1))
        fire_steps[name] = jax_step(fire_trainer, fire_host)
        start = time.perf_counter()
        fire_steps[name]()
        print(f"{name}: {fire_trainer.trainable_count() / 1e6:.2f}M trainable, first step (compile + run) "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    fire_flops = flops.train_flops_per_example(fire_config, fire_host)
    results.update(interleaved(fire_steps, args.runs, args.warmup))
    medians = {name: wall for name, (wall, _, _) in results.items()}

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, float32, "
          f"{os.cpu_count()} CPU threads, medians of {args.runs} runs, 1-min load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':9s} {'ms/step':>10s} {'examples/s':>12s} {'GFLOP/example':>14s} {'TFLOP/s per device':>18s}")
    print(row("ip2p", medians["ours"], args.batch, ip2p_flops))
    print(row("torch", medians["torch"], args.batch, ip2p_flops))
    print(row("fireedit", medians["fireedit"], args.fireedit_batch, fire_flops))
    print(row("fire_scan", medians["fire_scan"], args.fireedit_batch, fire_flops))
    print("IP2P step, ours against torch:")
    report_ratio({name: results[name] for name in ("ours", "torch")}, "ours", "torch", unit=1e3, label="ms")
    print("FireEdit step, micro-batches unrolled (the CPU default) against lax.scan:")
    report_ratio({name: results[name] for name in fire_steps}, "fireedit", "fire_scan", unit=1e3, label="ms")


if __name__ == "__main__":
    main()
