"""`fireedit-jax serve`: the Editor in a web page (Gradio, the `ui` extra).

    fireedit-jax serve --checkpoint outputs/demo/checkpoint [--host 127.0.0.1 --port 7860]

Upload an image, type an instruction, optionally click two corners per region box (FireEdit's
boxes, the proposals a region head scores) or paint a mask, choose steps, s_I, s_T, seed and
sampler, and edit. The result shows beside the input; "Edit again" makes it the next input (a
multi-turn session) and the history gallery keeps every turn.

With a region head and no mask painted, the checkpoint finds where to edit ("Find region" shows it
without editing), and the region it edited under is drawn into the mask editor's layer, where the
user erases or paints it, or replaces it with the clicked boxes ("Mask from boxes"); "Edit" then
redoes the turn under the corrected mask, and "Clear mask" lets the checkpoint find it again.

One Editor serves every request. Gradio's queue runs one edit at a time, and a lock around the
Editor makes sure that two compilations never run at once. A compiled edit loop is reused while
the working size, the step count and the sampler stay the same, so uploads are edited at a few
working sizes only (`bucket_sizes`: square, 4:3 and 3:4 at about the checkpoint's resolution²
pixels, sides a multiple of what the model needs, 64 for SD1.5) and restored to their own size, and the step count is one of a
few choices. The start-up compiles every working size at the default steps and sampler; any
other (size, steps, sampler) compiles once, on its first edit.

Whatever a user gets wrong gets a message in the page, not a traceback: a file that is no image,
an empty instruction, a word that the checkpoint does not know (with the words it knows), a box
outside the image, a painted mask that covers nothing or everything.

The page is Gradio's bundled frontend: nothing is fetched from anywhere else, no analytics, no
share link.
"""

# No `from __future__ import annotations`: Gradio finds on_click's event argument by its gr.SelectData annotation.
import argparse
import contextvars
import os
import sys
import threading
import time

import numpy as np
from PIL import Image, ImageDraw

from fireedit_jax import images
from fireedit_jax.data.proposals import BoxError, validate_boxes
from fireedit_jax.diffusion.samplers import SAMPLERS

ASPECTS = (1.0, 4 / 3, 3 / 4)  # width / height of the working sizes
STEP_CHOICES = (10, 20, 50, 100)  # with --steps: each is one compilation per working size
SHOWN_SIDES = (320, 768)  # the input is shown with its short side ≥ 320 px and its long side ≤ 768 px
BOX_COLOUR, CORNER_COLOUR = (255, 0, 200), (0, 160, 255)
MASK_COLOUR = (255, 0, 200, 153)  # the brush's: a found region is drawn as if painted (alpha ≥ 128 counts)
CORRECT = ("It is drawn in the mask: erase or paint it (or click a box and 'Mask from boxes'), then Edit to edit "
           "under it; 'Clear mask' lets the checkpoint find it again")
NOTHING_FOUND = "It found nothing to edit: paint the region in the mask (or 'Mask from boxes') and Edit"


# ---------------------------------------------------------------------------------------- working sizes


def bucket_sizes(working_size) -> list[tuple[int, int]]:
    """The working sizes (W, H) that edits run at: `working_size(W, H)` (an Editor's) of each aspect in
    ASPECTS, without repeats (the 32 px demo checkpoint: 32², 36 × 28 and 28 × 36; SD1.5 at 512 px: 512²,
    576 × 448, 448 × 576)."""
    return list(dict.fromkeys(working_size(round(1000 * aspect), 1000) for aspect in ASPECTS))


def nearest_bucket(width: int, height: int, sizes) -> tuple[int, int]:
    """The working size whose aspect ratio is nearest the image's (by log ratio)."""
    aspect = np.log(width / height)
    return min(sizes, key=lambda size: abs(np.log(size[0] / size[1]) - aspect))


# ---------------------------------------------------------------------------------------- boxes and mask


