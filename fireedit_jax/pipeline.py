"""The user-facing Editor: load a checkpoint directory, edit images with instructions."""

from __future__ import annotations

import functools
import math
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
from fireedit_jax.diffusion.edit_loop import edit_inputs, make_edit_fn
from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.fireedit import EditModel, dataclass_from_dict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


METHODS = ("ip2p", "fireedit", "mask", "region")


class Editor:
    """Edits images with instructions.

        editor = Editor.from_pretrained("ckpt/ip2p")
        out = editor.edit("cat.jpg", "make it a tiger")            # → PIL image
        outs = editor.edit([a, b], ["add snow", "make it night"])  # → list, one batch
        out = editor.edit("cups.jpg", "make it blue", mask="cup_mask.png")     # mask-guided
        out = editor.edit("cups.jpg", "make it blue", mask_box=[0.1, 0.3, 0.4, 0.8])

    A mask (white where to edit) or a mask box makes the edit mask-guided: outside the mask the
    latents are the source's at every step (masked sampling, any checkpoint), and a checkpoint
    with a mask encoder also reads the mask through its UNet's gated self-attention.
    """

    def __init__(self, model: EditModel, params, config, tokenizer):
        self.model, self.params, self.config, self.tokenizer = model, params, config, tokenizer
        self.scheduler_config = dataclass_from_dict(SchedulerConfig, config.model.scheduler)
        if model.conditioner == "vlm":
            self.token_ids = llm_tokenizer.add_new_tokens(tokenizer, model.vlm.llm.vocab_size)
        self._edit = make_edit_fn(model.denoise)
        self._edit_inputs = jax.jit(functools.partial(edit_inputs, model))
        self._decode = jax.jit(model.decode)
        if model.region is not None:
            self._region_mask = jax.jit(model.region.region_mask)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the latent factor times the UNet's (and the mask
        encoder's) downsampling; 64 for SD1.5."""
        unet_cells = 2 ** (len(self.model.unet.config.block_out_channels) - 1)
        mask_cells = self.model.mask_encoder.config.downsample_factor if self.model.mask_encoder is not None else 1
        return self.model.latent_factor * math.lcm(unet_cells, mask_cells)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) an image of that size is edited at: its aspect at about the checkpoint's resolution²
        pixels, sides multiples of `size_multiple` (it is returned at its own size)."""
        return images.working_size(width, height, int(self.config.get("resolution", 512)), self.size_multiple)

    @property
    def methods(self) -> tuple[str, ...]:
        """The edit methods this checkpoint serves: its conditioner's (ip2p or fireedit) unless it
        is an inpainting UNet, mask (masked sampling works with any UNet; trained with a mask
        encoder, the UNet also reads the mask) and, with a region model, region (the mask predicted)."""
        own = () if self.model.image_condition == "masked" else ("fireedit" if self.model.conditioner == "vlm" else "ip2p",)
        return (*own, "mask", *(("region",) if self.model.region is not None else ()))

    @property
    def default_method(self) -> str:
        if self.model.region is not None:
            return "region"
        return "mask" if self.model.mask_encoder is not None or self.model.image_condition == "masked" else self.methods[0]

    def check_method(self, method: str | None, has_mask: bool) -> str:
        """The method to run (None: the checkpoint's default); ValueError naming what the
        checkpoint serves when it cannot serve `method`, or when a mask is missing for it."""
        method = method or self.default_method
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in self.methods:
            if method == "region":
                why = "it has no region predictor (learnt edit regions)"
            else:
                why = f"its conditioner is {self.model.conditioner!r}"
            raise ValueError(f"this checkpoint cannot edit with --method {method}: {why}. "
                             f"It serves: {', '.join(self.methods)}")  # fmt: skip
        if method == "mask" and not has_mask:
            raise ValueError("--method mask needs the region to edit: a mask image (--mask) or a box (--mask-box)")
        if method == "region" and has_mask:
            raise ValueError("--method region predicts where to edit: give no mask (or use --method mask)")
        return method

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
        mask=None,
        mask_box=None,
        mask_dilation: int = 0,
        mask_feather: float = 0.0,
        method: str | None = None,
        progress: bool | Callable[[int], None] = True,
    ):
        """Edits one image (→ PIL image) or a list of images with one instruction each (→ list).

        Images of any size and mode are accepted; each output has its input's size.
        boxes: region proposals for the VLM, normalised xyxy: float[R, 4] for one image, a
        list of those for a list (None: no region tokens).
        mask: where to edit (a path, PIL image or [H, W] array; white / 1 = edit, or transparent), or
        mask_box: a normalised (x0, y0, x1, y1) box to edit in; one per image for a list. A mask of
        another size than its image is resized with a warning.
        mask_dilation: grow the mask by this many pixels; mask_feather: fade the blend out over this
        many pixels around it (soft edges).
        method: ip2p | fireedit | mask | region; None: the checkpoint's own (`check_method`).
        """
        single = isinstance(instruction, str)
        image_list = [image] if single else list(image)
        instructions = [instruction] if single else list(instruction)
        count = len(image_list)
        per_image = lambda x: [x] if single else list(x) if x is not None else [None] * count  # noqa: E731
        box_list, mask_list, mask_boxes = per_image(boxes), per_image(mask), per_image(mask_box)
        if len(image_list) != len(instructions):
            raise ValueError(f"{len(image_list)} images but {len(instructions)} instructions")
        for what, given in (("boxes", box_list), ("masks", mask_list), ("mask boxes", mask_boxes)):
            if len(given) != count:
                raise ValueError(f"{what} are given for {len(given)} images, but there are {count} images")
        if mask is not None and mask_box is not None:
            raise ValueError("give a mask or a mask box, not both")
        has_mask = mask is not None or mask_box is not None
        method = self.check_method(method, has_mask)
        loaded = [images.load_image(x) for x in image_list]
        masks = [None] * count
        if has_mask:
            masks = [images.load_mask(m, img.size, f"mask {i}") if m is not None else images.box_mask(b, img.size)
                     for i, (img, m, b) in enumerate(zip(loaded, mask_list, mask_boxes))]  # fmt: skip
        elif method == "region":
            masks, has_mask = self.predict_regions(loaded, instructions), True
        outputs: list[Image.Image | None] = [None] * len(loaded)
        # one batch per working size (images of one size share a compiled loop)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(loaded):
            groups.setdefault(self.working_size(*img.size), []).append(i)
        for size, members in groups.items():
            pixels = np.stack([images.to_model_array(loaded[i], size) for i in members])
            edit_masks = None
            if has_mask:
                edit_masks = np.stack([images.working_mask(masks[i], size, mask_dilation, mask_feather) for i in members])
            edited = self.edit_arrays(
                pixels, [instructions[i] for i in members], boxes=[box_list[i] for i in members], steps=steps,
                image_guidance=image_guidance, text_guidance=text_guidance, seed=seed, scheduler=scheduler,
                masks=edit_masks, progress=progress,
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
        masks=None,
        initial_noise=None,
        step_noise=None,
        progress: bool | Callable[[int], None] = False,
    ) -> jax.Array:
        """float[B, H, W, 3] in [-1, 1] (H, W multiples of the latent factor) → edited, same range.

        boxes: per image float[R_i, 4] normalised xyxy or None (VLM conditioner only).
        masks: float[B, H, W] in [0, 1], 1 = edit (soft edges blend), or None: no mask. The mask
        encoder and an inpainting UNet read where it is > 0; masked sampling blends with it (except
        for an inpainting UNet, which reads the masked source instead, as in diffusers).
        initial_noise: float[B, h, w, C]; step_noise: float[S, B, h, w, C] (stochastic samplers).
        """
        pixels = jnp.asarray(pixels, jnp.float32)
        factor = self.model.latent_factor
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise ValueError(f"image size {pixels.shape[1:3]} is not a multiple of {factor}")
        if masks is None and self.model.image_condition == "masked":
            raise ValueError("this checkpoint is an inpainting UNet: every edit needs a mask (or a mask box)")
        sampler = make_sampler(scheduler or self.config.model.sampler, self.scheduler_config, steps)
        masks = None if masks is None else jnp.asarray(masks, jnp.float32)[..., None]
        image_latents, cond, blend = self._edit_inputs(self.params, pixels, self.text_inputs(instructions, boxes),
                                                       masks)  # fmt: skip
        h, w = pixels.shape[1] // factor, pixels.shape[2] // factor
        with _progress_bar(steps, progress) as on_step:
            latents = self._edit(
                self.params, sampler, image_latents, cond, text_scale=text_guidance, image_scale=image_guidance,
                guidance=self.model.guidance, blend=blend, latent_shape=(len(pixels), h, w, self.model.vae.config.latent_channels),
                seed=seed, initial_noise=initial_noise, step_noise=step_noise, progress=on_step,
            )  # fmt: skip
        return self._decode(self.params, latents)

    def predict_regions(self, images_in, instructions: Sequence[str]) -> list[np.ndarray]:
        """Where the checkpoint's region model would edit: bool[H, W] per image, at its own size
        (the patches predicted above the model's threshold). images_in: paths, PIL images or arrays."""
        out = []
        for image, text in zip(images_in, instructions):
            image = images.load_image(image)
            pixels = images.to_model_array(image, self.working_size(*image.size))[None]
            predicted = self.region_mask_arrays(pixels, [text])[0]
            if not predicted.any():
                warnings.warn(f"the region model found nothing to edit for {text!r}: the image stays as it is")
            resized = Image.fromarray(predicted.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
            out.append(np.asarray(resized) > 127)
        return out

    def region_mask_arrays(self, pixels, instructions: Sequence[str]) -> np.ndarray:
        """float[B, H, W, 3] in [-1, 1] → bool[B, H, W]: the region model's predicted masks."""
        if self.model.region is None:
            raise ValueError("this checkpoint has no region model (learnt edit regions): it cannot predict a mask")
        check_vocabulary(self.tokenizer, instructions)
        ids, mask = self.region_tokens(instructions)
        return np.asarray(self._region_mask(self.params["region"], jnp.asarray(pixels, jnp.float32), ids, mask)) > 0.5

    def region_tokens(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The instructions as the region model's T5 reads them: (int32[B, T], bool[B, T] real tokens),
        T = config.data.region_length (longer ones are truncated, keeping the end token)."""
        length = int(self.config.data.get("region_length", 32))
        rows = [self.tokenizer(text).input_ids for text in instructions]  # with the special tokens
        ids, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            row = row if len(row) <= length else [*row[: length - 1], row[-1]]
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

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
