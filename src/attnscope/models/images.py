"""Real photos by name (scikit-image, scikit-learn, matplotlib sample data), and checked image loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera", "china", "flower", "grace_hopper")


def _photo_array(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            return np.asarray(Image.open(fh).convert("RGB"))
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def load_image(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """Return an RGB PIL image from a photo name, a file path, a PIL image or an HxW(x3) uint8 array.

    Greyscale (L) is converted to RGB; other modes with no clear meaning (CMYK, I;16, ...) are refused."""
    if isinstance(image, str) and image in PHOTOS:
        image = _photo_array(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image array must be uint8 HxW or HxWx3; got {image.dtype} with shape {image.shape}")
        image = Image.fromarray(image)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file or photo named {str(image)!r}; photos: {', '.join(PHOTOS)}")
        try:
            with Image.open(path) as img:
                _check_size(img)
                image = img.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises these for unreadable/truncated files
            raise ValueError(f"{str(image)!r} is not an image file PIL can read ({type(err).__name__}: {err}); "
                             "pass a PNG/JPEG/... file or a photo name") from None
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a photo name, path, PIL image or uint8 array; got {type(image).__name__}")
    _check_size(image)
    if image.mode == "L":
        return image.convert("RGB")
    if image.mode == "RGBA":
        return image.convert("RGB")
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB or L; got {image.mode}. Convert it first: img.convert('RGB')")
    return image


def _check_size(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, above the {MAX_PIXELS} limit; downscale it first")
    if w < 1 or h < 1:
        raise ValueError("image is empty")
