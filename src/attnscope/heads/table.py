"""`heads.table(model, inputs, metrics=[...])`: one row per (stream, layer, head), one column per metric."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import torch

from ..steer.edits import SteerError
from ..steer.session import as_model
from .attention import attention_metrics
from .importance import ablation, ablation_grad, shapley
from .target import make_target
from .vhd import vhd

METRICS = ("entropy", "role_mass", "sink_mass", "vhd", "ablation", "ablation_grad", "shapley")


class HeadTable:
    """Rows (stream, layer, head); `columns[name]` is a list aligned with `rows`. `shapley_se` is the standard error
    of `shapley`. `meta` records the model, metrics, target and parameters."""

    def __init__(self, rows: list[tuple[str, int, int]], columns: dict[str, list[float]], meta: dict):
        self.rows, self.columns, self.meta = rows, columns, meta

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"HeadTable({len(self.rows)} heads, columns={list(self.columns)})"

    def column(self, name: str) -> list[float]:
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {list(self.columns)}")
        return self.columns[name]

    def grid(self, name: str, stream: str | None = None) -> torch.Tensor:
        """The metric as a [layers, heads] tensor for one stream (NaN where a head was not measured)."""
        streams = sorted({s for s, _, _ in self.rows})
        stream = stream or streams[0]
        mine = [(i, r) for i, r in enumerate(self.rows) if r[0] == stream]
        if not mine:
            raise KeyError(f"no rows for stream {stream!r}; streams: {streams}")
        layers = max(r[1] for _, r in mine) + 1
        heads = max(r[2] for _, r in mine) + 1
        out = torch.full((layers, heads), float("nan"))
        col = self.column(name)
        for i, (_, layer, head) in mine:
            out[layer, head] = col[i]
        return out

    def top(self, name: str, k: int = 10, largest: bool = True, stream: str | None = None) -> list[tuple[str, int, int]]:
        col = self.column(name)
        idx = [i for i, r in enumerate(self.rows) if (stream is None or r[0] == stream) and col[i] == col[i]]
        idx.sort(key=lambda i: col[i], reverse=largest)
        return [self.rows[i] for i in idx[:k]]

    def to_records(self) -> list[dict]:
        return [{"stream": s, "layer": layer, "head": h, **{k: v[i] for k, v in self.columns.items()}}
                for i, (s, layer, h) in enumerate(self.rows)]

    def save(self, path) -> Path:
        """`.csv` (one row per head) or `.json` (rows + meta)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = self.to_records()
        if path.suffix == ".csv":
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["stream", "layer", "head"])
                writer.writeheader()
                writer.writerows(records)
        elif path.suffix == ".json":
            path.write_text(json.dumps({"meta": self.meta, "rows": records}, indent=1))
        else:
            raise ValueError(f"save as .csv or .json; got {path.name}")
        return path

    def to_text(self, sort: str | None = None, k: int | None = None) -> str:
        names = list(self.columns)
        order = list(range(len(self.rows)))
        if sort is not None:
            col = self.column(sort)
            order.sort(key=lambda i: -col[i] if col[i] == col[i] else float("inf"))
        if k is not None:
            order = order[:k]
        lines = ["stream    layer head " + " ".join(f"{n[:12]:>12}" for n in names)]
        for i in order:
            s, layer, h = self.rows[i]
            lines.append(f"{s:9} {layer:5d} {h:4d} " + " ".join(f"{self.columns[n][i]:12.4g}" for n in names))
        return "\n".join(lines)

    def show(self, sort: str | None = None, k: int | None = 20) -> None:
        print(self.to_text(sort, k))

    def to_html(self) -> str:
        names = list(self.columns)
        head = "".join(f"<th>{html.escape(n)}</th>" for n in ["stream", "layer", "head", *names])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r[:3]) +
                       "".join(f"<td>{self.columns[n][i]:.4g}</td>" for n in names) + "</tr>"
                       for i, r in enumerate(self.rows))
        meta = html.escape(json.dumps(self.meta))
        return f"<table class='attnscope-heads' data-meta='{meta}'><tr>{head}</tr>{body}</table>"


def table(model, inputs: dict, metrics=("entropy", "role_mass", "sink_mass"), streams=None, layers=None,
          queries=None, target=None, samples: int = 8, seed: int = 0, batch: int = 32, drop="image",
          tau: float = 100.0) -> HeadTable:
    """Per-head metrics of `model` on `inputs` (from `model.encode`).

    metrics: any of entropy, role_mass, sink_mass (one forward; averaged over `queries` rows, default all non-pad),
    vhd (two forwards: with and without `drop`, last position), ablation (one gated forward per head, batched),
    ablation_grad (one forward + backward), shapley (`samples` permutations x (heads + 1) gated evaluations,
    batched; a `shapley_se` column comes with it). `target` for ablation/shapley: see `heads.target`."""
    model = as_model(model)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise SteerError(f"unknown metrics {unknown}; choose from {METRICS}")
    from .importance import players

    rows = players(model, streams, layers)
    index = {r: i for i, r in enumerate(rows)}
    columns: dict[str, list[float]] = {}
    meta = {"model": model.name, "metrics": metrics, "streams": streams, "layers": layers if not isinstance(layers, slice) else str(layers),
            "queries": queries if not callable(queries) else "callable", "tau": tau}

    def put(name: str, values: dict):
        col = columns.setdefault(name, [float("nan")] * len(rows))
        for key, v in values.items():
            if key in index:
                col[index[key]] = float(v)

    if {"entropy", "role_mass", "sink_mass"} & set(metrics):
        att = attention_metrics(model, inputs, streams if streams is not None else None, layers, queries, tau)
        for (stream, layer), res in att.items():
            for name, vals in res.items():
                if name == "entropy" and "entropy" not in metrics or name == "sink_mass" and "sink_mass" not in metrics:
                    continue
                if name.startswith("mass_") and "role_mass" not in metrics:
                    continue
                put(name, {(stream, layer, h): float(v) for h, v in enumerate(vals)})
        if "role_mass" in metrics and "mass_image" in columns:
            columns["image_ratio"] = list(columns["mass_image"])
    if "vhd" in metrics:
        put("vhd", vhd(model, inputs, drop=drop, layers=layers))
        meta["drop"] = drop if not isinstance(drop, range) else list(drop)
    imp = [m for m in metrics if m in ("ablation", "ablation_grad", "shapley")]
    if imp:
        tgt = make_target(model, inputs, target)
        meta["target"] = tgt.describe
        if "ablation" in imp:
            put("ablation", ablation(model, inputs, streams=streams, layers=layers, batch=batch, _target=tgt))
        if "ablation_grad" in imp:
            put("ablation_grad", ablation_grad(model, inputs, streams=streams, layers=layers, _target=tgt))
        if "shapley" in imp:
            phi, se = shapley(model, inputs, streams=streams, layers=layers, samples=samples, seed=seed, batch=batch,
                              _target=tgt)
            put("shapley", phi)
            put("shapley_se", se)
            meta["samples"], meta["seed"] = samples, seed
    return HeadTable(rows, columns, meta)
