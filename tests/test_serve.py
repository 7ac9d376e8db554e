"""`fireedit-jax serve`'s logic without a browser: working sizes, boxes, mask, history, progress, one edit at a time.

tests/test_serve_browser.py runs the page itself in headless Chromium.
"""

import contextvars
import threading
import time
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fireedit_jax import cli, images, serve
from fireedit_jax.data.proposals import BoxError


class FakeEditor:
    """Editor.edit's signature and what a checkpoint's config tells the page; records the images
    (and masks) it gets and how many edits overlap."""

    def __init__(self, conditioner="vlm", regions=True, resolution=512, region=None):
        self.config = ml_collections.ConfigDict({"resolution": resolution, "model": {"sampler": "ddim"}})
        vlm = types.SimpleNamespace(regions=object() if regions else None)
        self.model = types.SimpleNamespace(conditioner=conditioner, vlm=vlm, mask_encoder=None)
        self.calls, self.active, self.most_active, self.mask = [], 0, 0, None
        self._count = threading.Lock()
        self.region = region  # what its region head finds (None: it has none)
        self.region_head = None if region is None else "region"
        self.found_at = []  # the sizes its region head was given

    def find_regions(self, images_in, instructions, *, boxes=None):
        self.found_at += [image.size for image in images_in]
        return [images.resize_mask(self.region, image.size) for image in images_in]

    def working_size(self, width, height):
        return images.working_size(width, height, self.config.resolution)

    def edit(self, image, instruction, *, steps=100, image_guidance=1.5, text_guidance=7.5, seed=0, scheduler=None,
             boxes=None, mask=None, progress=True):  # fmt: skip
        self.mask = mask
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.05)
        self.calls.append({"size": image.size, "steps": steps, "scheduler": scheduler, "boxes": boxes})
        for step in range(steps):
            if callable(progress):
                progress(step)
        with self._count:
            self.active -= 1
        return Image.fromarray(255 - np.asarray(image))


def test_working_sizes_are_few_and_fixed_points_of_working_size():
    at = lambda resolution, multiple=64: lambda w, h: images.working_size(w, h, resolution, multiple)  # noqa: E731
    assert serve.bucket_sizes(at(512)) == [(512, 512), (576, 448), (448, 576)]
    assert serve.bucket_sizes(at(32, 4)) == [(32, 32), (36, 28), (28, 36)]  # the demo checkpoint: sides multiples of 4
    for resolution, multiple in ((32, 4), (32, 64), (256, 64), (512, 64), (768, 64)):
        for size in serve.bucket_sizes(at(resolution, multiple)):
            assert at(resolution, multiple)(*size) == size  # the Editor keeps the size it is given
    sizes = serve.bucket_sizes(at(512))
    assert serve.nearest_bucket(1920, 1080, sizes) == (576, 448)
    assert serve.nearest_bucket(333, 517, sizes) == (448, 576)
    assert serve.nearest_bucket(1000, 990, sizes) == (512, 512)


def test_boxes_parse_and_a_bad_box_is_named():
    boxes = serve.parse_boxes("0.1 0.2 0.5 0.6\n\n 0.25, 0.25, 1, 0.9 \n", (32, 32))
    np.testing.assert_allclose(boxes, [[0.1, 0.2, 0.5, 0.6], [0.25, 0.25, 1, 0.9]], rtol=1e-6)
    assert serve.parse_boxes("", (32, 32)).shape == (0, 4)
    with pytest.raises(BoxError, match=r"outside the image.*\[0, 1\]") as err:
        serve.parse_boxes("0.1 0.1 0.2 0.2\n0.5 0.5 1.4 0.9", (32, 32))
    assert "box 1" in str(err.value) and "in a 32×32 image" in str(err.value)
    for bad in ("0.1 0.2 0.5", "a b c d", "0.1 0.2 0.3 0.4 0.5"):
        with pytest.raises(BoxError, match="must be four numbers"):
            serve.parse_boxes(bad, (32, 32))
    with pytest.raises(BoxError, match="zero area"):
        serve.parse_boxes("0.5 0.5 0.5 0.9", (32, 32))


def test_two_clicks_make_a_box_that_holds_both_pixels_and_it_is_drawn():
    shown = serve.shown_size(32, 32)
    assert shown == (320, 320)  # a 32 px scene is enlarged to be clicked on
    assert serve.shown_size(4000, 3000) == (768, 576) and serve.shown_size(500, 400) == (500, 400)
    corner, text = serve.add_corner(None, "", 200, 40, shown)
    assert corner == (200, 40) and text == ""
    corner, text = serve.add_corner(corner, text, 63, 159, shown)  # the second corner above and left of the first
    assert corner is None
    np.testing.assert_allclose(serve.parse_boxes(text, (32, 32)), [[63 / 320, 40 / 320, 201 / 320, 160 / 320]],
                               atol=1e-3)  # fmt: skip
    _, two = serve.add_corner((0, 0), text, 319, 319, shown)
    assert two.splitlines() == [text, "0.000 0.000 1.000 1.000"]

    scene = Image.new("RGB", (32, 32), (200, 200, 200))
    picture = np.asarray(serve.shown_input(scene, "0.25 0.25 0.75 0.75", corner=(10, 300)))
    assert picture.shape == (320, 320, 3)
    assert tuple(picture[80, 160]) == serve.BOX_COLOUR and tuple(picture[160, 160]) == (200, 200, 200)
    assert tuple(picture[300, 10]) == serve.CORNER_COLOUR
    unreadable = np.asarray(serve.shown_input(scene, "0.5 0.5 1.4 0.9"))
    assert (unreadable == 200).all()  # a bad box is not drawn (the edit names it)


