"""Per-head summaries reduced inside the attention call, for dataset-scale runs: `capture(model, summaries=...)`.

Instead of rows [batch, heads, queries, keys], each selected attention call keeps, per (batch row, head, query row):

- `role_mass` [B, h, r, R]: attention mass on each token role of `core.tokens.ROLES` (the image ratio of a VLM's text
  queries is the mass on "image" over the row's total mass), with `key_count` [B, R], the keys of each role the
  call saw;
- `lookback` [B, h, r]: the lookback ratio of Lookback Lens (Chuang et al., "Lookback Lens: Detecting and Mitigating
  Contextual Hallucinations in Large Language Models Using Only Attention Maps", EMNLP 2024): A_ctx / (A_ctx + A_new)
  with A_ctx the mean attention on the context (every key that is not generated or padding) and A_new the mean on
  the tokens generated before; 1 where no token was generated yet;
- `entropy` [B, h, r]: -sum p ln p of the row, in nats (0 ln 0 = 0);
- `topk_index` / `topk_value` [B, h, r, k]: the k keys with the most attention, as absolute positions, and their
  probabilities (k = `topk`, default 5, or the number of keys if fewer; `topk=` without this summary is refused).

The probabilities come from `AttentionCall.probs_for` (what the model really used, edits included), `chunk` query
rows at a time, and are reduced for every layer of a forward in one batch (`Reducer`): nothing of size queries x
keys outlives one chunk of [B, h, chunk, K] or the reducer's 4 MiB queue. Query rows, steps, parts and
positions are placed exactly as for rows (`capture/session.py`, `core/ledger.py`), so a decode step of `generate`
gets one record per layer holding its new rows.

    with attnscope.capture(model, streams="language", queries="last", summaries="all") as s:
        model.generate(**inputs, max_new_tokens=8)
    s.lookback("language", 12, step=None)  # [steps, batch, heads]: the last query row of every step
    s.image_ratio("language", 12, step=0)  # [batch, heads, rows]"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.probs import RowRun, as_rows, index_on, plain_rows, stacked_probs
from ..core.tokens import ROLES
from .trace import Trace

SUMMARIES = ("role_mass", "lookback", "entropy", "topk")
TENSORS = ("key_count", "role_mass", "lookback", "entropy", "topk_index", "topk_value")  # a record's, in order
TOPK = 5  # keys kept by the "topk" summary unless `topk=` says otherwise
_CODE = {role: i for i, role in enumerate(ROLES)}
_GENERATED, _PAD, _IMAGE = _CODE["generated"], _CODE["pad"], _CODE["image"]
_TINY = torch.finfo(torch.float32).tiny


def parse_summaries(which) -> tuple[str, ...]:
    """"all", one name, or names from SUMMARIES; anything else is a ValueError naming the choices."""
    if which == "all" or which is True:
        return SUMMARIES
    names = (which,) if isinstance(which, str) else tuple(which)
    unknown = [n for n in names if n not in SUMMARIES]
    if unknown or not names:
        raise ValueError(f"unknown summaries {unknown or list(names)}; choose from {SUMMARIES} or 'all'")
    return tuple(dict.fromkeys(names))


@dataclass
class SummaryRecord:
    """The summaries of one attention call: `heads` (indices), `queries` (absolute positions of the rows),
    `step` (0 = prefill), `part` (repeated calls of one module in a step); tensors as described in the module
    docstring (None where not asked for)."""

    heads: list[int]
    queries: list[int]
    step: int
    part: int
    key_count: torch.Tensor
    role_mass: torch.Tensor | None = None
    lookback: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    topk_index: torch.Tensor | None = None
    topk_value: torch.Tensor | None = None
    keys = None
    pieces: dict = field(default_factory=dict, repr=False, compare=False)  # reduced chunks not yet joined
    # (layer, index): a record loaded from a summaries file whose tensors are read from `layer` (a
    # `summaries_file.PackedLayer`) on first access; None for one captured here
    source: tuple | None = field(default=None, repr=False, compare=False)

    def join(self) -> None:
        """Set the tensors from the reduced chunks of rows (one piece per chunk, in order)."""
        for name, parts in self.pieces.items():
            setattr(self, name, parts[0] if len(parts) == 1 else torch.cat(parts, 2))
        self.pieces = {}

    @property
    def probs(self):
        raise TypeError("this capture reduced each call to summaries (capture(..., summaries=...)) and kept no rows; "
                        "capture without `summaries=` to get probabilities")

    def meta(self) -> dict:
        return {"heads": self.heads, "queries": self.queries, "step": self.step, "part": self.part}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: value for n in TENSORS if (value := getattr(self, n)) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of its summaries; those of a loaded record not read yet are counted without reading them."""
        total = 0
        for n in TENSORS:
            value = self.__dict__.get("_" + n)
            if value is UNREAD:
                total += self.source[0].nbytes(self.source[1], n)
            elif value is not None:
                total += value.numel() * value.element_size()
        return total


