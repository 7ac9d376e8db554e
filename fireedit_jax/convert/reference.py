"""Random PyTorch reference models saved in their libraries' own formats.

No weights can be downloaded, so tests, benchmarks and the interim demo build small
random diffusers / transformers models, save them with `save_pretrained`, and push
them through the same converters users run on real checkpoints.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class IP2PSizes:
    """Dimensions of a random InstructPix2Pix pipeline (SD1.5-shaped, narrower)."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int | tuple[int, ...] = 2
    layers_per_block: int = 1
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers: int = 1
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    sample_size: int = 32  # latent side; the pipeline's resolution is this × the VAE factor
    norm_groups: int = 16

    @classmethod
    def sd15_shaped(cls) -> IP2PSizes:
        """SD1.5's block layout (4 levels, 2 layers, cross-attn 768) at a quarter of its width."""
        return cls(
            unet_channels=(80, 160, 320, 320), unet_heads=8, layers_per_block=2, vae_channels=(32, 64, 128, 128),
            text_width=768, text_layers=2, text_heads=12, sample_size=32, norm_groups=16,
        )  # fmt: skip

    @classmethod
    def sd15(cls) -> IP2PSizes:
        """SD1.5's own sizes (UNet 320/640/1280/1280, VAE 128/256/512/512 with 2 layers, CLIP ViT-L/14
        text at 12 layers; 64×64 latents, 512 px): full-size random models for timings."""
        return cls(
            unet_channels=(320, 640, 1280, 1280), unet_heads=8, layers_per_block=2, vae_channels=(128, 256, 512, 512),
            vae_layers=2, text_width=768, text_layers=12, text_heads=12, sample_size=64, norm_groups=32,
        )  # fmt: skip


def clip_tokenizer():
    """A character-level CLIP tokenizer (byte-level alphabet, no merges) built offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def ip2p_pipeline(sizes: IP2PSizes = IP2PSizes(), seed: int = 0, *, in_channels: int = 8):
    """A random `StableDiffusionInstructPix2PixPipeline` (8-channel UNet, Euler-ancestral as IP2P ships);
    in_channels 9 (the SD inpainting UNet) or 4 (SD's): a `StableDiffusionInpaintPipeline` instead."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    levels = len(sizes.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sizes.sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        attention_head_dim=sizes.unet_heads,
        cross_attention_dim=sizes.text_width,
        norm_num_groups=sizes.norm_groups,
    )
    vae_levels = len(sizes.vae_channels)
    vae = AutoencoderKL(
        block_out_channels=sizes.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        latent_channels=4,
        norm_num_groups=sizes.norm_groups,
        layers_per_block=sizes.vae_layers,
    )
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.text_width,
            intermediate_size=4 * sizes.text_width,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Random weights: give the UNet's zero-initialised output layers some signal.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                if not p.abs().sum():
                    p.normal_(0, 0.02)
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    cls = StableDiffusionInstructPix2PixPipeline if in_channels == 8 else StableDiffusionInpaintPipeline
    return cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def save_ip2p(directory: str, sizes: IP2PSizes = IP2PSizes(), seed: int = 0, *, in_channels: int = 8):
    """Saves a random IP2P (or, in_channels 9 / 4, SD inpainting) pipeline in diffusers' directory
    layout; returns the pipeline."""
    pipeline = ip2p_pipeline(sizes, seed, in_channels=in_channels)
    os.makedirs(directory, exist_ok=True)
    pipeline.save_pretrained(directory)
    return pipeline


def word_tokenizer(words):
    """A lower-casing word-level tokenizer (<pad> <unk> <s> </s> + `words`), as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


EDIT_WORDS = "user: assistant: make turn add remove the a an it to into of left right top bottom " \
    "small big bigger smaller cup circle square triangle red green blue yellow".split()  # fmt: skip


def save_llama(directory: str, words=EDIT_WORDS, *, width: int = 32, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM (GQA) with a word-level tokenizer, saved as a transformers directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_dinov2(directory: str, *, width: int = 16, layers: int = 3, image_size: int = 32, patch: int = 8, seed=0):
    """A random transformers Dinov2Model."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=4 * width, image_size=image_size, patch_size=patch))  # fmt: skip
    model.save_pretrained(directory)
    return model


def save_clip_vision(directory: str, *, width: int = 16, layers: int = 2, image_size: int = 16, patch: int = 8, seed=0):
    """A random transformers CLIPVisionModel."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                             num_attention_heads=2, image_size=image_size, patch_size=patch))  # fmt: skip
    model.save_pretrained(directory)
    return model


def save_t5(directory: str, *, width: int = 32, layers: int = 2, heads: int = 4, head_dim: int = 8, ffn: int = 37,
            vocab: int = 99, feed_forward_proj: str = "gated-gelu", full: bool = False, seed: int = 0):
    """A random transformers T5EncoderModel (full: a T5ForConditionalGeneration, decoder and LM head too)."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=width, d_kv=head_dim, d_ff=ffn, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj=feed_forward_proj)  # fmt: skip
    model = (T5ForConditionalGeneration if full else T5EncoderModel)(config)
    # The norms start at 1: randomise them so that a dropped or swapped one would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model.eval()
