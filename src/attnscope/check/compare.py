"""Captured records against the eager reference, and token maps against the keys they label.

A record's rows and keys are absolute positions in its stream's sequence. For a stream without a cache whose module
is called several times in one step (parts), positions run end to end across the parts, so part p's local
positions start after the keys of parts 0..p-1. Each captured row is scattered into a zero row as long as the
reference's, so a key labelled with the wrong position, a key left out and mass the recomputation does not see
all show as a difference."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.tokens import CACHED_STREAMS


@dataclass
class StreamReport:
    """The comparison of one stream: the largest difference and where it is, and what could not be compared."""

    stream: str
    max_diff: float = 0.0
    worst: str = ""
    layers: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def note(self, diff: float, where: str) -> None:
        if diff > self.max_diff or not self.worst:
            self.max_diff, self.worst = diff, where


def _part_base(ref: dict, stream: str, layer: int, part: int) -> int:
    return sum(ref[(stream, layer, p)].shape[-1] for p in range(part) if (stream, layer, p) in ref)


def compare(run, ref: dict, streams: dict[str, int], step_ref: bool = False) -> dict[str, StreamReport]:
    """Compare every record of `run` with `ref` ((stream, layer, part) -> [B, H, Q, K]). With `step_ref`, `ref` is
    one forward over the full sequence and the records may come from any decode step (cached streams' rows are
    then absolute positions in it); otherwise only step 0 is compared."""
    reports = {s: StreamReport(s) for s in streams}
    for (stream, layer), records in sorted(run.records.items()):
        rep = reports.setdefault(stream, StreamReport(stream))
        for rec in records:
            if rec.step > 0 and not step_ref:
                continue
            where = f"layer {layer}" + (f" step {rec.step}" if step_ref else "") + (f" part {rec.part}" if rec.part else "")
            expected = ref.get((stream, layer, rec.part))
            if expected is None:
                rep.problems.append(f"{where}: the eager forward made no such attention call")
                continue
            base = 0 if stream in CACHED_STREAMS else _part_base(ref, stream, layer, rec.part)
            rows = torch.tensor(rec.queries) - base
            keys = torch.tensor(rec.keys) - base if rec.keys is not None else torch.arange(rec.probs.shape[-1])
            B, H, Q, K = expected.shape
            if rows.min() < 0 or rows.max() >= Q or keys.min() < 0 or keys.max() >= K or rec.probs.shape[0] != B:
                rep.problems.append(f"{where}: rows {rec.queries[:3]}.. / keys of {rec.probs.shape[-1]} do not fit the "
                                    f"eager call's {Q} queries x {K} keys")
                continue
            got = torch.zeros(B, len(rec.heads), len(rows), K, dtype=torch.float32)
            got[..., keys] = rec.probs.detach().float().cpu()
            want = expected.cpu()[:, rec.heads][:, :, rows]
            rep.note(float((got - want).abs().max()), where)
            rep.layers.add(layer)
    for stream, n in streams.items():
        rep = reports[stream]
        missing = sorted(set(range(n)) - rep.layers)
        if missing:
            rep.problems.append(f"layers {_span(missing)} recorded nothing")
    return reports


def coverage(run, streams: dict[str, int], length: int) -> list[str]:
    """Cached streams over a generate: every position 0..length-1 is a query row of exactly one step, in each layer
    (a decode step that was not recorded, or recorded at the wrong position, breaks this)."""
    out = []
    for stream in streams:
        if stream not in CACHED_STREAMS:
            continue
        for layer in range(streams[stream]):
            rows = sorted(q for rec in run.records.get((stream, layer), []) for q in rec.queries)
            if rows != list(range(length)):
                out.append(f"{stream} layer {layer}: query rows {_span(rows)}, expected 0..{length - 1}")
                break
    return out


def token_maps(runs: list) -> dict[str, list[str]]:
    """Per stream, where a token map's length differs from the keys it labels: in each run, step and layer, the
    keys' extent (last absolute key position + 1, over the layer's parts) must equal the map's length."""
    out: dict[str, list[str]] = {}
    for r, run in enumerate(runs):
        extent: dict[tuple[str, int, int], int] = {}
        for (stream, layer), records in run.records.items():
            out.setdefault(stream, [])
            for rec in records:
                last = max(rec.keys) + 1 if rec.keys is not None else rec.probs.shape[-1]
                key = (stream, rec.step, layer)
                extent[key] = max(extent.get(key, 0), last)
        where = f"run {r} " if len(runs) > 1 else ""
        for (stream, step, layer), n in sorted(extent.items()):
            issues = out[stream]
            try:
                maps = run.maps_at(stream, step)
            except KeyError as err:
                issues.append(f"{where}step {step}: {err}")
                continue
            if not maps:
                issues.append(f"{where}step {step}: no token map labels the {n} keys of layer {layer}")
                continue
            lengths = sorted({len(m) for m in maps})
            if lengths != [n]:
                issues.append(f"{where}step {step} layer {layer}: token map of {lengths[0] if len(lengths) == 1 else lengths} "
                              f"entries for {n} keys")
    return out


def _span(values: list[int]) -> str:
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}..{values[-1]}"
    return ",".join(map(str, values[:8])) + (" ..." if len(values) > 8 else "")
