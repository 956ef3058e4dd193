"""The viewer on a `Summaries` (`capture(..., summaries=...)`, or a summaries file read by `Trace.load`): for a
stream, a step and one of its query rows, a layers x heads grid of one summary (image ratio, mass on each token role,
lookback ratio, entropy, the top key's weight) and each head's top-k keys.

Every number comes from the `Summaries` readers (`image_ratio`, `role_mass`, `lookback`, `entropy`, `topk`), never
from the file's layout, and travels as float32 (int32 positions): what the page draws is what those readers return,
bit for bit. A summaries capture keeps no rows, so there is nothing to pool or subsample: one (step, query row)
block is [layers, heads] per summary plus [layers, heads, k] keys, made when the server is asked for it
(`/api/runs/{rid}/{stream}/summary/{step}/{query}`) or embedded in an exported page for every row that fits a budget
(`export_rows`). Where a grid has no number (a head not captured at that layer, a layer without that row) it holds
NaN (index -1), drawn as "–". Where a summary's number is no measurement (the lookback ratio of a row that sees no
generated key: 1 by definition) the block names it in `undefined` and the page draws "n/a" with the reason; a stream
where that holds at every row does not offer the summary and says why (`notes`). Padding rows are labelled from the
token map's "pad" role by the page."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.tokens import ROLES, TokenMap
from .data import ENTROPY, b64, clean_token, is_pad, self_attention_streams

IMAGE_RATIO = "image ratio"
LOOKBACK = "lookback ratio"
MASS = "mass on "  # + a token role: `Summaries.role_mass(..., role)`
TOP_WEIGHT = "top key weight"  # the weight of the row's most attended key: `Summaries.topk(...)[1][..., 0]`
EXPORT_MAX_VALUES = 1_000_000  # float32 numbers embedded per exported page (about 5 MB of base64)
# why a lookback grid holds no information: the ratio is 1 by definition without a generated key (`lookback_ratio`)
NO_GENERATED_ROW = ("no generated key is visible to this row (the prefill, or a row before the first generated "
                    "token), so its lookback ratio is 1 by definition, not a measurement")
NO_GENERATED_STREAM = ("lookback ratio not offered: this stream has no generated keys (a single forward, an encoder or "
                       "a vision tower), so it is 1 by definition at every row, not a measurement")
NO_GENERATED_ROWS = ("lookback ratio not offered: no captured query row of this stream sees a generated key (the "
                     "rows selected are the prompt's), so it is 1 by definition at every row, not a measurement")


@dataclass
class SummaryBlock:
    """One (step, query row): `metrics` {name: float32 [layers, heads]}, top-k `index` int32 [layers, heads, k]
    (absolute key positions, -1 where none) and `value` float32 [layers, heads, k] (NaN where none)."""

    step: int
    query: int
    metrics: dict[str, np.ndarray]
    index: np.ndarray
    value: np.ndarray
    undefined: dict[str, str] = field(default_factory=dict)  # {summary: why its grid says nothing at this row}

    def to_json(self) -> dict:
        return {"step": self.step, "q": self.query, "k": int(self.index.shape[-1]),
                "metrics": {name: b64(grid) for name, grid in self.metrics.items()},
                "topk_index": b64(self.index), "topk_value": b64(self.value), "undefined": dict(self.undefined)}


@dataclass
class SummaryStreamView:
    """One stream of one run and batch row of a `Summaries`: its layers, heads, (step, query) rows and the summaries
    it holds; `block(step, query)` reads the numbers."""

    name: str
    summaries: object = field(repr=False)  # the Summaries
    run: int
    row: int
    tokens: TokenMap
    layers: list[int]
    heads: list[int]
    rows: list[tuple[int, int]]  # (step, absolute query position), in order
    metrics: list[str]
    k: int  # the most top-k keys of any record (0: "topk" was not summarised)
    # beam search: (last step, first position, tokens from there) of row `row` before each reorder (`Run.eras`), as
    # `Run.maps_at` labels a step; positions before `first` hold `tokens`' labels (the prompt is not repeated per step)
    token_eras: list[tuple[int, int, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the view says about this stream (a summary not offered)

    def __post_init__(self):
        self._rows = set(self.rows)

    def lookback_defined(self, query: int) -> bool:
        """Whether row `query` sees a generated key (the first generated position is at or before it): without one the
        lookback ratio is 1 by definition (`capture.summaries.lookback_ratio`)."""
        return lookback_defined(self.tokens, query)

    def block(self, step: int, query: int) -> SummaryBlock:
        """The grids of (step, query): each summary's value per layer and head, as the readers return it."""
        if (step, query) not in self._rows:
            raise KeyError(f"stream {self.name!r} has no query row {query} at step {step}; rows (step, query): "
                           f"{self.rows[:8]}{' ...' if len(self.rows) > 8 else ''}")
        s, shape = self.summaries, (len(self.layers), len(self.heads))
        metrics = {m: np.full(shape, np.nan, np.float32) for m in self.metrics}
        index = np.full((*shape, self.k), -1, np.int32)
        value = np.full((*shape, self.k), np.nan, np.float32)
        for li, layer in enumerate(self.layers):
            try:
                rec = s.record(self.name, layer, step, 0, self.run)
            except KeyError:  # this layer has no record at this step
                continue
            if query not in rec.queries:
                continue
            qi, hidx = rec.queries.index(query), [self.heads.index(h) for h in rec.heads]
            for m in self.metrics:
                metrics[m][li, hidx] = _finite(_read(s, m, self.name, layer, step, self.run)[self.row, :, qi], m, layer)
            if self.k:
                idx, val = s.topk(self.name, layer, step, 0, self.run)
                n = idx.shape[-1]
                index[li, hidx, :n] = idx[self.row, :, qi].numpy()
                value[li, hidx, :n] = _finite(val[self.row, :, qi], "top-k", layer)
        undefined = {}
        if LOOKBACK in self.metrics and not self.lookback_defined(query):
            undefined[LOOKBACK] = NO_GENERATED_ROW
        return SummaryBlock(step, query, metrics, index, value, undefined)

    def values_per_row(self) -> int:
        return max(1, len(self.layers) * len(self.heads) * (len(self.metrics) + 2 * self.k))

    def export_rows(self, max_values: int) -> list[tuple[int, int]]:
        """Rows to embed within `max_values` numbers (at least one row): every row if they fit; else as many as fit,
        each step's last token row (the one a generate step adds; a right-padded row ends in padding) first, spread
        evenly over the steps with the last one kept, then other tokens' rows spread evenly, then padding rows (no
        token's attention)."""
        room = max(1, max_values // self.values_per_row())
        if len(self.rows) <= room:
            return list(self.rows)
        t = self.tokens
        last: dict[int, tuple[int, int]] = {}
        for step, q in self.rows:  # rows are in (step, query) order: the last token row of each step stays
            if step not in last or not is_pad(t, q) or is_pad(t, last[step][1]):
                last[step] = (step, q)
        last = sorted(last.values())
        if len(last) >= room:
            return _spread(last, room)
        lasts, rest = set(last), room - len(last)
        tokens = [r for r in self.rows if r not in lasts and not is_pad(t, r[1])]
        if len(tokens) >= rest:
            return sorted(lasts | set(_spread(tokens, rest)))
        pads = [r for r in self.rows if r not in lasts and is_pad(t, r[1])]
        return sorted(lasts | set(tokens) | set(_spread(pads, rest - len(tokens))))

    def meta(self, rows: list[tuple[int, int]] | None = None) -> dict:
        """The stream as the front end reads it; with `rows`, those rows' blocks embedded (an exported page)."""
        t = self.tokens
        out = {"name": self.name, "layers": self.layers, "heads": self.heads,
               "tokens": [clean_token(x) for x in t.tokens], "roles": [ROLES.index(r) for r in t.roles],
               "metrics": [{"name": m, "range": None if m == ENTROPY else [0, 1]} for m in self.metrics],
               "k": self.k, "rows": [list(r) for r in (self.rows if rows is None else rows)],
               "all_rows": len(self.rows), "token_eras": [list(era) for era in self.token_eras],
               "notes": list(self.notes)}
        if rows is not None:
            out["blocks"] = {f"{step}:{q}": self.block(step, q).to_json() for step, q in rows}
        return out


def _era(last: int, held: list[str], final: list[str]) -> tuple[int, int, list[str]]:
    """(last, first, tail): the tokens a beam row `held` up to step `last` are `final[:first] + tail`."""
    first = next((i for i, (a, b) in enumerate(zip(held, final)) if a != b), min(len(held), len(final)))
    return last, first, [clean_token(x) for x in held[first:]]


def lookback_defined(tmap: TokenMap, query: int) -> bool:
    """Whether position `query` of `tmap` sees a generated key: a generated position at or before it."""
    return next((p for p, r in enumerate(tmap.roles) if r == "generated"), len(tmap)) <= query


def span(positions: list[int]) -> str:
    """Positions as a reader takes them in: "3..9" when consecutive, else a list (cut after 8)."""
    if positions and positions == list(range(positions[0], positions[-1] + 1)) and len(positions) > 2:
        return f"{positions[0]}..{positions[-1]}"
    return ", ".join(map(str, positions[:8])) + (" ..." if len(positions) > 8 else "")


def _spread(items: list, n: int) -> list:
    """`n` of `items` (1 <= n <= len) evenly spaced, the last one kept (and the first where n > 1)."""
    if n == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]  # distinct: a step of at least 1


