"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT license) for the canvas classifier and the scene world.

The package ships the test split (10,000 images and labels, 4.4 MB) and the 60,000 training labels, which is
all that inference, the demo, `attnscope eval pope|chair` and the tests read. The 60,000 training images
(26 MB) are needed only to train or to render training scenes; they are read from `$ATTNSCOPE_FASHION_MNIST`
or from the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`). The first folder
that holds a file wins, so a full copy in either place is used for every file."""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

ENV = "ATTNSCOPE_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_DIR = Path(__file__).resolve().parent / "fashion_mnist"
INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"
FILES = {("train", "images"): "train-images-idx3-ubyte.gz", ("train", "labels"): "train-labels-idx1-ubyte.gz",
         ("t10k", "images"): "t10k-images-idx3-ubyte.gz", ("t10k", "labels"): "t10k-labels-idx1-ubyte.gz"}


def folders() -> list[Path]:
    """Where files are looked for, in order: `$ATTNSCOPE_FASHION_MNIST`, the Debian folder, the bundled copy."""
    env = os.environ.get(ENV)
    return ([Path(env)] if env else []) + [DEBIAN_DIR, BUNDLED_DIR]


def locate(part: str, what: str) -> Path:
    """The file of `part` ("train" or "t10k") and `what` ("images" or "labels"); a clear error if none holds it."""
    if (part, what) not in FILES:
        raise ValueError(f"no Fashion-MNIST file for part {part!r} and {what!r}; parts are train and t10k")
    name = FILES[part, what]
    for folder in folders():
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST {name} not found (looked in {', '.join(map(str, folders()))}); "
                            f"attnscope ships the test split and the training labels only. Install the full set with "
                            f"`{INSTALL}` or point ${ENV} at a folder holding {name}")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped) as a uint8 array of the shape its header gives."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=4)
def load(part: str, what: str) -> np.ndarray:
    """Images [N, 28, 28] or labels [N] of a part, read once per process."""
    return read_idx(locate(part, what))


def clear() -> None:
    """Forget what was read (after changing `$ATTNSCOPE_FASHION_MNIST`)."""
    load.cache_clear()
