"""Static figures (matplotlib, Agg): attention over images, head grids, attention during generation."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..core.tokens import TokenMap  # noqa: E402


def grid_map(scores: torch.Tensor, tmap: TokenMap, image: int = 0) -> np.ndarray:
    """Scores over a sequence → (rows, cols) array over image `image`'s patch grid."""
    rows, cols = tmap.grids[image]
    return scores.detach().float().cpu().numpy()[tmap.image_positions(image)].reshape(rows, cols)


def _label(token: str) -> str:
    """Readable byte-level BPE pieces (Ġ = space, Ċ = newline)."""
    return token.replace("Ġ", "·").replace("Ċ", "\\n")


def overlay(ax, photo: Image.Image, heat: np.ndarray, title: str = "") -> None:
    """Show `photo` with `heat` (any grid) upsampled over it."""
    ax.imshow(photo)
    h = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    ax.imshow(np.asarray(Image.fromarray(np.uint8(h * 255)).resize(photo.size, Image.BILINEAR)), cmap="inferno", alpha=0.55)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def image_attention_figure(items: list[tuple[str, Image.Image, np.ndarray]], path: Path, title: str) -> Path:
    """One panel per (name, photo, heat grid)."""
    fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 2.9), squeeze=False)
    for ax, (name, photo, heat) in zip(axes[0], items):
        overlay(ax, photo, heat, name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def head_grid_figure(probs: dict[int, torch.Tensor], tokens: list[str], path: Path, title: str) -> Path:
    """Layers × heads grid of small attention matrices; `probs[layer]` is [heads, Q, K]."""
    layers = sorted(probs)
    heads = probs[layers[0]].shape[0]
    fig, axes = plt.subplots(len(layers), heads, figsize=(heads * 0.9, len(layers) * 0.95), squeeze=False)
    for i, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[i][h]
            ax.imshow(probs[layer][h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
            if i == 0:
                ax.set_title(f"H{h}", fontsize=7)
    fig.suptitle(f"{title}\n{' '.join(tokens)[:110]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def generation_figure(rows: torch.Tensor, tokens: list[str], n_prompt: int, path: Path, title: str) -> Path:
    """Attention from the query of each decoding step (rows) over every earlier token (columns).

    `rows` is [steps, K]; `tokens` are the sequence's tokens; step s's query is token n_prompt - 1 + s."""
    data = rows.float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * data.shape[1]), max(2.5, 0.32 * data.shape[0] + 1.2)))
    # a power norm keeps the structure visible next to the first-token sink
    ax.imshow(np.where(data > 0, data, np.nan), cmap="magma", aspect="auto", norm=matplotlib.colors.PowerNorm(0.4))
    ax.set_xticks(range(data.shape[1]), [_label(t) for t in tokens[: data.shape[1]]], rotation=90, fontsize=7)
    queries = [_label(tokens[n_prompt - 1 + s]) for s in range(data.shape[0])]
    ax.set_yticks(range(data.shape[0]), [f"from {q}" for q in queries], fontsize=7)
    ax.axvline(n_prompt - 0.5, color="cyan", lw=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_grid_figure(table, metrics: list[str], path: Path, title: str) -> Path:
    """One layers × heads heat map per metric of a `heads.HeadTable` (its first stream)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    stream = table.rows[0][0]
    layers = sorted({layer for s, layer, _ in table.rows if s == stream})
    for ax, name in zip(axes[0], metrics):
        grid = table.grid(name, stream)[layers].float().numpy()
        if np.nanmin(grid) < 0:  # signed (importance): diverging colours centred on 0
            lim = float(np.nanmax(np.abs(grid)))
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        else:
            im = ax.imshow(grid, cmap="magma", aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