UNREAD = object()  # a summary of a loaded record not read from its file yet (`SummaryRecord.source`)


def _summary_field(name: str) -> property:
    """SummaryRecord.<name>: the tensor, read from the record's file on first access when it came from one."""
    slot = "_" + name

    def get(self):
        value = self.__dict__[slot]
        if value is UNREAD:
            layer, index = self.source
            value = self.__dict__[slot] = layer.read(index, name)
        return value

    def put(self, value):
        self.__dict__[slot] = value

    return property(get, put)


for _name in TENSORS:  # after @dataclass: __init__ assigns through the setter (as `trace.Record.probs`)
    setattr(SummaryRecord, _name, _summary_field(_name))


class Reducer:
    """Called by the capture session in place of recording rows. Each call's selected rows are computed (`probs_for`,
    `chunk` rows at a time) and queued, or, where they are plain softmax(q k^T) rows (`core.probs.plain_rows`: a
    decode step, the last row), their query rows and keys are queued and computed at the flush with the other
    layers' (`core.probs.stacked_probs`). The queue is reduced in one batch of tensor operations per key set (every
    layer of a step shares its keys) and device (a model split with a device_map has layers on several) when the
    forward ends (`flush`, called by the session), when a reader asks, or as soon as it would hold more than
    `buffer_elements` numbers (probabilities, and the keys of deferred calls). So a step costs a few operations per
    layer instead of a dozen, and nothing of size queries x keys is held beyond one chunk or `buffer_elements` (4 MiB
    of float32 by default)."""

    def __init__(self, which, topk: int | None = None, chunk: int = 256, buffer_elements: int = 1 << 20):
        self.which = parse_summaries(which)
        if topk is not None and "topk" not in self.which:  # it would be ignored without a word
            raise ValueError(f"topk={topk!r} is the number of keys of the 'topk' summary, which summaries="
                             f"{list(self.which)} leaves out: add 'topk' to summaries (or pass 'all'), or drop topk=")
        topk = TOPK if topk is None else topk
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be a positive int; got {topk!r}")
        self.topk, self.chunk, self.buffer_elements = topk, chunk, buffer_elements
        # (record, probs [B, h, c, K] or None if deferred, weights, whole call?, (q, k, scaling) if deferred, h, c,
        # (run, (stream, layer)) the record is in)
        self._queue: list[tuple] = []
        self._queued = 0  # elements in the queue
        self._open: list[SummaryRecord] = []  # records whose pieces are not joined yet
        self._filling: SummaryRecord | None = None  # the record whose call is being queued (not complete yet)
        self._last: tuple | None = None  # (token maps, key positions, batch, map length, weights) of the last call

    def _weights(self, tmaps, batch: int, key_pos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W [B, K, R + 2], key_count [B, R], positions [K]) for keys at absolute positions `key_pos`: one column per
        role (1 where the key has it), then the context and generated keys' weights 1/count, so that p @ W gives
        the role masses and the two means of the lookback ratio in one product. Every layer of a step shares the
        same keys, so the last one is kept: it holds while the call's token maps are the same list of the same length
        (the session replaces the list when it relabels, and the maps grow by a token per decode step)."""
        last = self._last
        if last is not None and last[0] is tmaps and last[1] == key_pos and last[2] == batch and (
                not tmaps or last[3] == len(tmaps[0])):  # the previous layer's keys
            return last[4]
        found = self._weights_for(tmaps, batch, key_pos)
        self._last = (tmaps, key_pos, batch, len(tmaps[0]) if tmaps else -1, found)
        return found

    @staticmethod
    def _weights_for(tmaps, batch: int, key_pos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.tensor(key_pos, dtype=torch.long)
        if tmaps:
            codes = torch.tensor([[_CODE[t.roles[i]] for i in key_pos] for t in tmaps], dtype=torch.long)
            codes = codes.expand(batch, -1) if codes.shape[0] == 1 else codes
        else:
            codes = torch.full((batch, len(key_pos)), _CODE["unknown"], dtype=torch.long)
        onehot = torch.nn.functional.one_hot(codes, len(ROLES)).float()  # [B, K, R]
        count = onehot.sum(1)
        new = onehot[..., _GENERATED]
        ctx = 1 - new - onehot[..., _PAD]
        weights = torch.cat([onehot, (ctx / ctx.sum(-1, keepdim=True).clamp_min(1))[..., None],
                             (new / new.sum(-1, keepdim=True).clamp_min(1))[..., None]], -1)
        return weights, count, positions

    def record(self, run, call, heads: torch.Tensor | None, rows: list[int], query_pos: list[int], key_pos,
               tmaps, part: int) -> None:
        """Queue the summaries of this call's query `rows` (indices into its queries) for `heads` (None: every head);
        `key_pos` are the absolute positions of its key columns. The record is in the run at once; its tensors are
        set by `flush`."""
        weights = self._weights(tmaps, call.query.shape[0], key_pos)
        head_list = list(range(call.query.shape[1])) if heads is None else heads.tolist()
        rec = SummaryRecord(head_list, query_pos, run.steps, part, key_count=weights[1])
        run.records.setdefault((call.site.stream, call.site.layer), []).append(rec)
        where = (run, (call.site.stream, call.site.layer))
        grad = torch.is_grad_enabled()
        if grad:
            torch.set_grad_enabled(False)
        try:
            if len(rows) <= self.chunk:  # one block, the usual case (one row per step)
                r = as_rows(rows)
                plain = None if call.probs is not None or call.patches else plain_rows(
                    call.module, call.query, call.key, call.attention_mask, call.kwargs, heads, rows)
                if plain is not None:  # softmax(q k^T) alone: computed at the flush with the other layers'
                    if len(rows) == call.query.shape[2]:
                        q = call.query
                    elif isinstance(r, RowRun):  # a run of rows (the last one): no index; copied, since a view
                        q = call.query[:, :, r[0]:r[0] + r[1]].clone()  # would keep every row alive till the flush
                    else:  # the rows' indices made where the queries are
                        q = call.query.index_select(2, index_on(r, call.query.device))
                    b, h, c, k = q.shape[0], q.shape[1], q.shape[2], call.key.shape[2]
                    self._add((rec, None, weights, True, (q, call.key, plain), h, c, where),
                              b * h * c * k + call.key.numel())
                else:
                    p = call.probs_for(heads, r, chunk=self.chunk)  # [B, h, r, K]: the only q x k block
                    self._add((rec, p, weights, True, None, p.shape[1], p.shape[2], where), p.numel())
                return
            self._open.append(rec)
            self._filling = rec
            for start in range(0, len(rows), self.chunk):
                p = call.probs_for(heads, as_rows(rows[start:start + self.chunk]), chunk=self.chunk)
                self._add((rec, p, weights, False, None, p.shape[1], p.shape[2], where), p.numel())
        except BaseException:  # e.g. out of memory: no record of this call (as with rows), not a record without rows
            self._drop(run, call, rec)
            raise
        finally:
            self._filling = None
            if grad:
                torch.set_grad_enabled(True)

    def _drop(self, run, call, rec: SummaryRecord) -> None:
        """Forget `rec`, whose call raised while being queued: its queued blocks are left out of the next flush and
        the run does not list it (a record with none or only some of its rows would misread as summarised)."""
        _forget(rec, run, (call.site.stream, call.site.layer))
        self._open = [r for r in self._open if r is not rec]
        kept = [item for item in self._queue if item[0] is not rec]
        if len(kept) != len(self._queue):  # recount what is queued (deferred blocks count their keys too)
            self._queue = kept
            self._queued = sum(item[1].numel() if item[1] is not None else
                               item[4][0].numel() // item[4][0].shape[-1] * item[4][1].shape[2] + item[4][1].numel()
                               for item in kept)

    def _add(self, item: tuple, elements: int) -> None:
        if self._queued and self._queued + elements > self.buffer_elements:
            self.flush()
        self._queue.append(item)
        self._queued += elements

    def flush(self) -> None:
        """Compute the deferred rows and reduce every queued block, a batch per key set and device; give each record
        its tensors."""
        if not self._queue:
            return
        queue, self._queue, self._queued = self._queue, [], 0
        groups: dict[tuple, list] = {}
        for item in queue:  # a model split over devices (device_map): each device's rows are reduced there
            groups.setdefault((id(item[2]), (item[1] if item[1] is not None else item[4][0]).device), []).append(item)
        pending = list(groups.values())
        try:
            with torch.no_grad():
                while pending:
                    self._reduce(pending[0])
                    pending.pop(0)
        except BaseException:  # e.g. out of memory: the records not reduced leave their runs (no record, not one
            lost = {id(item[0]): item for items in pending for item in items}  # without tensors)
            for rec, *_, where in lost.values():
                _forget(rec, *where)
            self._open = [rec for rec in self._open if id(rec) not in lost]
            raise
        if self._open:
            for rec in self._open:
                if rec is not self._filling:  # a call queued over several flushes is joined once all its rows are in
                    rec.join()
            self._open = [rec for rec in self._open if rec is self._filling]

    @staticmethod
    def _probs(items: list[tuple]) -> torch.Tensor:
        """The queued rows of `items` (same keys) side by side: [B, sum h_i c_i, K], deferred ones computed here, all
        calls of one shape in one `stacked_probs`."""
        stacks: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            if item[1] is None:
                q, k, _ = item[4]
                stacks.setdefault((q.shape, k.shape, q.dtype, k.dtype, q.device), []).append(i)
        blocks = [item[1] for item in items]
        for where in stacks.values():
            probs = stacked_probs(*zip(*(items[i][4] for i in where)))  # [L, B, H, r, K]
            if len(where) == len(items):  # the usual step: every layer's rows as one block, no copy for one sequence
                n, batch, _, _, kv_len = probs.shape
                return probs.transpose(0, 1).reshape(batch, -1, kv_len)
            for i, p in zip(where, probs):
                blocks[i] = p
        batch = blocks[0].shape[0]
        if len(blocks) == 1:
            return blocks[0].reshape(batch, -1, blocks[0].shape[-1])
        return torch.cat([p.reshape(batch, -1, p.shape[-1]) for p in blocks], 1)

    def _reduce(self, items: list[tuple]) -> None:
        """One batch: the blocks [B, h_i, c_i, K] (same keys) laid side by side as [B, sum h_i c_i, K]."""
        want = self.which
        weights, _, positions = items[0][2]
        p = self._probs(items).float()
        batch, device = p.shape[0], p.device
        out = {}
        if "role_mass" in want or "lookback" in want:
            both = torch.matmul(p, weights.to(device))  # [B, M, R + 2]
            if "role_mass" in want:
                out["role_mass"] = both[..., :-2]
            if "lookback" in want:
                a_ctx = both[..., -2]  # 0 / 0 (no context and no generated mass) reads as 1
                out["lookback"] = torch.nan_to_num_(a_ctx / (a_ctx + both[..., -1]), nan=1.0)
        if "entropy" in want:  # -sum p ln p, with ln of the smallest normal float where p is 0: 0 ln 0 = 0
            out["entropy"] = torch.mul(p, p.clamp_min(_TINY).log_()).sum(-1).neg_()
        if "topk" in want:
            out["topk_value"], index = torch.topk(p, min(self.topk, p.shape[-1]), dim=-1)
            out["topk_index"] = positions.to(device)[index]
        del p
        shapes = {(item[5], item[6]) for item in items}
        for name, value in out.items():
            value = value.cpu()
            rest = value.shape[2:]
            if len(shapes) == 1 and batch == 1:  # every block [1, h, c]: one view for all
                h, c = next(iter(shapes))
                pieces = value.view(len(items), 1, h, c, *rest).unbind(0)
            else:
                pieces = [piece.reshape(batch, item[5], item[6], *rest) for item, piece in
                          zip(items, value.split([item[5] * item[6] for item in items], 1))]
            for item, piece in zip(items, pieces):
                if item[3]:
                    setattr(item[0], name, piece)
                else:
                    item[0].pieces.setdefault(name, []).append(piece)


def _forget(rec: SummaryRecord, run, key: tuple) -> None:
    """Take `rec` out of `run`'s records under `key`."""
    entries = run.records.get(key, [])
    entries[:] = [r for r in entries if r is not rec]
    if not entries:
        run.records.pop(key, None)


