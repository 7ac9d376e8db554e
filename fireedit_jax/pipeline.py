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
from fireedit_jax.config_dataclass import dataclass_from_dict
from fireedit_jax.data import tokenizer as llm_tokenizer
from fireedit_jax.data.proposals import validate_boxes
from fireedit_jax.data.vlm_inputs import build_vlm_inputs
from fireedit_jax.diffusion.diffedit import edit_model_diffedit
from fireedit_jax.diffusion.edit_loop import edit_inputs, make_edit_fn
from fireedit_jax.diffusion.samplers import make_sampler
from fireedit_jax.diffusion.schedules import SchedulerConfig
from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.models.learnable_region import INSTRUCTION_TOKENS
from fireedit_jax.models.region_predictor import edit_region

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
    with a mask encoder also reads the mask through its UNet's gated injection layer (`unet.injection_layer`:
    PromptEditDiff's gated cross-attention to the mask tokens, the ShapeEdit configs' choice, or GLIGEN's
    gated self-attention).
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
        if model.grounding is not None:
            self._ground = jax.jit(functools.partial(ground_region, model))
        self._diffedit = jax.jit(functools.partial(edit_model_diffedit, model), static_argnums=1)

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
    def region_head(self) -> str | None:
        """What predicts where to edit: "region" (the checkpoint's region model), "grounding" (FireEdit's
        own, from its VLM) or None (a region must be given, or the whole image is edited)."""
        if self.model.region is not None:
            return "region"
        return "grounding" if self.model.grounding is not None else None

    @property
    def methods(self) -> tuple[str, ...]:
        """The edit methods this checkpoint serves: its conditioner's (ip2p or fireedit: the whole image)
        unless it is an inpainting UNet, mask (a given region; masked sampling works with any UNet,
        and a UNet trained with a mask encoder also reads the mask) and, with a region head, region
        (the region predicted)."""
        own = () if self.model.image_condition == "masked" else ("fireedit" if self.model.conditioner == "vlm" else "ip2p",)
        return (*own, "mask", *(("region",) if self.region_head else ()))

    @property
    def default_method(self) -> str:
        if self.region_head:
            return "region"
        return "mask" if self.model.mask_encoder is not None or self.model.image_condition == "masked" else self.methods[0]

    def check_method(self, method: str | None, has_mask: bool) -> str:
        """The method to run (None: the checkpoint's default, "mask" where a mask is given); ValueError
        naming what the checkpoint serves when it cannot serve `method`, or when a mask is missing for it."""
        method = method or ("mask" if has_mask and self.default_method == "region" else self.default_method)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in self.methods:
            if method == "region":
                why = "it has no region head (a region model or FireEdit's grounding) to predict where to edit"
            else:
                why = f"its conditioner is {self.model.conditioner!r}"
            raise ValueError(f"this checkpoint cannot edit with --method {method}: {why}. "
                             f"It serves: {', '.join(self.methods)}")  # fmt: skip
        if method == "mask" and not has_mask:
            raise ValueError("--method mask needs the region to edit: a mask image (--mask), a box (--mask-box), "
                             "--mask auto or --mask-from")  # fmt: skip
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
        mask_from: Editor | str | None = None,
        whole_image: bool = False,
        mask_dilation: int = 0,
        mask_feather: float = 0.0,
        mask_crop: int | None = None,
        method: str | None = None,
        progress: bool | Callable[[int], None] = True,
    ):
        """Edits one image (→ PIL image) or a list of images with one instruction each (→ list).

        Images of any size and mode are accepted; each output has its input's size. Where the edit
        has a region (`find_regions`: given, or predicted by the checkpoint's region head), the
        output is the input outside it, pixel for pixel, and the edit inside (`images.composite`).
        boxes: region proposals (FireEdit's region tokens, and what a region head scores), normalised
        xyxy: float[R, 4] for one image, a list of those for a list (None: none).
        mask, mask_box, mask_from, whole_image, method: where to edit (`find_regions`).
        mask_dilation: grow the region by this many pixels; mask_feather: fade the blend out over this
        many pixels around it (soft edges). mask_crop: edit a crop around the region instead, grown by
        this many pixels (and the dilation and feather) on each side, at the working size, and paste it
        back: a small region of a large image is edited at the model's full resolution, with less of the
        scene around it for the model to see (None: the whole image at the working size).
        """
        single = isinstance(instruction, str)
        image_list = [image] if single else list(image)
        instructions = [instruction] if single else list(instruction)
        if len(image_list) != len(instructions):
            raise ValueError(f"{len(image_list)} images but {len(instructions)} instructions")
        check_instructions(instructions)
        count = len(image_list)
        box_list, mask_list, mask_boxes = (_per_image(x, single, count, what) for x, what in
                                           ((boxes, "boxes"), (mask, "masks"), (mask_box, "mask boxes")))  # fmt: skip
        loaded = [images.load_image(x) for x in image_list]
        regions = self.find_regions(loaded, instructions, boxes=box_list, masks=mask_list, mask_boxes=mask_boxes,
                                    mask_from=mask_from, whole_image=whole_image, method=method, seed=seed)  # fmt: skip
        outputs: list[Image.Image | None] = [None] * len(loaded)
        settings = dict(steps=steps, image_guidance=image_guidance, text_guidance=text_guidance, seed=seed,
                        scheduler=scheduler, mask_dilation=mask_dilation, mask_feather=mask_feather, progress=progress)
        # one batch per working size and kind of edit (images of one size share a compiled loop)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(loaded):
            if regions[i] is not None and not regions[i].any():  # a predicted region found nothing (warned)
                outputs[i] = loaded[i].copy()
                continue
            if regions[i] is not None and mask_crop is not None:
                outputs[i] = self._edit_crop(img, instructions[i], regions[i], box_list[i], mask_crop, settings)
                continue
            groups.setdefault((self.working_size(*img.size), regions[i] is None), []).append(i)
        for (size, whole), members in groups.items():
            pixels = np.stack([images.to_model_array(loaded[i], size) for i in members])
            edit_masks = None if whole else self.working_masks(
                [regions[i] for i in members], [loaded[i].size for i in members], [instructions[i] for i in members],
                size, mask_dilation, mask_feather)  # fmt: skip
            edited = self.edit_arrays(
                pixels, [instructions[i] for i in members], boxes=[box_list[i] for i in members], steps=steps,
                image_guidance=image_guidance, text_guidance=text_guidance, seed=seed, scheduler=scheduler,
                masks=edit_masks, progress=progress,
            )  # fmt: skip
            for i, array in zip(members, np.asarray(edited)):
                outputs[i] = images.restore_edit(loaded[i], array, regions[i], mask_dilation, mask_feather)
        return outputs[0] if single else outputs

    def _edit_crop(self, image: Image.Image, instruction: str, region: np.ndarray, boxes, padding: int,
                   settings: dict) -> Image.Image:  # fmt: skip
        """`edit` of the crop around `region` (see mask_crop), pasted back into `image`: outside the crop
        the image is untouched."""
        grow = padding + settings["mask_dilation"] + math.ceil(settings["mask_feather"])
        x0, y0, x1, y1 = images.crop_region(region, grow)
        if boxes is not None:  # the proposals, normalised to the crop (those outside it dropped)
            scale = np.asarray([image.width, image.height] * 2, np.float32)
            crop = np.asarray([x0, y0, x0, y0], np.float32)
            size = np.asarray([x1 - x0, y1 - y0] * 2, np.float32)
            boxes = np.clip((np.asarray(boxes, np.float32) * scale - crop) / size, 0.0, 1.0)
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        edited = self.edit(image.crop((x0, y0, x1, y1)), instruction, mask=region[y0:y1, x0:x1], boxes=boxes,
                           method="mask", **settings)  # fmt: skip
        out = image.convert("RGB")
        out.paste(edited, (x0, y0))
        return out

    def find_regions(self, images_in, instructions: Sequence[str], *, boxes=None, masks=None, mask_boxes=None,
                     mask_from: Editor | str | None = None, whole_image: bool = False, method: str | None = None,
                     seed: int = 0) -> list[np.ndarray | None]:  # fmt: skip
        """Where each edit happens: bool[H, W] at its image's own size, or None (the whole image).

        One place decides, whatever the source of the region (the edit loop never knows which):
          masks       per image a mask (a path, PIL image or [H, W] array; white / 1 = edit, or
                      transparent; resized with a warning if its size differs), or "auto": DiffEdit's
                      mask from this model's own predictions with and without the instruction
          mask_boxes  per image a normalised (x0, y0, x1, y1) box to edit in (instead of a mask)
          mask_from   another checkpoint (an Editor or its directory) whose region head predicts it
          otherwise   this checkpoint's region head (method "region", its default when it has one),
                      or none: the whole image (whole_image=True, or method ip2p / fireedit)
        masks, mask_boxes, boxes: one entry per image (entries may be None), or None.
        """
        check_instructions(instructions)
        count = len(images_in)
        loaded = [images.load_image(x) for x in images_in]
        mask_list, box_masks = (_per_image(x, False, count, what) for x, what in ((masks, "masks"), (mask_boxes, "mask boxes")))
        if any(m is not None and b is not None for m, b in zip(mask_list, box_masks)):
            raise ValueError("give a mask or a mask box, not both")
        given = [m is not None or b is not None for m, b in zip(mask_list, box_masks)]
        if mask_from is not None and any(given):
            raise ValueError("mask_from predicts the region: give no mask or mask box with it")
        method = self.check_method(method, any(given) or mask_from is not None)
        if whole_image and (any(given) or mask_from is not None or method == "mask"):
            raise ValueError("whole_image edits without a region: give no mask, mask box or mask_from")
        regions: list[np.ndarray | None] = [None] * count
        for i, (img, m, b) in enumerate(zip(loaded, mask_list, box_masks)):
            if isinstance(m, str) and m == "auto":
                continue  # below, in one batch
            if m is not None:
                regions[i] = images.load_mask(m, img.size, f"mask {i}" if count > 1 else "mask")
            elif b is not None:
                regions[i] = images.box_mask(b, img.size)
        auto = [i for i, m in enumerate(mask_list) if isinstance(m, str) and m == "auto"]
        if auto:
            found = self.diffedit_regions([loaded[i] for i in auto], [instructions[i] for i in auto],
                                          boxes=None if boxes is None else [boxes[i] for i in auto], seed=seed)  # fmt: skip
            for i, region in zip(auto, found):
                regions[i] = region
        predictor = Editor.from_pretrained(mask_from) if isinstance(mask_from, str) else mask_from
        if predictor is None and method == "region" and not whole_image:
            predictor = self
        if predictor is not None:
            regions = predictor.predict_regions(loaded, instructions, boxes)
        for i in range(count):
            if regions[i] is not None and not regions[i].any():
                warnings.warn(f"the region found for {instructions[i]!r} is empty: the image stays as it is")
        return regions

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

    def predict_regions(self, images_in, instructions: Sequence[str], boxes=None) -> list[np.ndarray]:
        """Where the checkpoint's region head would edit: bool[H, W] per image, at its own size.
        images_in: paths, PIL images or arrays; boxes: the proposals it scores, per image float[R, 4]
        normalised xyxy or None."""
        boxes = [None] * len(instructions) if boxes is None else boxes
        out = []
        for image, text, image_boxes in zip(images_in, instructions, boxes):
            image = images.load_image(image)
            pixels = images.to_model_array(image, self.working_size(*image.size))[None]
            predicted = self.region_mask_arrays(pixels, [text], [image_boxes])[0]
            out.append(images.resize_mask(predicted, image.size))
        return out

    def working_masks(self, regions, sizes, instructions, size: tuple[int, int], dilation: int = 0,
                      feather: float = 0.0) -> np.ndarray:
        """float[B, H, W] at the working `size` from bool regions at their images' `sizes` (dilation and
        feather are the image's pixels, scaled to the working size); a region thinner than one latent
        cell gets a warning (it is edited as the whole cells it touches)."""
        out = []
        for region, (width, _), text in zip(regions, sizes, instructions):
            scale = size[0] / width
            mask = images.working_mask(region, size, round(dilation * scale), feather * scale)
            if images.thinner_than(mask > 0, self.model.latent_factor):
                warnings.warn(f"the region of {text!r} is thinner than one latent cell ({self.model.latent_factor} "
                              f"px at the working size {size[0]} × {size[1]}): it is edited as the whole cells it "
                              "touches")  # fmt: skip
            out.append(mask)
        return np.stack(out)

    def region_mask_arrays(self, pixels, instructions: Sequence[str], boxes=None) -> np.ndarray:
        """float[B, H, W, 3] in [-1, 1] → bool[B, H, W]: the region head's predicted regions (the
        proposal it picks, its regressed box, or its cells above the threshold)."""
        head = self.region_head
        if head is None:
            raise ValueError("this checkpoint has no region head (a region model or FireEdit's grounding): it "
                             "cannot predict where to edit; give a mask, a box, --mask auto or --mask-from")  # fmt: skip
        check_vocabulary(self.tokenizer, instructions)
        pixels = jnp.asarray(pixels, jnp.float32)
        if head == "grounding":
            return np.asarray(self._ground(self.params, pixels, self.text_inputs(instructions, boxes))) > 0.5
        ids, mask = self.region_tokens(instructions)
        padded, box_mask = pad_boxes(boxes, len(instructions), max(self.config.data.get("box_buckets", (8,))))
        region = self._region_mask(self.params["region"], pixels, ids, mask, padded, box_mask)
        return np.asarray(region) > 0.5

    def diffedit_regions(self, images_in, instructions: Sequence[str], boxes=None, seed: int = 0) -> list[np.ndarray]:
        """DiffEdit's masks (diffusion/diffedit.py) from this checkpoint's denoiser: bool[H, W] per image,
        at its own size."""
        out = []
        for i, (image, text) in enumerate(zip(images_in, instructions)):
            image = images.load_image(image)
            pixels = jnp.asarray(images.to_model_array(image, self.working_size(*image.size))[None])
            inputs = self.text_inputs([text], None if boxes is None else [boxes[i]])
            latent = np.asarray(self._diffedit(self.params, self.scheduler_config, pixels, inputs, jax.random.key(seed)))
            latent = latent[0] > 0.5
            out.append(images.resize_mask(latent, image.size))
        return out

    def region_tokens(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The instructions as the region model's T5 reads them: (int32[B, T], bool[B, T] real tokens),
        T = config.data.region_length (longer ones are truncated, keeping the end token)."""
        length = int(self.config.data.get("region_length", INSTRUCTION_TOKENS))
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


def ground_region(model: EditModel, params, pixels, text_inputs):
    """FireEdit's grounding → float32[B, H, W] in {0, 1}: the VLM reads the image, the proposals and the
    instruction once, its states pick the region (`EditModel.ground`, `region_predictor.edit_region`)."""
    (input_ids, attention_mask), boxes, box_mask = text_inputs
    _, vlm_out = model.condition(params, pixels, (input_ids, attention_mask), boxes, box_mask)
    prediction = model.ground(params, vlm_out, input_ids, boxes, box_mask)
    return edit_region(prediction, *pixels.shape[1:3], boxes)


def pad_boxes(boxes, count: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image float[R_i, 4] normalised xyxy or None → (float32[count, slots, 4], bool[count, slots]
    real), the first `slots` of each image's (validated) boxes."""
    padded, mask = np.zeros((count, slots, 4), np.float32), np.zeros((count, slots), bool)
    for i, b in enumerate(boxes if boxes is not None else [None] * count):
        if b is None:
            continue
        b = validate_boxes(b, None, source=f"image {i}")[:slots]
        padded[i, : len(b)], mask[i, : len(b)] = b, True
    return padded, mask


def check_instructions(instructions: Sequence[str]) -> None:
    """ValueError for an instruction that says nothing to do (empty, or only spaces)."""
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            where = "" if len(instructions) == 1 else f" (instruction {i})"
            raise ValueError(f"the instruction is empty{where}: say what to change, e.g. \"make the left cup blue\"")


def _per_image(value, single: bool, count: int, what: str) -> list:
    """An argument given for one image (`single`) or per image → a list of `count` entries (None: none)."""
    if value is None:
        return [None] * count
    values = [value] if single else list(value)
    if len(values) != count:
        raise ValueError(f"{what} are given for {len(values)} images, but there are {count} images")
    return values


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
