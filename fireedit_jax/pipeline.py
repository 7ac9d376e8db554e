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
from fireedit_jax.data import tokenizer as llm_tokenizer
from fireedit_jax.data.proposals import validate_boxes
from fireedit_jax.data.vlm_inputs import build_vlm_inputs
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
        self.scheduler_config = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
        if model.conditioner == "vlm":
            self.token_ids = llm_tokenizer.add_new_tokens(tokenizer, model.vlm.llm.vocab_size)
        self._edit = make_edit_fn(model.denoise)
        self._condition = jax.jit(model.condition)
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
        return cls(model, params, config, load_tokenizer(checkpoint.tokenizer_dir(directory), model))

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
        boxes=None,
        progress: bool | Callable[[int], None] = True,
    ):
        """Edits one image (→ PIL image) or a list of images with one instruction each (→ list).

        Images of any size and mode are accepted; each output has its input's size.
        boxes: region proposals for the VLM, normalised xyxy: float[R, 4] for one image, a
        list of those for a list (None: no region tokens).
        """
        single = isinstance(instruction, str)
        image_list = [image] if single else list(image)
        instructions = [instruction] if single else list(instruction)
        box_list = [boxes] if single else list(boxes) if boxes is not None else [None] * len(image_list)
        if len(image_list) != len(instructions):
            raise ValueError(f"{len(image_list)} images but {len(instructions)} instructions")
        if len(box_list) != len(image_list):
            raise ValueError(f"boxes are given for {len(box_list)} images, but there are {len(image_list)} images")
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
                pixels, [instructions[i] for i in members], boxes=[box_list[i] for i in members], steps=steps,
                image_guidance=image_guidance, text_guidance=text_guidance, seed=seed, scheduler=scheduler,
                progress=progress,
            )  # fmt: skip
            for i, array in zip(members, np.asarray(edited)):
                outputs[i] = images.from_model_array(array, loaded[i].size)
        return outputs[0] if single else outputs

    def edit_arrays(
        self,
        pixels,
        instructions: Sequence[str],
        *,
        boxes=None,
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

        boxes: per image float[R_i, 4] normalised xyxy or None (VLM conditioner only).
        initial_noise: float[B, h, w, C]; step_noise: float[S, B, h, w, C] (stochastic samplers).
        """
        pixels = jnp.asarray(pixels, jnp.float32)
        factor = self.model.latent_factor
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise ValueError(f"image size {pixels.shape[1:3]} is not a multiple of {factor}")
        sampler = make_sampler(scheduler or self.config.model.sampler, self.scheduler_config, steps)
        image_latents = self._encode_image(self.params, pixels)
        cond, _ = self._condition(self.params, pixels, *self.text_inputs(instructions, boxes))
        cond = stack_branches(*self.model.branches(self.params, cond))
        with _progress_bar(steps, progress) as on_step:
            latents = self._edit(
                self.params, sampler, image_latents, cond, text_scale=text_guidance, image_scale=image_guidance,
                seed=seed, initial_noise=initial_noise, step_noise=step_noise, progress=on_step,
            )  # fmt: skip
        return self._decode(self.params, latents)

    def text_inputs(self, instructions: Sequence[str], boxes=None) -> tuple:
        """The conditioner's inputs: (CLIP ids,) or ((input_ids, attention_mask), boxes, box_mask)."""
        check_vocabulary(self.tokenizer, instructions)
        if self.model.conditioner == "clip_text":
            return (jnp.asarray(self.tokenize(instructions)),)
        boxes = [np.zeros((0, 4), np.float32) if b is None else validate_boxes(b, None, source=f"image {i}")
                 for i, b in enumerate(boxes if boxes is not None else [None] * len(instructions))]  # fmt: skip
        use_boxes = self.model.vlm.regions is not None
        batch = build_vlm_inputs(
            self.tokenizer, self.token_ids, instructions, [len(b) if use_boxes else 0 for b in boxes],
            num_image_tokens=self.model.num_image_tokens, length_buckets=tuple(self.config.data.length_buckets),
            box_buckets=tuple(self.config.data.box_buckets),
        )  # fmt: skip
        padded = np.zeros((len(boxes), batch.box_mask.shape[1], 4), np.float32)
        for i, b in enumerate(boxes):
            padded[i, : len(b)] = b[: padded.shape[1]] if use_boxes else 0
        return (batch.input_ids, batch.attention_mask), padded, batch.box_mask

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32[B, L], padded to the text encoder's length; over-long texts are truncated with a warning."""
        length = self.model.max_text_length
        ids = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True).input_ids
        full = self.tokenizer(list(texts)).input_ids
        for text, tokens in zip(texts, full):
            if len(tokens) > length:
                warnings.warn(f"instruction truncated to {length} tokens ({len(tokens)} given): {text[:60]!r}…")
        return np.asarray(ids, np.int32)


def check_vocabulary(tokenizer, instructions: Sequence[str]) -> None:
    """ValueError naming the words a closed-vocabulary (word-level) tokenizer maps to its unknown
    token, e.g. a model trained on ShapeEdit, and listing the words it knows."""
    unk, backend = tokenizer.unk_token_id, getattr(tokenizer, "backend_tokenizer", None)
    if unk is None or backend is None:
        return
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    for text in instructions:
        encoding = backend.encode(text, add_special_tokens=False)
        unknown = [text[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if i == unk]
        if unknown:
            vocab = tokenizer.get_vocab()
            known = sorted((w for w in vocab if w not in special), key=vocab.get)
            raise ValueError(
                f"instruction {text!r}: the model does not know the word(s) {', '.join(dict.fromkeys(unknown))}. "
                f"It knows: {' '.join(known)}"
            )


def load_tokenizer(directory: str, model: EditModel | None = None):
    """The tokenizer saved beside the weights (no download): CLIP's, or the LLM's with the new tokens."""
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise checkpoint.CheckpointError(f"tokenizer directory {directory!r} does not exist")
    if model is not None and model.conditioner == "vlm":
        return llm_tokenizer.load_tokenizer(directory, model.vlm.llm.vocab_size)[0]
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