def parse_boxes(text: str, image_size: tuple[int, int]) -> np.ndarray:
    """Lines of 'x1 y1 x2 y2' (normalised, commas allowed, blank lines skipped) → float32[R, 4], checked as user
    boxes are everywhere (`validate_boxes`: inside the image, positive area)."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            rows.append([float(field) for field in fields])
        except ValueError:
            rows.append([])
        if len(rows[-1]) != 4:
            raise BoxError(f"box line {number} ({line.strip()!r}) must be four numbers x1 y1 x2 y2, each from 0 to 1")
    return validate_boxes(rows, image_size, source="the input image")


def format_boxes(boxes) -> str:
    return "\n".join(" ".join(f"{v:.3f}" for v in box) for box in boxes)


def add_corner(corner, boxes_text: str, x: int, y: int, shown_size: tuple[int, int]):
    """A click on pixel (x, y) of the shown input (`shown_size` = (W, H)) → (corner, boxes_text): the first click of
    a pair is kept as the pending corner, the second closes the box that holds both pixels."""
    if corner is None:
        return (x, y), boxes_text
    (x0, y0), (width, height) = corner, shown_size
    box = [min(x0, x) / width, min(y0, y) / height, (max(x0, x) + 1) / width, (max(y0, y) + 1) / height]
    return None, "\n".join(filter(None, [boxes_text.strip(), format_boxes([box])]))


def shown_size(width: int, height: int) -> tuple[int, int]:
    """The size the input is shown at: small images enlarged (a 32 px scene is too small to click on), large ones
    reduced (the page need not carry every pixel)."""
    low, high = SHOWN_SIDES
    scale = min(max(1.0, low / min(width, height)), high / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def shown_input(image: Image.Image, boxes_text: str = "", corner=None) -> Image.Image:
    """The input as the page shows it: scaled by `shown_size`, its boxes drawn, a pending corner marked."""
    size = shown_size(*image.size)
    shown = image.resize(size, Image.NEAREST if size[0] > image.width else Image.BICUBIC)
    draw = ImageDraw.Draw(shown)
    try:
        boxes = parse_boxes(boxes_text, image.size)
    except BoxError:
        boxes = []  # the edit names the bad box; until it is fixed none is drawn
    width, height = size
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1 * width, y1 * height, x2 * width - 1, y2 * height - 1], outline=BOX_COLOUR, width=2)
    if corner is not None:
        x, y = corner
        draw.line([x - 6, y, x + 6, y], fill=CORNER_COLOUR, width=2)
        draw.line([x, y - 6, x, y + 6], fill=CORNER_COLOUR, width=2)
    return shown


def painted_mask(editor_value, size: tuple[int, int]) -> np.ndarray | None:
    """bool[H, W] at `size` = (W, H): where any layer of the mask editor's value is painted (alpha ≥ 128, so a
    lossy canvas export's faint fringe does not count); None if nothing is."""
    layers = [np.asarray(layer) for layer in (editor_value or {}).get("layers") or [] if layer is not None]
    painted = [layer[..., 3] >= 128 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not painted or not np.logical_or.reduce(painted).any():
        return None
    mask = Image.fromarray(np.logical_or.reduce(painted))
    return np.asarray(mask.resize(size, Image.NEAREST) if mask.size != tuple(size) else mask)


def mask_editor_value(image: Image.Image | None, region: np.ndarray | None = None) -> dict | None:
    """The mask editor's value over `image` at its `shown_size` (a 32 px scene is painted enlarged, with a
    brush in proportion; `painted_mask` brings the mask to its size): blank, or with `region` (bool[H, W] at
    the image's size) in its layer, translucent, as the brush paints, so that the user can erase or add to it."""
    if image is None:
        return None
    shown = shown_input(image)
    if region is None:
        return {"background": shown, "layers": [], "composite": shown}
    layer = np.zeros((shown.height, shown.width, 4), np.uint8)
    layer[images.resize_mask(region, shown.size)] = MASK_COLOUR
    overlay = Image.fromarray(layer, "RGBA")
    return {"background": shown, "layers": [overlay], "composite": Image.alpha_composite(shown.convert("RGBA"), overlay)}


def boxes_region(boxes, size: tuple[int, int]) -> np.ndarray:
    """bool[H, W] at `size` = (W, H): the union of the normalised boxes (a box as the mask to edit)."""
    return np.any([images.box_mask(box, size) for box in boxes], axis=0) if len(boxes) else np.zeros(size[::-1], bool)


# ---------------------------------------------------------------------------------------- requests


def load_upload(path: str) -> Image.Image:
    """An uploaded file → RGB PIL; ImageError naming the file as the user called it (not its temporary path)."""
    try:
        return images.load_image(path)
    except images.ImageError:
        raise images.ImageError(
            f"{os.path.basename(path)!r} is not an image this page can read: upload a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None


def add_turn(history: list, source: Image.Image, result: Image.Image, instruction: str) -> list:
    """The history gallery's (image, caption) items after one more turn; the first turn also shows its input."""
    items = list(history) or [(source, "input")]
    return items + [(result, f"{len(items)}. {instruction}")]


class StepProgress:
    """Editor.edit's progress(step): counts the steps reported and moves a Gradio progress bar.

    XLA calls it from its own thread, where the context variables through which Gradio finds the
    request are unset; so each call runs in a copy of the context it was created in.
    """

    def __init__(self, progress, steps: int):
        self.progress, self.steps, self.done = progress, steps, 0
        self._context = contextvars.copy_context()

    def __call__(self, step: int) -> None:
        self.done = step + 1
        self._context.copy().run(self.progress, (self.done, self.steps), desc="denoising", unit="steps")


class EditService:
    """One Editor for every request: one edit at a time, at one of `sizes` (default `bucket_sizes`)."""

    def __init__(self, editor, sizes=None):
        self.editor = editor
        self.sizes = list(sizes or bucket_sizes(editor.working_size))
        self.default_sampler = SAMPLERS[editor.config.model.sampler]
        vlm_boxes = editor.model.conditioner == "vlm" and editor.model.vlm.regions is not None
        self.uses_boxes = vlm_boxes or editor.region_head is not None  # region tokens, or a head's proposals
        self.compiled: set[tuple] = set()  # (working size, steps, sampler) edited at least once
        self._lock = threading.Lock()

    def compile_key(self, image_size: tuple[int, int], steps: int, scheduler: str | None) -> tuple:
        return nearest_bucket(*image_size, self.sizes), int(steps), scheduler or self.default_sampler

    def check(self, source, instruction: str, boxes_text: str, mask_value) -> tuple:
        """The request's (boxes or None, mask or None, notes); ValueError with a message for the page."""
        if source is None:
            raise ValueError("upload an image first (the Upload button)")
        if not instruction.strip():
            raise ValueError("type an instruction, e.g. 'make the red circle blue'")
        boxes, notes = parse_boxes(boxes_text, source.size), []
        if len(boxes) and not self.uses_boxes:
            notes.append("this checkpoint has no region input: the boxes are ignored ('Mask from boxes' makes them "
                         "the mask)")
        return (boxes if len(boxes) and self.uses_boxes else None), painted_mask(mask_value, source.size), notes

    def find_region(self, image: Image.Image, instruction: str, boxes=None, mask=None) -> np.ndarray | None:
        """Where an edit of `image` happens: bool[H, W] at its size, or None (the whole image): `mask` if
        given, else what the checkpoint's region head finds (at the image's working size, so that a new
        image size does not recompile it either; boxes are its proposals), else None."""
        if mask is not None or not self.editor.region_head:
            return mask
        size = nearest_bucket(*image.size, self.sizes)
        with self._lock:
            (found,) = self.editor.find_regions([image.resize(size, Image.BICUBIC)], [instruction], boxes=[boxes])
        return images.resize_mask(found, image.size)

    def edit(self, image: Image.Image, instruction: str, *, steps: int, image_guidance: float, text_guidance: float,
             seed: int, scheduler: str | None = None, boxes=None, mask=None, progress=None) -> tuple:  # fmt: skip
        """(result, region): an edit of `image` (any size; the result has its size) at its working size (the
        nearest of the page's few, so that a new image size does not recompile), and the region it edited
        under (`find_region`: the mask, bool[H, W] at the image's size, or the region head's). Where there is
        a region, the result is the image outside it, pixel for pixel (`images.composite` at the image's
        own size); an empty one leaves the image as it is."""
        key = self.compile_key(image.size, steps, scheduler)
        size = key[0]
        region = self.find_region(image, instruction, boxes, mask)
        if region is not None and not region.any():  # nothing to edit (the region head warned)
            return image.convert("RGB"), region
        with self._lock:
            out = self.editor.edit(
                image.resize(size, Image.BICUBIC), instruction, steps=int(steps), image_guidance=image_guidance,
                text_guidance=text_guidance, seed=int(seed or 0), scheduler=key[2], boxes=boxes, progress=progress or False,
                mask=None if region is None else images.resize_mask(region, size),
            )  # fmt: skip
            self.compiled.add(key)
        out = out.resize(image.size, Image.BICUBIC)
        return (out if region is None else images.composite(image.convert("RGB"), out, region.astype(np.float32))), region

    def warm_up(self, steps: int, scheduler: str | None = None) -> None:
        """Compiles the edit loop of every working size (an empty instruction on a grey image)."""
        for size in self.sizes:
            grey = np.zeros((1, size[1], size[0], 3), np.float32)
            with self._lock:
                self.editor.edit_arrays(grey, [""], steps=int(steps), image_guidance=1.0, text_guidance=1.0,
                                        scheduler=scheduler or self.default_sampler)  # fmt: skip
                self.compiled.add(self.compile_key(size, steps, scheduler))


# ---------------------------------------------------------------------------------------- the page


def import_gradio():
    """gradio, imported with its analytics off (it reads the switch at import)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def describe(service: EditService, checkpoint: str) -> str:
    """The page's header: the checkpoint, how it reads regions and masks, and the working sizes."""
    model = service.editor.model
    kind = "FireEdit (VLM condition)" if model.conditioner == "vlm" else "InstructPix2Pix (CLIP text condition)"
    head = service.editor.region_head
    if model.conditioner == "vlm" and model.vlm.regions is not None:
        boxes = "boxes become its VLM's region tokens"
    else:
        boxes = "boxes are the proposals its region model scores" if head else "no region input: boxes are ignored"
    reads = "its mask encoder reads it too" if model.mask_encoder is not None else "by masked sampling"
    mask = f"a painted mask keeps the image outside it ({reads})"
    if head:
        finder = "its region model" if head == "region" else "its VLM's grounding"
        mask += f"; unpainted, {finder} finds the region, drawn in the mask editor to correct"
    sizes = ", ".join(f"{w}×{h}" for w, h in service.sizes)
    return (f"`{checkpoint}`: {kind}; {boxes}; {mask}. "
            f"Images are edited at {sizes} px (the nearest aspect ratio) and returned at their own size.")  # fmt: skip


def build_app(service: EditService, *, checkpoint: str, steps: int = 100, image_guidance: float = 1.5,
              text_guidance: float = 7.5, seed: int = 0, scheduler: str | None = None):  # fmt: skip
    """The Gradio Blocks page over `service`; `launch` serves it."""
    gr = import_gradio()

    def on_upload(path):
        try:
            image = load_upload(path)
        except images.ImageError as err:
            raise gr.Error(str(err)) from None
        status = f"Uploaded {os.path.basename(path)} ({image.width}×{image.height})."
        return image, shown_input(image), "", None, mask_editor_value(image), None, None, [], [], status

    def on_click(source, corner, boxes_text, event: gr.SelectData):
        if source is None:
            raise gr.Error("upload an image first: then click two corners of each box")
        corner, boxes_text = add_corner(corner, boxes_text, *event.index, shown_size(*source.size))
        return corner, boxes_text, shown_input(source, boxes_text, corner)

    def on_boxes_typed(source, boxes_text):
        return None if source is None else shown_input(source, boxes_text)

    def on_clear_boxes(source):
        return None, "", (None if source is None else shown_input(source))

    def on_edit(source, instruction, boxes_text, mask_value, steps, s_image, s_text, seed, scheduler, history,
                progress=gr.Progress()):  # fmt: skip
        try:
            boxes, mask, notes = service.check(source, instruction, boxes_text, mask_value)
            for note in notes:
                gr.Warning(note)
            key = service.compile_key(source.size, steps, scheduler)
            first = key not in service.compiled
            (width, height), steps, sampler_name = key
            progress(0, desc=f"compiling for {width}×{height}, {steps} steps, {sampler_name}" if first else "denoising")
            reporter, start = StepProgress(progress, steps), time.perf_counter()
            result, region = service.edit(source, instruction, steps=steps, image_guidance=s_image, text_guidance=s_text,
                                  seed=seed, scheduler=scheduler, boxes=boxes, mask=mask, progress=reporter)
        except ValueError as err:  # the user's to fix (e.g. an unknown word): a message, not a traceback
            raise gr.Error(str(err)) from None
        history = add_turn(history, source, result, instruction.strip())
        seconds = f"{time.perf_counter() - start:.1f} s" + (" with compilation" if first else "")
        done = f"{reporter.done}/{steps} denoising steps"
        status = f"Turn {len(history) - 1}: edited at {width}×{height} in {done}, {seconds}"
        if mask is None and region is not None:  # found by the region head: drawn in the mask editor, to be corrected
            status += f". {CORRECT if region.any() else NOTHING_FOUND}"
            return result, result, history, history, status, region
        return result, result, history, history, status, None

    def on_find(source, instruction, boxes_text, mask_value):
        try:
            boxes, _, _ = service.check(source, instruction, boxes_text, mask_value)
            region = service.find_region(source, instruction, boxes)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return region, f"The region found for {instruction.strip()!r}. {CORRECT if region.any() else NOTHING_FOUND}"

    def on_boxes_to_mask(source, boxes_text):
        try:
            boxes = parse_boxes(boxes_text, source.size) if source is not None else []
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if not len(boxes):
            raise gr.Error("click two corners of a box on the input first: 'Mask from boxes' makes the boxes the mask")
        return boxes_region(boxes, source.size), "The boxes are the mask: Edit edits in them."

    def on_drawn(source, region):  # after an event that succeeded (one that failed would mark the editor)
        return gr.update() if region is None or source is None else mask_editor_value(source, region)

    def on_clear_mask(source):
        return mask_editor_value(source), "The mask is cleared."

    def on_edit_again(result, boxes_text):
        if result is None:
            raise gr.Error("edit an image first: 'Edit again' edits the last result")
        return result, shown_input(result, boxes_text), None, mask_editor_value(result), "The result is the new input."

    has_head = service.editor.region_head is not None
    step_choices = sorted({int(steps), *STEP_CHOICES})
    sampler = SAMPLERS[scheduler] if scheduler else service.default_sampler
    with gr.Blocks(title="fireedit_jax") as app:
        source, result, corner, history = gr.State(None), gr.State(None), gr.State(None), gr.State([])
        drawn = gr.State(None)  # a region for the mask editor (found, or boxes), drawn once its event succeeded
        gr.Markdown("## fireedit_jax: instruction-based image editing")
        gr.Markdown(describe(service, checkpoint))
        with gr.Row():
            with gr.Column():
                shown = gr.Image(label="Input: click two corners to add a box", type="pil", interactive=False,
                                 format="png", height=SHOWN_SIDES[0] + 40, elem_id="input-image")  # fmt: skip
                upload = gr.UploadButton("Upload an image", type="filepath", elem_id="upload")
            with gr.Column():
                output = gr.Image(label="Result", type="pil", interactive=False, format="png",
                                  height=SHOWN_SIDES[0] + 40, buttons=["download", "fullscreen"], elem_id="result")
                again = gr.Button("Edit again (the result becomes the input)", elem_id="edit-again")
        with gr.Row():
            instruction = gr.Textbox(label="Instruction", placeholder="make the red circle blue", scale=4,
                                     elem_id="instruction")  # fmt: skip
            run = gr.Button("Edit", variant="primary", scale=1, elem_id="edit")
        status = gr.Markdown("Upload an image to start.", elem_id="status")
        with gr.Accordion("Regions and mask", open=True):
            with gr.Row():
                with gr.Column():
                    boxes = gr.Textbox(label="Boxes: normalised x1 y1 x2 y2, one per line", lines=3,
                                       elem_id="boxes")  # fmt: skip
                    clear = gr.Button("Clear boxes", size="sm", elem_id="clear-boxes")
                with gr.Column():
                    mask = gr.ImageEditor(label="Mask: paint the region to edit", type="numpy", sources=(),
                                          transforms=(), format="png",
                                          layers=gr.LayerOptions(allow_additional_layers=False, layers=["mask"]),
                                          brush=gr.Brush(colors=["rgba(255, 0, 200, 0.6)"], color_mode="fixed"),
                                          elem_id="mask")  # fmt: skip
                    with gr.Row():
                        find_button = gr.Button("Find region", size="sm", visible=has_head, elem_id="find-region")
                        from_boxes = gr.Button("Mask from boxes", size="sm", elem_id="mask-from-boxes")
                        clear_mask = gr.Button("Clear mask", size="sm", elem_id="clear-mask")
        with gr.Accordion("Settings", open=True):
            with gr.Row():
                steps_in = gr.Dropdown(step_choices, value=int(steps), label="Denoising steps", elem_id="steps")
                s_image = gr.Slider(0.0, 5.0, value=image_guidance, step=0.1, label="s_I (image guidance)")
                s_text = gr.Slider(0.0, 15.0, value=text_guidance, step=0.1, label="s_T (text guidance)")
                seed_in = gr.Number(value=seed, precision=0, label="Seed")
                sampler_in = gr.Radio(sorted(set(SAMPLERS.values())), value=sampler, label="Sampler")
        gallery = gr.Gallery(label="History", columns=6, fit_columns=False, height="auto", object_fit="contain",
                             elem_id="history")  # fmt: skip

        upload.upload(on_upload, upload,
                      [source, shown, boxes, corner, mask, result, output, history, gallery, status])  # fmt: skip
        shown.select(on_click, [source, corner, boxes], [corner, boxes, shown])
        boxes.input(on_boxes_typed, [source, boxes], shown)
        clear.click(on_clear_boxes, source, [corner, boxes, shown])
        gr.on([run.click, instruction.submit], on_edit,
              [source, instruction, boxes, mask, steps_in, s_image, s_text, seed_in, sampler_in, history],
              [output, result, gallery, history, status, drawn], concurrency_limit=1
              ).success(on_drawn, [source, drawn], mask)  # fmt: skip
        find_button.click(on_find, [source, instruction, boxes, mask], [drawn, status], concurrency_limit=1
                          ).success(on_drawn, [source, drawn], mask)  # fmt: skip
        from_boxes.click(on_boxes_to_mask, [source, boxes], [drawn, status]).success(on_drawn, [source, drawn], mask)
        clear_mask.click(on_clear_mask, source, [mask, status])
        again.click(on_edit_again, [result, boxes], [source, shown, corner, mask, status])
    return app


def page_css(service: EditService) -> str:
    """Results fill their box; a small checkpoint's (e.g. the 32 px demo's) are enlarged without blurring."""
    css = "#result img { width: 100%; height: 100%; object-fit: contain; }"
    if min(min(size) for size in service.sizes) < 256:
        css += " #result img, #history img { image-rendering: pixelated; }"
    return css


def launch(app, service: EditService, host: str, port: int) -> None:
    """Serves `app` on host:port through one queue (one edit at a time), with no share link, until Ctrl-C."""
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, max_file_size="50mb", quiet=True,
        css=page_css(service),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` sub-command's arguments."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    choices = "/".join(map(str, STEP_CHOICES))
    parser.add_argument("--steps", type=int, default=100, help=f"the default denoising steps (also offered: {choices})")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="the default s_I (1.5)")
    parser.add_argument("--text-guidance", type=float, default=7.5, help="the default s_T (7.5)")
    parser.add_argument("--seed", type=int, default=0, help="the default seed")
    parser.add_argument("--scheduler", choices=sorted(set(SAMPLERS.values())), default=None,
                        help="the default sampler (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")  # fmt: skip
    parser.add_argument("--no-warmup", action="store_true",
                        help="do not compile at start-up (the first edit of each working size then compiles)")


def run(args: argparse.Namespace) -> int:
    try:
        import_gradio()
    except ImportError:
        print("fireedit-jax serve: error: the web UI needs gradio: pip install -e '.[ui]' (scripts/install.sh "
              "installs it)", file=sys.stderr)  # fmt: skip
        return 2
    from fireedit_jax.pipeline import Editor

    service = EditService(Editor.from_pretrained(args.checkpoint, dtype=args.dtype))
    if not args.no_warmup:
        sizes = ", ".join(f"{w}×{h}" for w, h in service.sizes)
        sampler = args.scheduler or service.default_sampler
        print(f"compiling the edit loop for {sizes} px ({args.steps} steps, {sampler})…", flush=True)
        service.warm_up(args.steps, args.scheduler)
    app = build_app(service, checkpoint=args.checkpoint, steps=args.steps, image_guidance=args.image_guidance,
                    text_guidance=args.text_guidance, seed=args.seed, scheduler=args.scheduler)  # fmt: skip
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    launch(app, service, args.host, args.port)
    return 0
