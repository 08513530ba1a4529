"""blip2.images, the one image loader of the CLI, the runner and the app: accepted formats only, EXIF-upright, RGB."""

import numpy as np
import pytest
from app_support import exif_rotated_jpeg
from PIL import Image, UnidentifiedImageError

from blip2.images import Keyed, image_key, keyed, load_image, open_image


def test_a_file_is_turned_upright_by_its_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated_jpeg())
    im = load_image(path)
    assert im.size == (20, 60) and im.mode == "RGB"
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 55))  # orientation 6: the left half comes on top
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_only_the_accepted_formats_open(tmp_path):
    path = tmp_path / "icon.jpg"  # an ICO file named .jpg: PIL could read it, the loader does not
    Image.new("RGB", (16, 16)).save(path, "ICO")
    with pytest.raises(UnidentifiedImageError):
        open_image(path)
    with pytest.raises(UnidentifiedImageError):
        open_image(b"not an image")


def test_modes_become_rgb_and_keys_follow_the_pixels():
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))  # fully transparent: white once composited
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    grey = np.full((4, 4), 7, np.uint8)
    assert load_image(grey).getpixel((1, 1)) == (7, 7, 7)
    a, b = keyed(Image.new("RGB", (4, 4), (1, 2, 3))), keyed(np.full((4, 4, 3), (1, 2, 3), np.uint8))
    assert a.key == b.key == image_key(a.load())  # the same pixels, however given
    given = Keyed("file-digest", lambda: pytest.fail("loaded although its key was given"))
    assert keyed(given) is given
    with pytest.raises(TypeError, match="an image must be"):
        load_image(3)
