"""Item images for the scene world: Fashion-MNIST (`attnscope.data.fashion_mnist`).

The 28x28 greyscale items are split so that train, val and test scenes never share an item image:
train scenes draw from the 60,000 training images, val scenes from the first 5,000 test images, test scenes
from the last 5,000. Val and test scenes (everything inference and evaluation use) need only the bundled test
split; laying out a training scene needs only the bundled training labels; rendering one needs the full
training images (see `attnscope.data.fashion_mnist`)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..data import fashion_mnist

FASHION_MNIST_ENV = fashion_mnist.ENV

# Fashion-MNIST label order; names are single words where the dataset's are not ("T-shirt/top", "Ankle boot")
# so that captions and object parsing stay unambiguous ("top" is also a position word here).
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


# split -> (file part, index range) ; the ranges never overlap, so no item image is in two splits
SPLIT_SOURCES = {"train": ("train", slice(0, 60000)), "val": ("t10k", slice(0, 5000)), "test": ("t10k", slice(5000, 10000))}


def _check(split: str) -> tuple[str, slice]:
    if split not in SPLIT_SOURCES:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLIT_SOURCES)}")
    return SPLIT_SOURCES[split]


@lru_cache(maxsize=4)
def by_class(split: str) -> list[np.ndarray]:
    """Per-class index arrays into a split's images (labels only: no image file is read)."""
    part, rng = _check(split)
    y = fashion_mnist.load(part, "labels")[rng]
    return [np.flatnonzero(y == k) for k in range(len(FASHION_CLASSES))]


def images(split: str) -> np.ndarray:
    """A split's item images [N, 28, 28] uint8."""
    part, rng = _check(split)
    return fashion_mnist.load(part, "images")[rng]


def pool(split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(images [N, 28, 28] uint8, per-class index arrays into them) for a split."""
    return images(split), by_class(split)


def clear() -> None:
    """Forget what was read (after changing `$ATTNSCOPE_FASHION_MNIST`)."""
    fashion_mnist.clear()
    by_class.cache_clear()
