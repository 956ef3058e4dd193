"""The viewer on a streamed trace (`capture(..., out=dir)`, `Trace.load(dir)`) without loading it whole.

`stream_views` gives one `LazyStreamView` per stream. Its summaries (head metrics, sinks by attention mass,
pooled thumbnails: the same as `data.stream_views` computes for a trace file) come from one pass that reads one
layer's records at a time and lets them go; afterwards a query's block (every layer and head of one row) or one
layer's rows are read from the shards when the viewer asks for them, never the whole trace. Each record is checked
against its checksum on its first read (the summary pass), later reads map only what they need."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..capture.trace import Trace
from ..core.tokens import TokenMap
from .data import (ENTROPY, PATTERN, StreamView, _pattern, beam_note, beam_sources, check_row, quantize,
                   self_attention_streams, steps_seen, token_rows)


def is_streamed(run) -> bool:
    """Every record of the run reads from a shard on demand (a streamed trace, even after some records were read:
    viewing it never builds the whole trace's rows in memory)."""
    recs = [r for entries in run.records.values() for r in entries]
    return bool(recs) and all(r.source is not None for r in recs)


def _rows(rec, row: int, qidx: list[int]) -> np.ndarray:
    """probs[row, :, qidx] of a record as float32 [h, n, k], without keeping the record's tensor in memory."""
    if rec._probs is not None:
        return rec._probs[row][:, qidx].float().numpy()
    return rec.source.select(row, qidx).numpy()


class LazyStreamView(StreamView):
    """A `StreamView` whose rows stay on disk: `block`, `layer_block` and `subset` read them when asked."""

    def __init__(self, name: str, tokens: TokenMap, layers: list[int], heads: list[int], queries: list[int],
                 length: int, index: dict, tail: list[str], notes: list[str] | None = None):
        super().__init__(name, tokens, layers, heads, queries, None, None, tail=tail, notes=list(notes or []))
        self._length, self._index = length, index  # index: {layer: [(record, {query: its index}, batch row)]}

    @property
    def length(self) -> int:
        return self._length

    def layer_rows(self, li: int, queries: list[int] | None = None) -> np.ndarray:
        """Float rows [len(queries), heads, keys] of layer index `li` (default: every stored query)."""
        queries = self.queries if queries is None else queries
        pos = {q: i for i, q in enumerate(queries)}
        out = np.zeros((len(queries), len(self.heads), self.length), np.float32)
        for rec, where, source in self._index[self.layers[li]]:
            hit = [(pos[q], qi) for q, qi in where.items() if q in pos]
            if not hit:
                continue
            probs = _rows(rec, source, [qi for _, qi in hit])
            keys = np.asarray(rec.keys if rec.keys is not None else range(probs.shape[-1]), dtype=np.int64)
            hidx = [self.heads.index(h) for h in rec.heads]
            for j, (oi, _) in enumerate(hit):
                out[oi][np.ix_(hidx, keys)] = probs[:, j]
        return out

    def block(self, query: int) -> tuple[int, np.ndarray, np.ndarray]:
        q = self.nearest(query)
        rows = np.stack([self.layer_rows(li, [q])[0] for li in range(len(self.layers))])
        u8, scale = quantize(rows)
        return q, u8, scale

    def layer_block(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        return quantize(self.layer_rows(li))

    def subset(self, queries: list[int]) -> StreamView:
        keep = [q for q in self.queries if q in set(queries)]
        rows = np.stack([self.layer_rows(li, keep) for li in range(len(self.layers))], axis=1) if self.layers else \
            np.zeros((len(keep), 0, len(self.heads), self.length), np.float32)
        return StreamView(self.name, self.tokens, self.layers, self.heads, keep, *quantize(rows), self.metrics,
                          self.received, self.sinks, self.sink_rule, self.pattern, self.tail, self.notes)


def stream_views(trace: Trace, run: int = -1, row: int = 0, tail: list[str] | None = None) -> list[LazyStreamView]:
    """One `LazyStreamView` per self-attention stream of `trace.run(run)`, batch row `row`."""
    the_run = trace.run(run)
    streams = self_attention_streams(the_run)
    views = []
    for stream in streams:
        layers = sorted(layer for s, layer in the_run.records if s == stream)
        seen = steps_seen(r for la in layers for r in the_run.records[(stream, la)])
        length = max(seen.values(), default=0)
        maps = the_run.tokens.get(stream)
        if maps:
            check_row(row, len(maps))
        tmap = maps[row].copy() if maps else TokenMap.unknown(length)
        for _ in range(length - len(tmap)):
            tmap.append("", "unknown")
        sources = beam_sources(the_run, stream, row, tmap, seen)  # beam search: the batch row of each step
        heads, queries, index = set(), set(), {}
        for layer in layers:
            index[layer] = []
            for rec in sorted(the_run.records[(stream, layer)], key=lambda r: (r.step, r.part)):
                heads |= set(rec.heads)
                if sources[rec.step] is None:  # no batch row held this sequence at that step
                    continue
                queries |= set(rec.queries)
                index[layer].append((rec, {q: i for i, q in enumerate(rec.queries)}, sources[rec.step]))
        view = LazyStreamView(stream, tmap, layers, sorted(heads), sorted(queries), len(tmap), index,
                              list(tail or []) if stream in ("language", "text") else [],
                              beam_note(stream, row, sources))
        summarize(view)
        views.append(view)
    return views


def summarize(view: LazyStreamView) -> None:
    """Head metrics, sinks (attention-mass criterion) and thumbnails, one layer in memory at a time; the same numbers
    as `data._summaries` on the whole array (metrics and thumbnails over the tokens' rows, `data.token_rows`)."""
    from ..explain import sinks as sinklib

    if not view.queries:
        return
    n_layers, n_heads, length = len(view.layers), len(view.heads), view.length
    image = view.tokens.positions("image")
    every = view.queries == list(range(length))
    size = int(np.clip(math.isqrt(131072 // max(1, n_layers * n_heads)), 12, PATTERN))
    ent, own, img, colmean, pattern = [], [], [], [], []
    keep = token_rows(view)
    queries = [view.queries[i] for i in keep]

    def layers():
        for li in range(n_layers):
            full = view.layer_rows(li)  # [q, h, k]
            t = torch.from_numpy(full)
            if keep:
                tok = full[keep]
                tt = torch.from_numpy(tok)
                ent.append(-torch.special.xlogy(tt, tt).sum(-1).mean(0).numpy())
                own.append(np.stack([tok[i, :, q] for i, q in enumerate(queries)]).mean(0))
                if image:
                    img.append(tok[..., image].sum(-1).mean(0))
                colmean.append(tok.mean(0))
                pattern.append(_pattern(tok[:, None], queries, length, size)[0])
            if every:
                yield t.permute(1, 0, 2)
            else:
                a = torch.zeros(n_heads, length, length)
                a[:, view.queries] = t.permute(1, 0, 2)
                yield a

    report = sinklib.from_tensors([], layers(), view.tokens, write=False)
    view.sink_rule = sinklib.MASS_ONLY
    view.received = np.asarray(report.mass_ratio[:length], dtype=np.float32)
    view.sinks = [int(p) for p in report.positions if p < length]
    if not keep:  # only padding rows: no head metric or thumbnail to draw from them
        return
    view.metrics[ENTROPY] = np.stack(ent).astype(np.float32)
    if view.sinks:
        view.metrics["sink mass"] = np.stack(colmean)[..., view.sinks].sum(-1)
    if image:
        view.metrics["image ratio"] = np.stack(img)
    view.metrics["self"] = np.stack(own)
    view.pattern = np.stack(pattern)