def test_painted_mask_is_the_union_of_the_layers_at_the_image_size():
    layer = np.zeros((40, 60, 4), np.uint8)
    other = layer.copy()
    layer[5:10, 5:20, 3] = 255
    other[30:35, 50:55, 3] = 200
    other[0:2, 0:2, 3] = 60  # a faint fringe of a lossy export
    mask = serve.painted_mask({"background": None, "layers": [layer, other], "composite": None}, (60, 40))
    assert mask.dtype == bool and mask.shape == (40, 60)
    assert mask.sum() == 5 * 15 + 5 * 5 and not mask[0, 0] and mask[7, 10] and mask[32, 52]
    assert serve.painted_mask({"layers": [layer]}, (30, 20)).shape == (20, 30)  # the canvas at another scale
    assert serve.painted_mask({"layers": [np.zeros((8, 8, 4), np.uint8)]}, (8, 8)) is None
    assert serve.painted_mask({"background": layer, "layers": []}, (8, 8)) is None
    assert serve.painted_mask(None, (8, 8)) is None


def test_a_found_region_is_drawn_in_the_mask_editor_as_painted_and_reads_back():
    """A region head's region goes into the mask editor's layer at the shown size, translucent like the brush: the
    user corrects it there, and `painted_mask` reads back the same region (a box too: 'Mask from boxes')."""
    for size in ((32, 32), (500, 300), (300, 500)):
        image = Image.new("RGB", size, (40, 90, 200))
        region = np.zeros(size[::-1], bool)
        region[size[1] // 4 : size[1] // 2, size[0] // 3 : size[0] - 4] = True
        value = serve.mask_editor_value(image, region)
        (layer,) = value["layers"]
        assert layer.size == value["background"].size == serve.shown_size(*size) and layer.mode == "RGBA"
        alpha = np.asarray(layer)[..., 3]
        assert set(np.unique(alpha)) == {0, serve.MASK_COLOUR[3]}  # translucent where found, clear elsewhere
        back = serve.painted_mask(value, size)
        if size == (32, 32):  # enlarged ten times: exactly the region
            np.testing.assert_array_equal(back, region)
        else:  # reduced: the region up to a pixel at its edges
            assert (back != region).mean() < 0.01 and back[region].mean() > 0.97
        composite = np.asarray(value["composite"].convert("RGB")).astype(int)
        shown = np.asarray(value["background"].convert("RGB")).astype(int)
        assert (composite[alpha > 0] != shown[alpha > 0]).any() and (composite[alpha == 0] == shown[alpha == 0]).all()
    assert serve.mask_editor_value(image)["layers"] == [] and serve.mask_editor_value(None) is None

    boxes = np.array([[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0]])
    union = serve.boxes_region(boxes, (40, 20))
    expected = np.zeros((20, 40), bool)
    expected[:10, :10] = expected[10:, 20:] = True
    np.testing.assert_array_equal(union, expected)
    assert not serve.boxes_region(np.zeros((0, 4)), (40, 20)).any()


def test_history_keeps_the_input_and_every_turn():
    source, first, second = (Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue"))
    history = serve.add_turn([], source, first, "make it green")
    assert [caption for _, caption in history] == ["input", "1. make it green"] and history[0][0] is source
    history = serve.add_turn(history, first, second, "make it blue")  # "Edit again": the result is the input
    assert [caption for _, caption in history] == ["input", "1. make it green", "2. make it blue"]
    assert history[-1][0] is second


def test_step_progress_runs_in_the_requests_context_from_another_thread():
    request = contextvars.ContextVar("request", default=None)
    seen = []
    request.set("event 7")
    reporter = serve.StepProgress(lambda value, **kw: seen.append((request.get(), value, kw["desc"])), steps=3)
    request.set(None)  # what XLA's callback thread sees
    thread = threading.Thread(target=lambda: [reporter(step) for step in range(3)])
    thread.start()
    thread.join()
    assert seen == [("event 7", (i, 3), "denoising") for i in (1, 2, 3)] and reporter.done == 3


def test_the_service_edits_one_request_at_a_time_at_its_working_size():
    editor = FakeEditor(resolution=512)
    service = serve.EditService(editor)
    assert service.uses_boxes and service.default_sampler == "ddim"
    landscape = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), np.uint8))
    results = []

    def edit():
        results.append(service.edit(landscape, "make it blue", steps=3, image_guidance=1.5, text_guidance=7.5, seed=0))

    threads = [threading.Thread(target=edit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert editor.most_active == 1  # the lock: never two edits (two compilations) at once
    assert [call["size"] for call in editor.calls] == [(576, 448)] * 3  # 5:3 is edited at the 4:3 working size
    assert all(result.size == (500, 300) and region is None for result, region in results)  # at its own size
    assert service.compiled == {((576, 448), 3, "ddim")}
    assert service.compile_key((640, 480), 3, None) in service.compiled  # another 4:3 upload compiles nothing new
    assert service.compile_key((640, 480), 3, "euler_ancestral") not in service.compiled

    mask = np.zeros((300, 500), bool)
    masked = serve.EditService(FakeEditor())
    mask[100:200, 250:] = True
    out, region = masked.edit(landscape, "make it blue", steps=1, image_guidance=1, text_guidance=1, seed=0, mask=mask)
    assert region is mask  # the painted mask is what it edited under
    assert masked.editor.mask.shape == (448, 576) and masked.editor.mask.dtype == bool
    assert masked.editor.mask[:, 300:].any() and not masked.editor.mask[:, :280].any()
    source, out = np.asarray(landscape), np.asarray(out)  # composited at the upload's own size
    np.testing.assert_array_equal(out[~mask], source[~mask])
    assert np.abs(out[mask].astype(int) - source[mask]).mean() > 50  # the (inverting) edit inside

    # a checkpoint with a region head, no mask painted: it edits where the head says, the rest kept
    found = serve.EditService(FakeEditor(region=mask))
    out, region = found.edit(landscape, "make it blue", steps=1, image_guidance=1, text_guidance=1, seed=0)
    assert found.editor.mask.shape == (448, 576) and found.editor.found_at == [(576, 448)]  # found at the working size
    np.testing.assert_array_equal(region, mask)  # returned at the upload's size, to be drawn and corrected
    np.testing.assert_array_equal(np.asarray(out)[~mask], source[~mask])
    np.testing.assert_array_equal(found.find_region(landscape, "make it blue"), mask)  # 'Find region': no edit
    assert len(found.editor.calls) == 1 and found.find_region(landscape, "make it blue", mask=~mask) is not None
    assert serve.EditService(FakeEditor()).find_region(landscape, "make it blue") is None  # no head: the whole image
    nothing = serve.EditService(FakeEditor(region=np.zeros((300, 500), bool)))
    out, region = nothing.edit(landscape, "make it blue", steps=1, image_guidance=1, text_guidance=1, seed=0)
    assert nothing.editor.calls == [] and np.array_equal(np.asarray(out), source) and not region.any()


def test_a_request_gets_a_message_for_what_is_missing_or_ignored():
    service = serve.EditService(FakeEditor())
    scene = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="upload an image first"):
        service.check(None, "make it blue", "", None)
    with pytest.raises(ValueError, match="type an instruction"):
        service.check(scene, "  ", "", None)
    with pytest.raises(BoxError, match="outside the image"):
        service.check(scene, "make it blue", "-0.2 0 0.5 0.5", None)
    boxes, mask, notes = service.check(scene, "make it blue", "0 0 0.5 0.5", None)
    assert boxes.shape == (1, 4) and mask is None and notes == []
    for editor in (FakeEditor(conditioner="clip_text"), FakeEditor(regions=False)):
        boxes, _, notes = serve.EditService(editor).check(scene, "make it blue", "0 0 0.5 0.5", None)
        assert boxes is None and len(notes) == 1 and notes[0].startswith("this checkpoint has no region input")
        assert "'Mask from boxes' makes them the mask" in notes[0]
    boxes, _, notes = serve.EditService(FakeEditor(conditioner="clip_text", region=np.ones((8, 8), bool))).check(
        scene, "make it blue", "0 0 0.5 0.5", None)  # fmt: skip
    assert boxes.shape == (1, 4) and notes == []  # a region head scores them as its proposals
    header = serve.describe(serve.EditService(FakeEditor(conditioner="clip_text", region=np.ones((8, 8), bool))), "c")
    assert "boxes are the proposals its region model scores" in header and "its region model finds the region" in header
    assert "finds the region" not in serve.describe(serve.EditService(FakeEditor()), "c")


def test_a_file_that_is_no_image_is_named_as_the_user_called_it(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(images.ImageError) as err:
        serve.load_upload(str(tmp_path / "notes.png"))
    assert str(err.value).startswith("'notes.png' is not an image") and str(tmp_path) not in str(err.value)


def test_serve_command_defaults_to_loopback_and_says_how_to_install_gradio(monkeypatch, capsys):
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "ckpt"])
    assert (args.host, args.port, args.steps, args.no_warmup) == ("127.0.0.1", 7860, 100, False)

    def no_gradio():
        raise ImportError("No module named 'gradio'")

    monkeypatch.setattr(serve, "import_gradio", no_gradio)
    assert cli.main(["serve", "--checkpoint", "ckpt"]) == 2
    assert "pip install -e '.[ui]'" in capsys.readouterr().err
