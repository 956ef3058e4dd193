"""Static figure of one head's query/key joint embedding (AttentionViz; heads/qk_embedding.py)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..heads.qk_embedding import QKVectors, joint_embedding, qk_vectors  # noqa: E402


def qk_embedding_figure(qk: QKVectors, path: str | Path, method: str = "pca", color: str = "kind",
                        labels: int = 12, title: str | None = None) -> Path:
    """Queries (dots) and keys (triangles) of one head in one 2-D map, coloured as AttentionViz does (queries
    green, keys pink; `color="kind"`), by token role, or by position; the `labels` tokens whose query lies furthest
    from the centre are written beside it."""
    if color not in ("kind", "role", "position"):
        raise ValueError(f"color is 'kind', 'role' or 'position'; got {color!r}")
    q2, k2 = joint_embedding(qk, method)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    if color == "kind":
        ax.scatter(*q2.T, s=14, color="#2ca02c", marker="o", label="query")
        ax.scatter(*k2.T, s=18, color="#e377c2", marker="^", alpha=0.7, label="key")
    elif color == "role":
        names = sorted(set(qk.roles))
        cmap = plt.get_cmap("tab10")
        for i, role in enumerate(names):
            m = np.array([r == role for r in qk.roles])
            ax.scatter(*q2[m].T, s=14, color=cmap(i % 10), marker="o", label=f"query · {role}")
            ax.scatter(*k2[m].T, s=18, color=cmap(i % 10), marker="^", alpha=0.55, label=f"key · {role}")
    else:
        pos = np.array(qk.positions)
        sc = ax.scatter(*q2.T, s=14, c=pos, cmap="viridis", marker="o", label="query")
        ax.scatter(*k2.T, s=18, c=pos, cmap="viridis", marker="^", alpha=0.55, label="key")
        fig.colorbar(sc, ax=ax, fraction=0.046, label="position")
    for i in np.argsort(-np.linalg.norm(q2 - q2.mean(0), axis=1))[:labels]:
        ax.annotate(qk.tokens[i].replace("Ġ", " ").replace("Ċ", "\\n").strip() or repr(qk.tokens[i]), q2[i], fontsize=6)
    ax.legend(fontsize=6, markerscale=0.8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    inputs = len(set(qk.sample))
    ax.set_title(title or f"{qk.stream} layer {qk.layer} head {qk.head}: queries and keys ({method.upper()}, "
                 f"{len(qk.tokens)} tokens of {inputs} input{'s' if inputs > 1 else ''})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_qk_embedding(model, inputs, layer: int, head: int, path: str | Path, stream: str | None = None,
                      method: str = "pca", **kwargs) -> Path:
    """`qk_vectors` then `qk_embedding_figure`: one call from encoded inputs to a PNG."""
    return qk_embedding_figure(qk_vectors(model, inputs, layer, head, stream), path, method, **kwargs)
