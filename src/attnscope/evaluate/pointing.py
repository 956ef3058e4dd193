"""Localisation against a ground-truth mask: the pointing game and energy-based pointing.

Papers: "Top-down Neural Attention by Excitation Backprop" (Zhang et al., 2016/2018) for the pointing game - a hit
when the map's maximum falls on the object; "Score-CAM" (Wang et al., 2020) for the energy-based pointing game -
the share of the map's (positive) energy that falls inside the object's mask.

Both are computed at patch resolution for every method, so pixel-level methods (gradient x input, integrated
gradients, summed per patch) and patch-level methods are compared on equal terms: the map is the explanation's
patch grid, each patch covering its own pixels of the model input.

Defaults, and why: `tolerance=0` px - a hit when the top patch overlaps the mask at all (a patch is already 14 px,
about the 15 px tolerance of Zhang et al.); the energy uses the positive part of the map (negative evidence is
not "energy"), and a map with no positive value scores 0."""
from __future__ import annotations

import numpy as np


def _mask(expl, mask) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if expl.pixel_size is None:
        raise ValueError("localisation needs an image explanation")
    if mask.shape != tuple(expl.pixel_size):
        raise ValueError(f"mask is {mask.shape}, the model input is {tuple(expl.pixel_size)}; resize the mask to the "
                         "model input (the processor's size) first")
    return mask


def patch_overlap(expl, mask, image: int = 0) -> np.ndarray:
    """Fraction of each patch's pixels inside the mask, shape (rows, cols)."""
    mask = _mask(expl, mask)
    return cell_overlap(mask, expl.tokens.grids[image], expl._cell())


def cell_overlap(mask: np.ndarray, grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    """Fraction of each (ph x pw)-pixel cell of a rows x cols grid (from the top left) inside a boolean mask."""
    (rows, cols), (ph, pw) = grid, cell
    cut = np.asarray(mask, dtype=bool)[: rows * ph, : cols * pw].reshape(rows, ph, cols, pw)
    return cut.mean(axis=(1, 3))


def pointing_game(expl, mask, tolerance: int = 0, image: int = 0) -> bool:
    """True when the highest-scoring patch overlaps the mask dilated by `tolerance` pixels."""
    mask = _mask(expl, mask)
    if tolerance > 0:
        from scipy.ndimage import binary_dilation

        mask = binary_dilation(mask, iterations=int(tolerance))
    grid = expl.grid(image)
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return bool(patch_overlap(expl, mask, image)[r, c] > 0)


def energy_pointing(expl, mask, image: int = 0) -> float:
    """Share of the positive map energy inside the mask (pixel-weighted at patch resolution), in [0, 1]."""
    overlap = patch_overlap(expl, mask, image)
    grid = np.clip(expl.grid(image), 0, None)
    total = float(grid.sum())
    return float((grid * overlap).sum() / total) if total > 0 else 0.0