def _read(s, metric: str, stream: str, layer: int, step: int, run: int):
    """[B, heads, rows] of one summary at one record, from the `Summaries` reader that names it."""
    if metric == IMAGE_RATIO:
        return s.image_ratio(stream, layer, step, 0, run)
    if metric == LOOKBACK:
        return s.lookback(stream, layer, step, 0, run)
    if metric == ENTROPY:
        return s.entropy(stream, layer, step, 0, run)
    if metric == TOP_WEIGHT:
        return s.topk(stream, layer, step, 0, run)[1][..., 0]
    return s.role_mass(stream, layer, metric.removeprefix(MASS), step, 0, run)


def _finite(values, metric: str, layer: int) -> np.ndarray:
    """`values` as float32 NumPy; NaN or infinity (drawn "–", as a number not captured) is refused."""
    out = values.float().numpy()
    if not np.isfinite(out).all():
        raise ValueError(f"the {metric} summary of layer {layer} holds NaN or infinite values: nothing to draw")
    return out


def _has(read) -> bool:
    try:
        read()
    except KeyError:  # the capture left this summary out
        return False
    return True


def stream_views(summaries, run: int = -1, row: int = 0) -> list[SummaryStreamView]:
    """One `SummaryStreamView` per self-attention stream of `summaries.run(run)`, batch row `row`."""
    the_run = summaries.run(run)
    views = []
    if not the_run.records:
        raise ValueError("these summaries hold no attention call (the capture selected none, or the model ran "
                         "outside its block): nothing to show")
    for stream in self_attention_streams(the_run):
        layers = sorted(layer for s, layer in the_run.records if s == stream)
        records = [(layer, rec) for layer in layers for rec in the_run.records[(stream, layer)] if not rec.part]
        heads = sorted({h for _, rec in records for h in rec.heads})
        rows = sorted({(rec.step, q) for _, rec in records for q in rec.queries})
        layer, step = records[0][0], records[0][1].step  # a record to ask which summaries were kept
        batch = summaries.key_count(stream, layer, step, 0, run).shape[0]
        if not 0 <= row < batch:
            raise IndexError(f"batch row {row} is out of range: the summaries hold {batch} batch rows")
        maps = the_run.tokens.get(stream)
        tmap = maps[row].copy() if maps else TokenMap.unknown(0)
        for _ in range(max(q for _, q in rows) + 1 - len(tmap)):  # positions no map labels: still drawable
            tmap.append("", "unknown")
        metrics, k = [], 0
        if _has(lambda: summaries.role_mass(stream, layer, None, step, 0, run)):
            present = set(tmap.roles)
            metrics += [IMAGE_RATIO] if "image" in present else []
            metrics += [MASS + r for r in ROLES if r in present]
        said = []
        if _has(lambda: summaries.lookback(stream, layer, step, 0, run)):
            if any(lookback_defined(tmap, q) for _, q in rows):
                metrics.append(LOOKBACK)
            else:  # 1 at every row by definition: a grid of 1s would read as a measurement
                said.append(NO_GENERATED_ROWS if "generated" in tmap.roles else NO_GENERATED_STREAM)
        metrics += [ENTROPY] if _has(lambda: summaries.entropy(stream, layer, step, 0, run)) else []
        if _has(lambda: summaries.topk(stream, layer, step, 0, run)):  # fewer keys than k early on: fewer kept
            k = max(summaries.topk(stream, la, rec.step, 0, run)[0].shape[-1] for la, rec in records)
            metrics += [TOP_WEIGHT]  # a grid even where top-k is all that was summarised (its heads are clicked)
        metrics.sort(key=lambda m: (m != IMAGE_RATIO, m != LOOKBACK, m != ENTROPY))  # the usual ones first
        eras = [_era(last, m[stream][row].tokens, tmap.tokens) for last, m in the_run.eras if m.get(stream)]
        views.append(SummaryStreamView(stream, summaries, run, row, tmap, layers, heads, rows, metrics, k, eras, said))
    return views


