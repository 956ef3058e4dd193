import numpy as np
import pytest
from PIL import Image

from attnscope.models.images import MAX_PIXELS, PHOTOS, load_image


@pytest.mark.parametrize("name", PHOTOS)
def test_every_named_photo_loads_as_rgb(name):
    img = load_image(name)
    assert img.mode == "RGB" and min(img.size) >= 200


def test_cmyk_refused_with_fix():
    with pytest.raises(ValueError, match="must be RGB or L; got CMYK"):
        load_image(Image.new("CMYK", (8, 8)))


def test_huge_image_refused():
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(ValueError, match="downscale"):
        load_image(Image.new("L", (side, side)))


def test_unknown_name_lists_photos():
    with pytest.raises(FileNotFoundError, match="chelsea"):
        load_image("no-such-photo")


def test_float_array_refused():
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
