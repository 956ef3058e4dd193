"""Scoring a `Grounding` (attnscope.ground) against an object's exact mask and box, beside the random map.

- pointing: the map's highest cell overlaps the object's mask (the pointing game of "Top-down Neural Attention by
  Excitation Backprop", Zhang et al., at the map's cell resolution; the same rule as `pointing.pointing_game`);
- energy: the share of the map's mass inside the exact mask, each cell's mass spread evenly over its pixels (the
  energy-based pointing game of "Score-CAM", Wang et al., 2020; `pointing.energy_pointing` on explanations);
- box IoU: intersection over union of the grounding's box (`regions.box`) with the object's tight box.
Masks and boxes are in pixels of the model input (scene-vlm: the 224x224 scene itself)."""
from __future__ import annotations

import numpy as np

from .bootstrap import bootstrap
from .pointing import cell_overlap


def _overlap(g, mask) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(g.pixel_size):
        raise ValueError(f"mask is {mask.shape}, the model input is {tuple(g.pixel_size)}; resize the mask to the model "
                         "input first")
    rows, cols = g.map.shape
    h, w = g.pixel_size
    if h % rows == 0 and w % cols == 0:
        return cell_overlap(mask, (rows, cols), (h // rows, w // cols))
    # cells of unequal size: each pixel in the cell `Grounding.pixel_map` puts it in (no pixel left out)
    r = np.minimum((np.arange(h) * rows) // h, rows - 1)
    c = np.minimum((np.arange(w) * cols) // w, cols - 1)
    cell = (r[:, None] * cols + c[None, :]).ravel()
    inside = np.bincount(cell, weights=mask.ravel().astype(np.float64), minlength=rows * cols)
    return (inside / np.bincount(cell, minlength=rows * cols)).reshape(rows, cols)


def pointing(g, mask) -> bool:
    """True when the map's highest cell overlaps the mask."""
    r, c = np.unravel_index(int(np.argmax(g.map)), g.map.shape)
    return bool(_overlap(g, mask)[r, c] > 0)


def energy(g, mask) -> float:
    """Share of the map's mass inside the mask, in [0, 1]."""
    return float((g.map * _overlap(g, mask)).sum() / g.map.sum())


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive ends."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(g, mask, box) -> dict:
    """{"pointing", "energy", "iou"} of one grounding against one object."""
    return {"pointing": float(pointing(g, mask)), "energy": energy(g, mask), "iou": box_iou(g.box, box)}


def summarise(rows: list[dict], groups: list | None = None, n: int = 1000, seed: int = 0) -> dict:
    """Means of each metric over rows (dicts from `score`) with cluster-bootstrap intervals over `groups` (scene ids)."""
    names = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    return bootstrap(rows, lambda rs: {k: float(np.mean([r[k] for r in rs])) for k in names}, groups, n=n, seed=seed,
                     unit="scene")
