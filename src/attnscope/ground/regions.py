"""From a map over the image-token grid to a box and point prompts, in pixels of the model's input.

Box rule: keep the cells whose value is at least `fraction` of the map's maximum; among the 8-connected components
of those cells take the one holding the most map mass (not the most cells: a big faint blob does not beat the
peak); the box is the pixel extent of its cells, (x0, y0, x1, y1) with exclusive ends, so it always lies in the
image. Points: the `k` highest cells taken greedily, each at least `separation` cells (Chebyshev distance) from
those already taken, at their cells' pixel centres (x, y)."""
from __future__ import annotations

import numpy as np


def cell_size(grid_shape: tuple[int, int], pixel_size: tuple[int, int]) -> tuple[float, float]:
    """(height, width) in pixels of one cell of the grid laid over the model input."""
    return pixel_size[0] / grid_shape[0], pixel_size[1] / grid_shape[1]


def box(grid: np.ndarray, pixel_size: tuple[int, int], fraction: float = 0.5) -> tuple[int, int, int, int]:
    from scipy.ndimage import label

    if not 0 < fraction <= 1:
        raise ValueError(f"box fraction must be in (0, 1]; got {fraction}")
    grid = np.asarray(grid, dtype=np.float64)
    keep = grid >= fraction * grid.max()
    labels, count = label(keep, structure=np.ones((3, 3)))
    masses = [grid[labels == k].sum() for k in range(1, count + 1)]
    best = labels == (1 + int(np.argmax(masses)))
    rows, cols = np.nonzero(best)
    ch, cw = cell_size(grid.shape, pixel_size)
    return (int(round(cols.min() * cw)), int(round(rows.min() * ch)), int(round((cols.max() + 1) * cw)),
            int(round((rows.max() + 1) * ch)))


def points(grid: np.ndarray, pixel_size: tuple[int, int], k: int = 3, separation: int = 2) -> list[tuple[int, int]]:
    if k < 1 or separation < 0:
        raise ValueError(f"points need k >= 1 and separation >= 0; got k={k}, separation={separation}")
    grid = np.asarray(grid, dtype=np.float64)
    order = np.argsort(-grid, axis=None, kind="stable")
    taken: list[tuple[int, int]] = []
    for flat in order:
        r, c = divmod(int(flat), grid.shape[1])
        if all(max(abs(r - r0), abs(c - c0)) >= separation for r0, c0 in taken):
            taken.append((r, c))
            if len(taken) == k:
                break
    ch, cw = cell_size(grid.shape, pixel_size)
    return [(int((c + 0.5) * cw), int((r + 0.5) * ch)) for r, c in taken]
