"""A real labelled ViT classifier with ground-truth masks: Fashion-MNIST items on a larger canvas.

No labelled ViT classifier can be downloaded here, so attnscope ships one: the frozen `dinov2-small`
backbone with a linear head on [CLS ‖ mean of patch tokens] (768 features), trained by
`scripts/train_canvas_classifier.py` on Fashion-MNIST items placed at a random position on a 224x224 canvas.
The item's own pixels are the ground-truth mask, so localisation (pointing game, energy inside the mask) is
measurable, and the item covers only 6-14 % of the canvas, so a map that lights up the whole image fails.

Canvas (defaults chosen for a 16x16 DINOv2 patch grid):
  - background: smooth low-contrast noise (uniform noise in [0, 60], box-blurred with radius 6), so blur and
    mean baselines differ from the background and the classifier cannot key on an all-black field;
  - item: the 28x28 Fashion-MNIST image resized (bilinear) to a random side in [56, 84] px (4-6 patches),
    pasted with `max(background, item)` at a uniformly random position;
  - mask: resized item intensity > 30 (of 255), the pixels that belong to the item;
  - grey replicated to RGB, so the standard DINOv2 processor applies unchanged.

The test split ships with attnscope; training reads the full set (`attnscope.data.fashion_mnist`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from ..data import fashion_mnist as fmnist

CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CANVAS = 224
ITEM = (56, 84)
MASK_THRESHOLD = 30
WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "canvas_fmnist_head.safetensors"


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) of split "train" (60k) or "test" (10k)."""
    part = {"train": "train", "test": "t10k"}.get(split)
    if part is None:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return fmnist.load(part, "images"), fmnist.load(part, "labels")


@dataclass
class CanvasItem:
    image: Image.Image  # RGB canvas
    mask: np.ndarray  # [H, W] bool, the item's pixels
    label: int
    box: tuple[int, int, int, int]  # top, left, height, width of the pasted item
    index: int  # index into the Fashion-MNIST split


def make_canvas(item: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS, sizes: tuple[int, int] = ITEM):
    """Place a 28x28 item on a `canvas`-sized noisy background; returns (RGB image, mask, box)."""
    noise = Image.fromarray(rng.integers(0, 61, (canvas, canvas), dtype=np.uint8))
    background = np.asarray(noise.filter(ImageFilter.BoxBlur(6)), dtype=np.uint8)
    side = int(rng.integers(sizes[0], sizes[1] + 1))
    resized = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.uint8)
    top, left = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
    grey = background.copy()
    region = grey[top : top + side, left : left + side]
    grey[top : top + side, left : left + side] = np.maximum(region, resized)
    mask = np.zeros((canvas, canvas), dtype=bool)
    mask[top : top + side, left : left + side] = resized > MASK_THRESHOLD
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2)), mask, (top, left, side, side)


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` indices of each class, drawn with `seed`, interleaved by class."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))]
    return np.stack(chosen, axis=1).reshape(-1)


def canvas_dataset(split: str, per_class: int, seed: int = 0) -> list[CanvasItem]:
    """A deterministic list of canvases: `per_class` items of each of the 10 classes from `split`."""
    images, labels = fashion_mnist(split)
    rng = np.random.default_rng(10_000 + seed)
    out = []
    for idx in balanced_indices(labels, per_class, seed):
        image, mask, box = make_canvas(images[idx], rng)
        out.append(CanvasItem(image, mask, int(labels[idx]), box, int(idx)))
    return out


class CanvasHead(nn.Module):
    """Linear head over [CLS ‖ mean of patch tokens] of DINOv2's last hidden state ([B, 1 + N, 384])."""

    def __init__(self, hidden: int = 384, classes: int = len(CLASSES)):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, classes)

    @staticmethod
    def features(last_hidden_state: torch.Tensor) -> torch.Tensor:
        return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(1)], dim=-1)

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(last_hidden_state))


def load_canvas_classifier(model=None):
    """`(model, head, info)`: the dinov2-small `Model` (loaded unless given), the trained `CanvasHead` and the
    training record (accuracy, sizes, seed). Logits: `head(model(**x).last_hidden_state)`."""
    from safetensors import safe_open

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing; train it with `python scripts/train_canvas_classifier.py`")
    if model is None:
        from ..models.zoo import load

        model = load("dinov2-small")
    head = CanvasHead()
    with safe_open(str(WEIGHTS), framework="pt") as fh:
        head.load_state_dict({k: fh.get_tensor(k) for k in fh.keys()})
        info = json.loads((fh.metadata() or {}).get("attnscope", "{}"))
    return model, head.eval(), info