def lookback_ratio(mass: torch.Tensor, count: torch.Tensor, context: str = "prompt") -> torch.Tensor:
    """Lookback ratio from role masses [..., R] and key counts broadcastable to them: mean attention on the context
    (every non-generated, non-pad key; or the image keys with `context="image"`) over itself plus the mean on
    generated keys; 1 where both are 0 (no generated key yet)."""
    if context == "prompt":
        ctx_mass = mass.sum(-1) - mass[..., _GENERATED] - mass[..., _PAD]
        n_ctx = count.sum(-1) - count[..., _GENERATED] - count[..., _PAD]
    elif context == "image":
        ctx_mass, n_ctx = mass[..., _IMAGE], count[..., _IMAGE]
    else:
        raise ValueError(f"context is 'prompt' or 'image'; got {context!r}")
    a_ctx = ctx_mass / n_ctx.clamp_min(1)
    a_new = mass[..., _GENERATED] / count[..., _GENERATED].clamp_min(1)
    denom = a_ctx + a_new
    return torch.where(denom > 0, a_ctx / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.ones_like(denom))


def _one_per_step(entries, stream, layer, run=None):
    """Raise where two records of one (stream, layer, part) share a step: stacking them by step would mix two
    sequences (a steer method's own forwards, such as contrastive branches, are never recorded: they run in their
    block's `dispatch.exclusive`; this guards any other way two forwards could share a step). Raise too where beam search reordered the rows between steps (`run.eras`):
    row b of one step and row b of the next are then not one sequence."""
    if run is not None and run.eras:
        raise ValueError(f"({stream!r}, layer {layer}): beam search reordered the batch rows between steps (at steps "
                         f"{[last for last, _ in run.eras]}), so row b of one step does not continue row b of the one "
                         "before; step=None would stack different hypotheses. Read one step at a time (step=k)")
    steps = [r.step for r in entries]
    if len(set(steps)) != len(steps):
        raise ValueError(f"({stream!r}, layer {layer}) has several records for one step (steps {steps}): another "
                         "forward of the same step was captured too; read one record at a time (`record`)")


