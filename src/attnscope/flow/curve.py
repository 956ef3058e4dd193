"""`KnockoutCurve`: the answer's probability change per window of knocked-out layers, for one or many examples.

For each flow ("image->question": question rows cannot read image keys) and each window (first, last layer,
both included) it holds the relative change (p_knockout - p) / p of the answer token's probability, one row per
example. `mean()` averages over examples; `intervals()` adds percentile bootstrap intervals over examples
(`evaluate.bootstrap`, clustered by the examples' `group`, e.g. the image they share).

A .json file carries the checksum of its own content (`capture.checksums.sealed`), checked by `load`: a flow, window,
example or number edited after writing raises `CurveFileError`; a file written before it loads with an
`UncheckedMetadataWarning`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..capture.checksums import sealed
from ..capture.trace import check_metadata

FORMAT = "attnscope.knockout_curve/1"


class CurveFileError(ValueError):
    """A knockout-curve file that was changed after it was written."""


def flow_name(source: str, target: str) -> str:
    return f"{source}->{target}"


@dataclass
class KnockoutCurve:
    """Relative change of the answer's probability when `target` rows cannot read `source` keys in a window of
    `window` layers, sliding over a `layers`-layer stream. `changes[flow]` is [examples, windows]; `base` the
    unedited answer probability per example; `examples` a dict per example (text, answer, group, sets)."""

    model: str
    stream: str
    layers: int
    window: int
    windows: list[tuple[int, int]]
    changes: dict[str, np.ndarray]
    base: np.ndarray
    examples: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.windows = [tuple(int(v) for v in w) for w in self.windows]
        self.changes = {k: np.asarray(v, dtype=np.float64).reshape(len(self.base), len(self.windows))
                        for k, v in self.changes.items()}
        self.base = np.asarray(self.base, dtype=np.float64)

    @property
    def flows(self) -> list[str]:
        return list(self.changes)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return (f"KnockoutCurve({self.model}, {len(self)} example(s), window={self.window}, "
                f"{len(self.windows)} windows over {self.layers} layers, flows={self.flows})")

    # --- statistics --------------------------------------------------------------------------------------------
    def mean(self, flow: str) -> np.ndarray:
        """Mean relative change per window over the examples."""
        return self.changes[flow].mean(0)

    def intervals(self, n: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[dict]]:
        """{flow: [{"value", "low", "high"} per window]}: the mean over examples with a percentile bootstrap interval
        (resampling examples, or whole groups of them when examples carry a `group`)."""
        from ..evaluate.bootstrap import bootstrap

        groups = [e.get("group", i) for i, e in enumerate(self.examples)] if len(self.examples) == len(self) else None
        out = {}
        for name, rows in self.changes.items():
            def per_window(sample):
                means = np.stack(sample).mean(0)
                return {str(w): float(v) for w, v in enumerate(means)}

            ci = bootstrap(list(rows), per_window, groups=groups, n=n, level=level, seed=seed, unit="example")
            out[name] = [ci[str(w)] for w in range(len(self.windows))]
        return out

    @classmethod
    def combine(cls, curves: list[KnockoutCurve]) -> KnockoutCurve:
        """One curve over the examples of several (same model, stream, windows and flows)."""
        if not curves:
            raise ValueError("nothing to combine: no curves")
        first = curves[0]
        for c in curves[1:]:
            if (c.model, c.stream, c.windows, c.flows) != (first.model, first.stream, first.windows, first.flows):
                raise ValueError("curves differ in model, stream, windows or flows; combine only like with like")
        return cls(first.model, first.stream, first.layers, first.window, first.windows,
                   {k: np.concatenate([c.changes[k] for c in curves]) for k in first.flows},
                   np.concatenate([c.base for c in curves]), [e for c in curves for e in c.examples], dict(first.params))

    def select(self, flows: list[str]) -> KnockoutCurve:
        """The same examples with only some flows."""
        missing = [f for f in flows if f not in self.changes]
        if missing:
            raise ValueError(f"flows {missing} are not in this curve; it has {self.flows}")
        return KnockoutCurve(self.model, self.stream, self.layers, self.window, self.windows,
                             {f: self.changes[f] for f in flows}, self.base, list(self.examples), dict(self.params))

    # --- files --------------------------------------------------------------------------------------------
    def to_dict(self, intervals: bool = True) -> dict:
        out = {"format": FORMAT, "model": self.model, "stream": self.stream, "layers": self.layers,
               "window": self.window, "windows": [list(w) for w in self.windows], "params": self.params,
               "flows": self.flows, "base": self.base.tolist(),
               "changes": {k: v.tolist() for k, v in self.changes.items()},
               "mean": {k: self.mean(k).tolist() for k in self.flows}, "examples": self.examples}
        if intervals and len(self) > 1:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few examples: the count is in the document itself
                out["intervals"] = self.intervals()
        return out

    def save(self, path: str | Path) -> Path:
        """By suffix: .json (everything, with intervals) or .png (the figure)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(sealed(self.to_dict()), indent=1))
        elif path.suffix.lower() == ".png":
            import matplotlib.pyplot as plt

            fig = self.plot()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        else:
            raise ValueError(f"cannot save a knockout curve as {path.suffix or 'a file with no suffix'}; use .json or .png")
        return path

    @classmethod
    def from_dict(cls, meta: dict, where: str = "the document") -> KnockoutCurve:
        """The inverse of `to_dict`."""
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{where}: not a knockout curve (format {found!r}; expected {FORMAT})")
        return cls(meta["model"], meta["stream"], meta["layers"], meta["window"], meta["windows"], meta["changes"],
                   meta["base"], meta.get("examples", []), meta.get("params", {}))

    @classmethod
    def load(cls, path: str | Path) -> KnockoutCurve:
        """Read a .json file written by `save`, checked against the checksum written with it."""
        meta = json.loads(Path(path).read_text())
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            check_metadata(meta, path, what="knockout curve", labels="a flow, a window, an example, the changes",
                           resave="KnockoutCurve.save", error=CurveFileError)
        return cls.from_dict(meta, str(path))

    # --- rendering ----------------------------------------------------------------------------------------
    def plot(self, ax=None, title: str | None = None):
        """Mean relative change (%) per window, one line per flow, with 95% bootstrap bands over examples."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.4, 3.4))
        x = [(a + b) / 2 for a, b in self.windows]
        bands = self.intervals() if len(self) > 1 else None
        for name in self.flows:
            ax.plot(x, 100 * self.mean(name), marker="o", ms=3, label=name)
            if bands is not None:
                ax.fill_between(x, [100 * c["low"] for c in bands[name]], [100 * c["high"] for c in bands[name]], alpha=0.2)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel(f"centre of the knocked-out window ({self.window} layers of {self.layers})")
        ax.set_ylabel("answer probability change (%)")
        ax.set_title(title or f"{self.model}: attention knockout ({len(self)} example{'s' if len(self) != 1 else ''})",
                     fontsize=9)
        ax.legend(fontsize=7, title="source->target", title_fontsize=7)
        if fig is not None:
            fig.tight_layout()
        return fig if fig is not None else ax.figure

    def to_markdown(self, digits: int = 1) -> str:
        """A table: one row per window, one column per flow (mean % change [95% interval])."""
        bands = self.intervals() if len(self) > 1 else None
        head = "| layers | " + " | ".join(self.flows) + " |"
        rows = [head, "|---" * (len(self.flows) + 1) + "|"]
        for w, (a, b) in enumerate(self.windows):
            cells = []
            for name in self.flows:
                if bands is None:
                    cells.append(f"{100 * self.mean(name)[w]:+.{digits}f}%")
                else:
                    c = bands[name][w]
                    cells.append(f"{100 * c['value']:+.{digits}f}% [{100 * c['low']:+.{digits}f}, {100 * c['high']:+.{digits}f}]")
            rows.append(f"| {a}-{b} | " + " | ".join(cells) + " |")
        return "\n".join(rows)
