"""Input images of any size and mode; clear errors for bad files."""

import numpy as np
import pytest
from PIL import Image

from fireedit_jax import images


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(images.ImageError, match="nope.png.*does not exist"):
        images.load_image(tmp_path / "nope.png")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(images.ImageError, match="notes.png.*not a readable image"):
        images.load_image(bad)


def test_modes_become_rgb(tmp_path):
    gray = Image.fromarray(np.full((5, 7), 100, np.uint8), "L")
    assert np.asarray(images.load_image(gray))[0, 0].tolist() == [100, 100, 100]
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent → white background
    assert np.asarray(images.load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    deep = np.full((6, 6), 65535 // 2, np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(images.load_image(path))[0, 0].tolist() == [127, 127, 127]  # 32767/65535·255 = 127.5 − ε


@pytest.mark.parametrize("w,h,res,want", [(512, 512, 512, (512, 512)), (517, 333, 512, (640, 384)), (64, 64, 64, (64, 64)), (10, 1000, 256, (64, 2560))])
def test_working_size_is_a_multiple_of_64_near_the_resolution(w, h, res, want):
    assert images.working_size(w, h, res) == want


def test_round_trip_restores_size():
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 517, 3), np.uint8))
    array = images.to_model_array(pil, images.working_size(*pil.size, 256))
    assert array.shape == (192, 320, 3) and -1 <= array.min() and array.max() <= 1
    back = images.from_model_array(array, pil.size)
    assert back.size == (517, 333)
    same = images.from_model_array(images.to_model_array(pil, pil.size))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(pil))
