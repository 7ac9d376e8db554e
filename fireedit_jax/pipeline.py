"""The user-facing Editor: load a checkpoint directory, edit images with instructions."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fireedit_jax import checkpoint, images
from fireedit_jax.diffusion.edit_loop import make_edit_fn, stack_branches
from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.fireedit import EditModel, dataclass_from_dict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Editor:
    """Edits images with instructions.

        editor = Editor.from_pretrained("ckpt/ip2p")
        out = editor.edit("cat.jpg", "make it a tiger")            # → PIL image
        outs = editor.edit([a, b], ["add snow", "make it night"])  # → list, one batch
    """

    def __init__(self, model: EditModel, params, config, tokenizer):
        self.model, self.params, self.config, self.tokenizer = model, params, config, tokenizer
        self.scheduler_config = dataclass_from_dict(SchedulerConfig, config.model.scheduler.to_dict())
        self._edit = make_edit_fn(model.denoise)
        self._encode_text = jax.jit(model.encode_text)
        self._encode_image = jax.jit(model.encode_image)
        self._decode = jax.jit(model.decode)

    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: str | None = None, attention: str | None = None) -> Editor:
        """Loads `fireedit-jax convert` / training / export output. dtype: compute dtype
        ("float32" or "bfloat16"; default bfloat16 on accelerators, float32 on CPU)."""
        config = checkpoint.load_config(directory)
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        model = EditModel.from_config(config.model, dtype=DTYPES[dtype], attention=attention)
        params = checkpoint.load_params(directory, jax.eval_shape(model.init, jax.random.key(0)))
        return cls(model, params, config, load_tokenizer(checkpoint.tokenizer_dir(directory)))

    # ------------------------------------------------------------------ public

    def edit(
        self,
        image,
        instruction,
        *,
        steps: int = 100,
        image_guidance: float = 1.5,
        text_guidance: float = 7.5,
        seed: int = 0,
        scheduler: str | None = None,
        progress: bool | Callable[[int], None] = True,
    ):
        """Edits one image (→ PIL image) or a list of images with one instruction each (→ list).

        Images of any size and mode are accepted; each output has its input's size.
        """
        single = isinstance(instruction, str)
        image_list = [image] if single else list(image)
        instructions = [instruction] if single else list(instruction)
        if len(image_list) != len(instructions):
            raise ValueError(f"{len(image_list)} images but {len(instructions)} instructions")
        loaded = [images.load_image(x) for x in image_list]
        resolution = int(self.config.get("resolution", 512))
        outputs: list[Image.Image | None] = [None] * len(loaded)
        # one batch per working size (images of one size share a compiled loop)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(loaded):
            groups.setdefault(images.working_size(*img.size, resolution), []).append(i)
        for size, members in groups.items():
            pixels = np.stack([images.to_model_array(loaded[i], size) for i in members])
            edited = self.edit_arrays(
                pixels, [instructions[i] for i in members], steps=steps, image_guidance=image_guidance,
                text_guidance=text_guidance, seed=seed, scheduler=scheduler, progress=progress,
            )  # fmt: skip
            for i, array in zip(members, np.asarray(edited)):
                outputs[i] = images.from_model_array(array, loaded[i].size)
        return outputs[0] if single else outputs

    def edit_arrays(
        self,
        pixels,
        instructions: Sequence[str],
        *,
        steps: int = 100,
        image_guidance: float = 1.5,
        text_guidance: float = 7.5,
        seed: int = 0,
        scheduler: str | None = None,
        initial_noise=None,
        step_noise=None,
        progress: bool | Callable[[int], None] = False,
    ) -> jax.Array:
        """float[B, H, W, 3] in [-1, 1] (H, W multiples of the latent factor) → edited, same range.

        initial_noise: float[B, h, w, C]; step_noise: float[S, B, h, w, C] (stochastic samplers).
        """
        pixels = jnp.asarray(pixels, jnp.float32)
        factor = self.model.latent_factor
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise ValueError(f"image size {pixels.shape[1:3]} is not a multiple of {factor}")
        sampler = make_sampler(scheduler or self.config.model.sampler, self.scheduler_config, steps)
        image_latents = self._encode_image(self.params, pixels)
        text = self._encode_text(self.params, jnp.asarray(self.tokenize(instructions)))
        cond = stack_branches({"text": text}, {"text": self.params["null_text"]}, {"text": self.params["null_text"]})
        with _progress_bar(steps, progress) as on_step:
            latents = self._edit(
                self.params, sampler, image_latents, cond, text_scale=text_guidance, image_scale=image_guidance,
                seed=seed, initial_noise=initial_noise, step_noise=step_noise, progress=on_step,
            )  # fmt: skip
        return self._decode(self.params, latents)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32[B, L], padded to the text encoder's length; over-long texts are truncated with a warning."""
        length = self.model.max_text_length
        ids = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True).input_ids
        full = self.tokenizer(list(texts)).input_ids
        for text, tokens in zip(texts, full):
            if len(tokens) > length:
                warnings.warn(f"instruction truncated to {length} tokens ({len(tokens)} given): {text[:60]!r}…")
        return np.asarray(ids, np.int32)


def load_tokenizer(directory: str):
    """The CLIP tokenizer saved beside the weights (no download)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise checkpoint.CheckpointError(f"tokenizer directory {directory!r} does not exist")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


class _progress_bar:
    """Context manager yielding a per-step callback (a tqdm bar, the user's callable, or None)."""

    def __init__(self, steps: int, progress):
        self.steps, self.progress, self.bar = steps, progress, None

    def __enter__(self):
        if callable(self.progress):
            return self.progress
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, desc="editing", unit="step")
        return lambda _: self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
