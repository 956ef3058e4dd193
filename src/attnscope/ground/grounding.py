"""`Grounding`: where in the image a question (or one of its words) points, as a map, a box and point prompts.

`map` is a grid over the image tokens of the model's input (rows, cols; scene-vlm: 8x8, each cell 28x28 pixels of
its 224x224 input), non-negative and summing to 1. `box` and `points` are in pixels of the model's input, (x, y)
with x to the right (see `regions.py` for the rules); `scale(size)` maps them to another image size (the photo's)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import regions

FORMAT = "attnscope.grounding/1"


@dataclass
class Grounding:
    map: np.ndarray
    pixel_size: tuple[int, int]  # (height, width) of the model input the grid covers
    method: str
    params: dict
    question: str
    target: str | None = None
    queries: list = field(default_factory=list)  # language positions whose attention was read
    cost: dict = field(default_factory=dict)  # forwards / backwards of the model
    model: str = ""
    extras: dict = field(default_factory=dict)
    box_fraction: float = 0.5
    n_points: int = 3
    separation: int = 2
    photo: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        grid = np.asarray(self.map, dtype=np.float64)
        if grid.ndim != 2 or not np.isfinite(grid).all():
            raise ValueError(f"a grounding map is a finite 2-D grid; got shape {grid.shape}")
        grid = np.clip(grid, 0, None)
        total = grid.sum()
        self.map = grid / total if total > 0 else np.full_like(grid, 1.0 / grid.size)
        self.pixel_size = tuple(int(v) for v in self.pixel_size)

    def __repr__(self) -> str:
        return (f"Grounding({self.method!r}, question={self.question!r}, target={self.target!r}, box={self.box}, "
                f"points={self.points})")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends, pixels of the model input."""
        return regions.box(self.map, self.pixel_size, self.box_fraction)

    @property
    def points(self) -> list[tuple[int, int]]:
        """Point prompts (x, y): the map's peaks with a minimum separation, pixels of the model input."""
        return regions.points(self.map, self.pixel_size, self.n_points, self.separation)

    def scale(self, size: tuple[int, int]):
        """(box, points) in an image of `size` = (width, height) (a PIL size), e.g. the photo the model input came from;
        exact when the processor resized the whole photo (scene-vlm does), not when it center-cropped it."""
        if self.extras.get("center_cropped"):
            raise ValueError("the model's image processor center-cropped the photo, so the box and points (pixels of "
                             "the model input) do not map back to the photo by scaling; resize the photo to the model "
                             "input first")
        # integer arithmetic: with float ratios, ceil(224 * (232 / 224)) is 233, a box past the photo's edge
        (w, h), (ph, pw) = (int(size[0]), int(size[1])), self.pixel_size
        x0, y0, x1, y1 = self.box
        return ((x0 * w // pw, y0 * h // ph, -(-x1 * w // pw), -(-y1 * h // ph)),
                [(x * w // pw, y * h // ph) for x, y in self.points])

    def pixel_map(self) -> np.ndarray:
        """[H, W] over the model input, constant per cell (each pixel holds its cell's share of the mass)."""
        rows, cols = self.map.shape
        h, w = self.pixel_size
        r = np.minimum((np.arange(h) * rows) // h, rows - 1)
        c = np.minimum((np.arange(w) * cols) // w, cols - 1)
        return self.map[r][:, c]

    @classmethod
    def random(cls, like: "Grounding", seed: int = 0) -> "Grounding":
        """The baseline: a map of U(0, 1) values on the same grid, with the same box and point rules."""
        grid = np.random.default_rng(seed).random(like.map.shape)
        return cls(grid, like.pixel_size, "random", {"seed": seed}, like.question, like.target, [], {}, like.model,
                   {}, like.box_fraction, like.n_points, like.separation)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "params": self.params, "question": self.question,
                "target": self.target, "queries": list(self.queries), "cost": self.cost, "model": self.model,
                "pixel_size": list(self.pixel_size), "map": np.round(self.map, 6).tolist(), "box": list(self.box),
                "points": [list(p) for p in self.points], "extras": self.extras,
                "rules": {"box_fraction": self.box_fraction, "n_points": self.n_points, "separation": self.separation}}

    def show(self, ax=None):
        """A matplotlib figure: the map over the model input's pixels (or the photo), the box and the points."""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(4, 4))
        h, w = self.pixel_size
        if self.photo is not None:
            ax.imshow(np.asarray(self.photo.convert("RGB").resize((w, h))))
        ax.imshow(self.pixel_map(), cmap="inferno", alpha=0.55 if self.photo is not None else 1.0, extent=(0, w, h, 0))
        x0, y0, x1, y1 = self.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=2))
        for x, y in self.points:
            ax.plot(x, y, marker="*", color="lime", markersize=12, markeredgecolor="black")
        ax.set_title(f"{self.method}: {self.question}" + (f" [{self.target}]" if self.target else ""), fontsize=8)
        ax.set_axis_off()
        return fig if fig is not None else ax.figure

    def to_html(self) -> str:
        """A self-contained HTML snippet: the figure as an inline PNG and the box, points, method and cost."""
        import base64
        import html
        import io

        import matplotlib.pyplot as plt

        fig = self.show()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        d = self.to_dict()
        info = {k: d[k] for k in ("method", "params", "question", "target", "box", "points", "pixel_size", "cost")}
        return (f'<figure class="attnscope-grounding"><img alt="grounding" src="data:image/png;base64,'
                f'{base64.b64encode(buf.getvalue()).decode("ascii")}"><figcaption><pre>'
                f"{html.escape(json.dumps(info, indent=1))}</pre></figcaption></figure>")

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path) -> Path:
        """By suffix: .json (map, box, points, method and parameters), .png (the figure) or .html (`to_html`)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1))
        elif path.suffix.lower() == ".png":
            import matplotlib.pyplot as plt

            fig = self.show()
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
        elif path.suffix.lower() in (".html", ".htm"):
            path.write_text(self.to_html())
        else:
            raise ValueError(f"cannot save a grounding as {path.suffix or 'a file with no suffix'}; use .json, .png or .html")
        return path
