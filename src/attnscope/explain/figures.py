"""Figures for the demo: methods side by side on the bundled photos, and sink-aware maps before/after.

Drawn with matplotlib (Agg) directly, so explain/ does not depend on viz/ (viz sits downstream)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left", "grace_hopper")
METHODS = (("raw", {}), ("rollout", {}), ("rollout", {"sinks": "discount"}), ("gradattn", {}), ("lrp", {}),
           ("gradcam", {}), ("ig", {}))


def _label(method: str, params: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{method}\n{extra}" if extra else method


def _overlay(ax, photo, heat: np.ndarray, title: str, sinks=(), cell=None, scale=(1.0, 1.0)) -> None:
    import matplotlib.patches as mpatches

    ax.imshow(photo)
    h = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    ax.imshow(h, cmap="inferno", alpha=0.6, extent=(0, photo.size[0], photo.size[1], 0))
    for r, c in sinks:
        ax.add_patch(mpatches.Rectangle((c * cell[1] * scale[1], r * cell[0] * scale[0]), cell[1] * scale[1],
                                        cell[0] * scale[0], fill=False, ec="cyan", lw=1.2))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def comparison_figure(out: str | Path, photos=PHOTOS, methods=METHODS, model=None, saliency: bool = True) -> Path:
    """Rows = photos, columns = methods (+ the saliency head), DINOv2-S CLS-embedding target. Writes
    `out/explain_methods.png` (or `out` itself when it ends in .png) and returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..models.images import load_image
    from ..models.zoo import load
    from . import explain

    out = Path(out)
    path = out if out.suffix == ".png" else out / "explain_methods.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model or load("dinov2-small")
    cols = len(methods) + 1 + int(saliency)
    fig, axes = plt.subplots(len(photos), cols, figsize=(1.9 * cols, 1.9 * len(photos) + 0.6), squeeze=False)
    for row, name in enumerate(photos):
        photo = load_image(name)
        x = model.encode(image=photo)
        axes[row][0].imshow(photo)
        axes[row][0].set_title(name, fontsize=7)
        axes[row][0].axis("off")
        for col, (method, params) in enumerate(methods, start=1):
            e = explain(model, x, method=method, **params)
            _overlay(axes[row][col], photo, _resize(e.image_map(), photo), _label(method, params) if row == 0 else "")
        if saliency:
            from ..evaluate.agreement import saliency_map

            _overlay(axes[row][-1], photo, _resize(saliency_map(model, x), photo), "saliency head" if row == 0 else "")
    fig.suptitle("dinov2-small, target: CLS embedding (projection on itself)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _resize(heat: np.ndarray, photo) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(photo.size[1], photo.size[0]), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def sinks_figure(out: str | Path, photos=PHOTOS, model=None) -> tuple[Path, dict]:
    """Before/after of the sink-aware maps: rollout and raw last-layer attention, plain and with sinks discounted,
    sinks boxed in cyan. Returns (path, {photo: {"sinks": [(row, col), ...], "top_before": .., "top_after": ..}})."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..models.images import load_image
    from ..models.zoo import load
    from . import explain

    out = Path(out)
    path = out if out.suffix == ".png" else out / "explain_sinks.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model or load("dinov2-small")
    pairs = (("rollout", {}), ("rollout", {"sinks": "discount"}), ("gradattn", {}), ("gradattn", {"sinks": "discount"}))
    fig, axes = plt.subplots(len(photos), len(pairs), figsize=(2.1 * len(pairs), 2.0 * len(photos) + 0.5), squeeze=False)
    facts = {}
    for row, name in enumerate(photos):
        photo = load_image(name)
        x = model.encode(image=photo)
        for col, (method, params) in enumerate(pairs):
            e = explain(model, x, method=method, **params)
            sinks = [e.tokens.patch[p][1:] for p in e.tokens.sinks if e.tokens.patch[p] is not None]
            scale = (photo.size[1] / e.pixel_size[0], photo.size[0] / e.pixel_size[1])
            _overlay(axes[row][col], photo, _resize(e.image_map(), photo),
                     (_label(method, params).replace("\n", " ") if row == 0 else "") + ("" if col else f"\n{name}"),
                     sinks, e.patch, scale)
            top = e.top(1, roles=("image",))[0][0]
            entry = facts.setdefault(name, {"sinks": sinks})
            entry[f"top_{method}_{params.get('sinks', 'keep')}"] = e.tokens.patch[top][1:]
    fig.suptitle("dinov2-small: sink-aware maps (cyan: detected sink patches)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, facts


def demo_figures(out: str | Path) -> dict:
    """Both figures into `out`; returns a summary for the demo's summary.json."""
    from ..models.zoo import load

    model = load("dinov2-small")
    comparison = comparison_figure(out, model=model)
    sinks, facts = sinks_figure(out, model=model)
    return {"figures": [comparison.name, sinks.name], "sinks": facts}