def notes(summaries, run: int = -1, row: int = 0) -> list[str]:
    """What the page must say about what it leaves out: other runs, other batch rows, repeated calls of a module, beam
    search's relabelled rows."""
    out = []
    n_runs = len(summaries.runs)
    if n_runs > 1:
        out.append(f"this file holds {n_runs} runs; shown: run {run % n_runs} (the viewer shows one run: "
                   "attnscope view FILE --run i for another)")
    the_run = summaries.run(run)
    recs = [(s, la, r) for (s, la), entries in the_run.records.items() for r in entries]
    if recs:
        s, la, r = recs[0]
        batch = summaries.key_count(s, la, r.step, r.part, run).shape[0]
        if batch > 1:
            out.append(f"batch row {row} of {batch} shown (attnscope view FILE --row i for another)")
    if any(r.part for _, _, r in recs):
        out.append("some layers were called more than once in a step: the grids show each step's first call (part 0)")
    if the_run.eras:
        out.append(f"beam search reordered the rows between steps: batch row {row} of one step may continue another "
                   "hypothesis than at the step before; each step's query and top-k keys are labelled with the tokens "
                   "its row held at that step")
    return out


def metas(views: list[SummaryStreamView], embed: bool,
          max_values: int = EXPORT_MAX_VALUES) -> tuple[list[dict], list[str]]:
    """The streams as the view document carries them, and notes. `embed`: each stream's blocks in the document (an
    exported page), within `max_values` numbers split evenly among the streams; a stream whose rows did not all fit
    says how many it embeds."""
    if not embed:
        return [v.meta() for v in views], []
    share = max(1, min(max_values, EXPORT_MAX_VALUES) // max(1, len(views)))
    out, said = [], []
    for v in views:
        rows = v.export_rows(share)
        out.append(v.meta(rows))
        if len(rows) < len(v.rows):
            said.append(f"{v.name}: this page embeds {len(rows)} of {len(v.rows)} (step, query) rows (each step's last "
                        "row first); `attnscope serve --trace FILE` shows them all")
    return out, said
