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
from .data import check_row, is_pad  # noqa: E402


def grid_map(scores: torch.Tensor, tmap: TokenMap, image: int = 0, keys: list[int] | None = None) -> np.ndarray:
    """Scores → (rows, cols) array over image `image`'s patch grid. `scores` cover the whole sequence, or only the
    positions `keys` (a capture with `keys=` a role or positions); positions not covered are 0."""
    if not tmap.grids:
        raise ValueError("these tokens hold no image patch grid (a text stream?); plot them as bars instead")
    if not 0 <= image < len(tmap.grids):
        raise IndexError(f"image {image} is out of range: the sequence holds {len(tmap.grids)} image(s)")
    values = scores.detach().float().cpu().numpy().reshape(-1)
    if keys is not None or len(values) != len(tmap):
        if keys is None or len(keys) != len(values):
            raise ValueError(f"{len(values)} scores for a sequence of {len(tmap)} tokens; pass keys= (the positions "
                             "the scores belong to)")
        full = np.zeros(len(tmap), dtype=np.float32)
        full[list(keys)] = values
        values = full
    rows, cols = tmap.grids[image]
    return values[tmap.image_positions(image)].reshape(rows, cols)


def head_scores(trace, stream: str | None = None, layer: int = -1, head: int | str = "mean", query: int | str = "cls",
                step: int = 0, run: int = -1, row: int = 0) -> tuple[np.ndarray, TokenMap, dict]:
    """One captured attention row over the whole sequence: (scores [N] with 0 at keys not captured, the TokenMap,
    a description), labelled with the tokens batch row `row` held at `step`. `head` is a captured head index or "mean"/"max" over the captured heads; `query` is an absolute
    position (negative counts from the end), or "cls" / "last" / any role (its first captured position; "last":
    the last captured query that is not padding). The description's "pad" says the query is a padding position,
    whose row is no token's attention. Raises KeyError naming what was captured when the head or query is missing."""
    streams = sorted({s for s, _ in trace.run(run).records})
    stream = stream or (streams[0] if len(streams) == 1 else None)
    if stream is None:
        raise KeyError(f"the trace holds several streams {streams}; pass stream=")
    layer = trace.layer_index(stream, layer, run)
    rec = trace.record(stream, layer, step, 0, run)
    check_row(row, rec.probs.shape[0])
    tmap = trace.tokens(stream, row, run, step=step)  # what the row held at that step (beam search changes it)
    if query == "last":  # a right-padded row ends in padding: its last token's row
        q = next((p for p in reversed(rec.queries) if not is_pad(tmap, p)), rec.queries[-1])
    elif isinstance(query, str):
        wanted = [p for p in tmap.positions(query) if p in rec.queries]
        if not wanted:
            raise KeyError(f"no captured query has the role {query!r}; captured query positions: {rec.queries[:12]}")
        q = wanted[0]
    else:
        q = query % len(tmap) if query < 0 else query
    if q not in rec.queries:
        raise KeyError(f"query {q} was not captured at ({stream!r}, layer {layer}); captured: {rec.queries[:12]}")
    probs = rec.probs[row, :, rec.queries.index(q)].float()  # [heads, K]
    if head in ("mean", "max"):
        values = probs.mean(0) if head == "mean" else probs.max(0).values
    else:
        if head not in rec.heads:
            raise KeyError(f"head {head} was not captured at ({stream!r}, layer {layer}); captured: {rec.heads}")
        values = probs[rec.heads.index(head)]
    full = np.zeros(len(tmap), dtype=np.float32)
    keys = list(range(values.shape[0])) if rec.keys is None else rec.keys
    full[keys] = values.cpu().numpy()
    pad = is_pad(tmap, q)
    return full, tmap, {"stream": stream, "layer": layer, "head": head, "query": q, "step": step, "pad": pad}


def plot_trace(trace, stream: str | None = None, layer: int = -1, head: int | str = "mean", query: int | str = "cls",
               image=None, ax=None, step: int = 0, run: int = -1, image_index: int = 0, row: int = 0):
    """Draw one captured attention row (`head_scores`) of batch row `row`: over the image's patch grid (a heat map on
    `image` if given: a photo name, path, PIL image or array, stretched to the grid; else the grid alone) with a colour
    bar in attention probability, or as a bar per token for streams without an image grid (padding keys greyed). A
    padding query's row is drawn grey and its title says it is no token's attention. Returns the figure."""
    scores, tmap, info = head_scores(trace, stream, layer, head, query, step, run, row)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.6, 4.0) if tmap.grids else (max(6, 0.35 * len(tmap)), 3.2))
    label = (f"{info['stream']} layer {info['layer']}, head {info['head']}, from {_label(tmap.tokens[info['query']])} "
             f"(position {info['query']})")
    if info["pad"]:
        label += "\n" + PAD_ROW
    if tmap.grids:
        heat = grid_map(torch.from_numpy(scores), tmap, image_index)
        if image is not None:
            from ..models.images import load_image

            photo = load_image(image)
            ax.imshow(photo)
            im = ax.imshow(heat, cmap="Greys_r" if info["pad"] else "inferno", alpha=0.55,
                           extent=(0, photo.size[0], photo.size[1], 0), interpolation="bilinear")
        else:
            im = ax.imshow(heat, cmap="Greys_r" if info["pad"] else "inferno")
        ax.axis("off")
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    else:
        pads = [r == "pad" for r in tmap.roles]
        ax.bar(range(len(scores)), scores, color=["#bbb" if info["pad"] or p else "#48c" for p in pads])
        ax.set_xticks(range(len(scores)), [_label(t) for t in tmap.tokens], rotation=90, fontsize=7)
        for tick, p in zip(ax.get_xticklabels(), pads):
            tick.set_color("#999" if p else "#000")
        ax.set_ylabel("attention probability", fontsize=7)
    ax.set_title(label, fontsize=7)
    if fig is not None:
        fig.tight_layout()
    return ax.figure


PAD_ROW = "padding query: its row is not a token's attention"


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
