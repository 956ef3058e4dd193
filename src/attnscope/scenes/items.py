"""Item images for the scene world: Fashion-MNIST from the Debian package `dataset-fashion-mnist`.

The 28x28 greyscale items are split so that train, val and test scenes never share an item image:
train scenes draw from the 60,000 training images, val scenes from the first 5,000 test images, test scenes
from the last 5,000. The files are read once per process (about 0.3 s) and kept in memory (55 MB)."""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION_MNIST_ENV = "ATTNSCOPE_FASHION_MNIST"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"

# Fashion-MNIST label order; names are single words where the dataset's are not ("T-shirt/top", "Ankle boot")
# so that captions and object parsing stay unambiguous ("top" is also a position word here).
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir() -> Path:
    """`$ATTNSCOPE_FASHION_MNIST` or the Debian package's folder."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or DEFAULT_DIR)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


@lru_cache(maxsize=2)
def _part(part: str) -> tuple[np.ndarray, np.ndarray]:
    folder = data_dir()
    images, labels = (folder / f for f in _FILES[part])
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}; install it with `{INSTALL}` "
                                f"or point ${FASHION_MNIST_ENV} at a folder holding {', '.join(_FILES[part])}")
    x = _read_idx(images, 16).reshape(-1, 28, 28)
    y = _read_idx(labels, 8)
    if len(x) != len(y):
        raise ValueError(f"{images.name} holds {len(x)} images but {labels.name} {len(y)} labels")
    return x, y


# split -> (file part, index range) ; the ranges never overlap, so no item image is in two splits
SPLIT_SOURCES = {"train": ("train", slice(0, 60000)), "val": ("t10k", slice(0, 5000)), "test": ("t10k", slice(5000, 10000))}


@lru_cache(maxsize=4)
def pool(split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(images [N, 28, 28] uint8, per-class index arrays into them) for a split."""
    if split not in SPLIT_SOURCES:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLIT_SOURCES)}")
    part, rng = SPLIT_SOURCES[split]
    x, y = _part(part)
    x, y = x[rng], y[rng]
    return x, [np.flatnonzero(y == k) for k in range(len(FASHION_CLASSES))]