class Summaries(Trace):
    """A capture's runs and token maps with `SummaryRecord`s in place of rows. Readers take (stream, layer) and
    either `step` (one call: [B, h, rows, ...]) or `step=None` (every step's rows stacked: [steps, B, h, ...], for
    one query row per step, e.g. `queries="last"` during generate)."""

    _reducer: Reducer | None = None  # while capturing: calls queued but not reduced yet

    def _sync(self) -> None:
        if self._reducer is not None:
            self._reducer.flush()

    def record(self, stream: str, layer: int, step: int = 0, part: int = 0, run: int = -1):
        self._sync()
        return super().record(stream, layer, step, part, run)

    def __repr__(self) -> str:
        self._sync()
        n = sum(len(v) for r in self.runs for v in r.records.values())
        return f"Summaries(runs={len(self.runs)}, records={n}, bytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """Bytes held by every summary tensor of every run."""
        self._sync()
        return sum(rec.nbytes for r in self.runs for v in r.records.values() for rec in v)

    def save(self, path) -> Path:
        """Write one .safetensors file: the summary tensors packed per (stream, layer, summary), the trace's JSON
        metadata giving each record's slice, a checksum per packed tensor (`summaries_file.py`); `Trace.load(path)`
        reads it back as a `Summaries`."""
        from . import summaries_file

        self._sync()
        return summaries_file.save(self, path)

    def verify(self) -> Summaries:
        """Read every summary now: a loaded file's packed tensors are otherwise read and checked (checksum, finite
        values) when a reader first needs them, so a damaged file raises `TraceFileError` here instead."""
        self._sync()
        for run in self.runs:
            for entries in run.records.values():
                for rec in entries:
                    rec.tensors()
        return self

    def _get(self, stream: str, layer: int, name: str, step: int | None, part: int, run: int) -> torch.Tensor:
        if step is not None:
            value = getattr(self.record(stream, layer, step, part, run), name)
            if value is None:
                raise KeyError(f"{name!r} was not summarised; capture with summaries including it")
            return value
        self._sync()
        layer = self.layer_index(stream, layer, run)
        entries = sorted((r for r in self.run(run).records.get((stream, layer), []) if r.part == part),
                         key=lambda r: r.step)
        if not entries:
            self.record(stream, layer, 0, part, run)  # raises naming what was captured
        _one_per_step(entries, stream, layer, self.run(run))
        values = [getattr(r, name) for r in entries]  # sorted by step, one each: no lookup per step
        if any(v is None for v in values):
            raise KeyError(f"{name!r} was not summarised; capture with summaries including it")
        if any(v.shape[2] != 1 for v in values):
            raise ValueError("step=None stacks one query row per step; this selection has several rows in a step "
                             "(select queries='last', or read one step at a time)")
        return torch.stack([v[:, :, 0] for v in values])

    def role_mass(self, stream: str, layer: int, role: str | None = None, step: int | None = 0, part: int = 0,
                  run: int = -1) -> torch.Tensor:
        """Attention mass on `role` ([..., R] over `ROLES` without one)."""
        mass = self._get(stream, layer, "role_mass", step, part, run)
        if role is None:
            return mass
        if role not in _CODE:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        return mass[..., _CODE[role]]

    def image_ratio(self, stream: str, layer: int, step: int | None = 0, part: int = 0, run: int = -1) -> torch.Tensor:
        """Mass on image tokens over the row's total mass (1 without attention sinks)."""
        mass = self.role_mass(stream, layer, None, step, part, run)
        return mass[..., _IMAGE] / mass.sum(-1).clamp_min(1e-30)

    def lookback(self, stream: str, layer: int, step: int | None = 0, part: int = 0, run: int = -1,
                 context: str = "prompt") -> torch.Tensor:
        """Lookback ratio; `context="image"` (image keys as context) is derived from `role_mass` and the key counts."""
        if context == "prompt":
            return self._get(stream, layer, "lookback", step, part, run)
        mass = self.role_mass(stream, layer, None, step, part, run)
        count = self.key_count(stream, layer, step, part, run)  # [B, R] or [steps, B, R]
        return lookback_ratio(mass, count[:, None, None] if step is not None else count[:, :, None], context)

    def key_count(self, stream: str, layer: int, step: int | None = 0, part: int = 0, run: int = -1) -> torch.Tensor:
        """Keys of each role the call saw: [B, R], or [steps, B, R] with step=None."""
        if step is not None:
            return self.record(stream, layer, step, part, run).key_count
        layer = self.layer_index(stream, layer, run)
        entries = sorted((r for r in self.run(run).records[(stream, layer)] if r.part == part), key=lambda r: r.step)
        _one_per_step(entries, stream, layer, self.run(run))
        return torch.stack([r.key_count for r in entries])

    def entropy(self, stream: str, layer: int, step: int | None = 0, part: int = 0, run: int = -1) -> torch.Tensor:
        """-sum p ln p of each row, nats."""
        return self._get(stream, layer, "entropy", step, part, run)

    def topk(self, stream: str, layer: int, step: int | None = 0, part: int = 0,
             run: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute key positions, probabilities) of the top-k keys of each row, largest first."""
        return (self._get(stream, layer, "topk_index", step, part, run),
                self._get(stream, layer, "topk_value", step, part, run))
