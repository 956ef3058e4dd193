"""View data: a `Trace` turned into compact arrays the viewer draws from (no server, no browser here).

One `StreamView` per captured stream holds, for the stored query positions, every layer's and head's row over
all keys as uint8 (each row scaled by its own maximum, so 0..255 covers the row; the maximum is kept as a
float32 `scale`), plus what the overview needs: per-head metrics (entropy in nats, image ratio, sink mass), the
sinks (attnscope's one detector, `explain.sinks`: given by the runner, which has the model and its hidden states,
or from the rows' attention mass alone for a trace file), and pooled query × key thumbnails. The layout of one query's
block, [layers, heads, keys], is the same in the exported HTML and in the server's answers, so the front end
slices it without copying.

Long sequences keep every row only while layers × heads × queries × keys stays under a budget; past it a
capture selects query rows (`query_plan`): CLS/special/last/generated plus an even stride, and the viewer
snaps a click to the nearest stored row and says so."""
from __future__ import annotations

import base64
import io
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..capture.trace import Trace
from ..core.tokens import QUERY_STREAM, ROLES, TokenMap

FORMAT = "attnscope.view/1"
# roles whose positions are always kept as query rows when a long sequence is subsampled
FOCUS_ROLES = ("cls", "register", "special", "generated")
DEFAULT_BUDGET = 32_000_000  # stored values (bytes) per run: layers x heads x queries x keys
PATTERN = 32  # side of the pooled query x key thumbnails
ENTROPY = "entropy (nats)"  # -sum p ln p of a row, averaged over the stored tokens' rows: the head table's unit too


def b64(array: np.ndarray, deflate: bool = False) -> str:
    raw = np.ascontiguousarray(array).tobytes()
    return base64.b64encode(zlib.compress(raw, 6) if deflate else raw).decode("ascii")


def quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [..., K] of probabilities → (uint8 [..., K] scaled to each row's max, float32 row max [...])."""
    scale = rows.max(axis=-1).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.rint(rows / safe * 255.0).clip(0, 255).astype(np.uint8), scale


def dequantize(u8: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 255.0 * scale[..., None]


def clean_token(token: str) -> str:
    """Readable byte-level BPE and SentencePiece pieces (Ġ/▁ = space, Ċ = newline)."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("ĉ", "⇥")


def query_plan(model, inputs: dict, budget: int = DEFAULT_BUDGET, new_tokens: int = 0):
    """The `queries=` selection for a viewer capture: None (every row) when it fits `budget`, else a stride
    plus the focus roles (and every generated token)."""
    streams = model.streams
    heads = {s: max(site.num_heads for site in model.sites.values() if site.stream == s) for s in streams}
    lengths = [int(v.shape[-1]) for k, v in inputs.items() if k in ("input_ids",) and hasattr(v, "shape")]
    if "pixel_values" in inputs:
        lengths.append(_vision_length(model, inputs["pixel_values"]))
    length = max(lengths or [1]) + new_tokens
    per_query = sum(streams[s] * heads[s] for s in streams) * length
    if per_query * length <= budget:
        return None
    keep = max(8, budget // per_query)
    stride = max(1, math.ceil(length / keep))
    return list(range(0, length, stride)) + ["last", *FOCUS_ROLES]


def _vision_length(model, pixel_values) -> int:
    config = getattr(model.hf.config, "vision_config", model.hf.config)
    patch = getattr(config, "patch_size", 16)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch) + 1 + int(getattr(config, "num_register_tokens", 0) or 0)


@dataclass
class StreamView:
    name: str
    tokens: TokenMap
    layers: list[int]
    heads: list[int]
    queries: list[int]
    u8: np.ndarray  # [queries, layers, heads, keys]
    scale: np.ndarray  # [queries, layers, heads]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layers, heads]
    received: np.ndarray | None = None  # [keys], mean multiple of a uniform share each key receives
    sinks: list[int] = field(default_factory=list)
    sink_rule: str = ""  # the definition the sinks were found by (shown on the sink chip)
    pattern: np.ndarray | None = None  # [layers, heads, P, P] uint8
    tail: list[str] = field(default_factory=list)  # generated tokens never fed back (no row of their own)
    notes: list[str] = field(default_factory=list)  # what the page must say about these rows (`beam_note`)

    @property
    def length(self) -> int:
        return self.u8.shape[-1]

    def nearest(self, query: int) -> int:
        """The stored query row closest to `query`."""
        idx = int(np.searchsorted(self.queries, query))
        cands = [self.queries[i] for i in (idx - 1, idx) if 0 <= i < len(self.queries)]
        return min(cands, key=lambda q: (abs(q - query), q))

    def block(self, query: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(stored query, uint8 [layers, heads, keys], float32 scale [layers, heads]) for the row nearest `query`."""
        q = self.nearest(query)
        i = self.queries.index(q)
        return q, self.u8[i], self.scale[i]

    def layer_block(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [queries, heads, keys], float32 scale [queries, heads]) of layer index `li`, every stored row."""
        return np.ascontiguousarray(self.u8[:, li]), np.ascontiguousarray(self.scale[:, li])

    def rows(self, query: int) -> np.ndarray:
        q, u8, scale = self.block(query)
        return dequantize(u8, scale)

    def subset(self, queries: list[int]) -> StreamView:
        """The same view keeping only the stored rows of `queries` (summaries stay those of every row)."""
        keep = [i for i, q in enumerate(self.queries) if q in set(queries)]
        return StreamView(self.name, self.tokens, self.layers, self.heads, [self.queries[i] for i in keep],
                          self.u8[keep], self.scale[keep], self.metrics, self.received, self.sinks, self.sink_rule,
                          self.pattern, self.tail, self.notes)

    def export_queries(self, max_values: int) -> list[int]:
        """Stored rows to embed in a file within `max_values` values: all if they fit; else the focus roles,
        sinks and the last token's row, image patches on an even 2-D lattice and other positions at an even stride,
        padding rows (no token's attention) only where every other row fits."""
        per = len(self.layers) * len(self.heads) * self.length
        if per * len(self.queries) <= max_values:
            return list(self.queries)
        stored = set(self.queries)
        t = self.tokens
        pads = {q for q in stored if is_pad(t, q)}
        last = max(stored - pads or stored)  # a right-padded row ends in padding: its last token's row is the default
        focus = {q for q in stored if t.roles[q] in FOCUS_ROLES} | (set(self.sinks) & stored) | {last}
        room = max(1, max_values // per - len(focus))
        patches = [q for q in stored if t.patch[q] is not None and q not in focus]
        other = sorted(q for q in stored if t.patch[q] is None and q not in focus and q not in pads)
        if len(patches) + len(other) < room:  # room left after every token's row: padding rows, evenly
            left = sorted(pads - focus)
            other += left[:: max(1, math.ceil(len(left) / (room - len(patches) - len(other))))]
        share = len(patches) / max(1, len(patches) + len(other))
        keep_p, keep_o = int(room * share), room - int(room * share)
        chosen = set(focus)
        if patches:
            step = max(1, math.ceil(math.sqrt(len(patches) / max(1, keep_p))))
            lattice = [q for q in patches if t.patch[q][1] % step == step // 2 and t.patch[q][2] % step == step // 2]
            chosen |= set(lattice[: max(keep_p, 1)])
        if other:
            stride = max(1, math.ceil(len(other) / max(1, keep_o)))
            chosen |= set(other[::stride])
        return sorted(chosen)

    def meta(self, embed_rows: bool) -> dict:
        t = self.tokens
        roles = [ROLES.index(r) for r in t.roles]
        patch = [[i, *p] for i, p in enumerate(t.patch) if p is not None]
        out = {
            "name": self.name, "length": self.length, "layers": self.layers, "heads": self.heads,
            "tokens": [clean_token(x) for x in t.tokens], "roles": roles, "patch": patch,
            "grids": [list(g) for g in t.grids], "queries": self.queries, "sinks": self.sinks, "sink_rule": self.sink_rule,
            "tail": [clean_token(x) for x in self.tail],
            "metrics": {k: np.round(v.astype(np.float64), 4).tolist() for k, v in self.metrics.items()},
            "received": None if self.received is None else np.round(self.received.astype(np.float64), 3).tolist(),
            "pattern": None if self.pattern is None else {"size": int(self.pattern.shape[-1]), "b64": b64(self.pattern)},
        }
        if embed_rows:
            out["rows"] = {"encoding": "u8-deflate", "b64": b64(self.u8, deflate=True), "scale": b64(self.scale)}
        return out


def self_attention_streams(the_run) -> list[str]:
    """The streams of a trace `Run` the viewer draws (square self-attention; cross-attention's queries are another
    stream's positions), sorted. A run that holds only cross-attention is refused, naming the fix."""
    streams = sorted({s for s, _ in the_run.records if s not in QUERY_STREAM})
    if not streams and the_run.records:
        raise ValueError("the viewer draws self-attention streams; this trace holds only cross-attention "
                         f"({sorted({s for s, _ in the_run.records})}): capture the encoder or decoder stream too")
    return streams


def beam_sources(the_run, stream: str, row: int, tmap: TokenMap, seen: dict[int, int]) -> dict[int, int | None]:
    """{step: the batch row to read that step's rows from} for the sequence `tmap` (batch row `row`'s at the end).

    `seen`: {step: positions its records' rows see (their largest query or key + 1)}. Without a beam reorder
    (`Run.eras`) every step reads `row`. Under beam search a batch row changes hypothesis between steps, so a step
    reads the batch row whose tokens then (`Run.maps_at`, what `Trace.tokens(stream, b, step=s)` gives) are `tmap`'s
    on every position its rows see (`row` itself where it is one): the rows shown are one sequence's, and `tmap`
    labels them right. None: no batch row held that sequence then (the step is left out)."""
    if not the_run.eras or not the_run.tokens.get(stream):
        return {step: row for step in seen}
    out = {}
    for step, n in seen.items():
        held = the_run.maps_at(stream, step)

        def same(b: int) -> bool:
            t = held[b]
            return len(t) >= n and len(tmap) >= n and t.tokens[:n] == tmap.tokens[:n] and t.roles[:n] == tmap.roles[:n]

        out[step] = row if same(row) else next((b for b in range(len(held)) if same(b)), None)
    return out


def beam_note(stream: str, row: int, sources: dict[int, int | None]) -> list[str]:
    """What the page must say when `beam_sources` read a step from another batch row or left it out (else nothing)."""
    moved = {s: b for s, b in sorted(sources.items()) if b is not None and b != row}
    gone = sorted(s for s, b in sources.items() if b is None)
    if not moved and not gone:
        return []
    said = (f"{stream}: beam search moved hypotheses between batch rows; the rows shown are those of the sequence "
            f"batch row {row} holds at the end, whose tokens label them")
    if moved:
        said += ("; " + ", ".join(f"step {s} read from batch row {b}" for s, b in moved.items())
                 + " (the row that held this sequence at that step)")
    if gone:
        said += (f"; step{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} left out: no batch row held this "
                 "sequence then (Trace.tokens(stream, b, step=s) labels each step's rows; another sequence: "
                 "attnscope view FILE --row i, or html_of(trace, row=i))")
    return [said]


def steps_seen(records) -> dict[int, int]:
    """{step: the positions its records' rows see} (the largest query or key + 1) of `records`."""
    seen: dict[int, int] = {}
    for rec in records:
        keys = rec.keys if rec.keys is not None else range(rec.shape[-1])
        seen[rec.step] = max(seen.get(rec.step, 0), (max(keys) + 1) if len(keys) else 0, max(rec.queries) + 1)
    return seen


def stream_views(trace: Trace, run: int = -1, row: int = 0, tail: list[str] | None = None,
                 sinks: dict | None = None) -> list[StreamView]:
    """One `StreamView` per stream of `trace.run(run)`, batch row `row`. `tail`: generated tokens that never got
    a forward of their own (generate's final token), shown after the language/text stream. `sinks`: {stream:
    `explain.sinks.SinkReport`} from the model (else the attention-mass criterion on the stored rows)."""
    from ..capture.summaries import Summaries

    if isinstance(trace, Summaries):
        raise TypeError("a Summaries holds per-head summaries, no rows: draw it with viz.summary_view (what "
                        "runner.from_trace, to_html and `attnscope view FILE` do)")
    the_run = trace.run(run)
    streams = self_attention_streams(the_run)
    views = []
    for stream in streams:
        layers = sorted(layer for s, layer in the_run.records if s == stream)
        maps = the_run.tokens.get(stream)
        length = 0
        heads: list[int] = []
        for layer in layers:
            for rec in the_run.records[(stream, layer)]:
                keys = rec.keys if rec.keys is not None else range(rec.probs.shape[-1])
                length = max(length, (max(keys) + 1) if len(keys) else 0, max(rec.queries) + 1)
                heads = sorted(set(heads) | set(rec.heads))
        check_row(row, len(maps) if maps else the_run.records[(stream, layers[0])][0].probs.shape[0])
        if maps:
            tmap = maps[row]
            tmap = TokenMap(list(tmap.roles), list(tmap.tokens), list(tmap.patch), list(tmap.grids))
        else:
            tmap = TokenMap.unknown(length)
        if len(tmap) < length:  # positions the token map never saw (should not happen; stay drawable)
            for _ in range(length - len(tmap)):
                tmap.append("", "unknown")
        length = len(tmap)
        seen = steps_seen(r for la in layers for r in the_run.records[(stream, la)])
        sources = beam_sources(the_run, stream, row, tmap, seen)  # beam search: the batch row of each step
        rows: dict[int, np.ndarray] = {}
        for li, layer in enumerate(layers):
            for rec in sorted(the_run.records[(stream, layer)], key=lambda r: (r.step, r.part)):
                if sources[rec.step] is None:  # no batch row held this sequence at that step
                    continue
                probs = rec.probs[sources[rec.step]].detach().float().cpu().numpy()  # [h, q, k]
                keys = np.asarray(rec.keys if rec.keys is not None else range(probs.shape[-1]), dtype=np.int64)
                hidx = [heads.index(h) for h in rec.heads]
                for qi, q in enumerate(rec.queries):
                    block = rows.get(q)
                    if block is None:
                        block = rows[q] = np.zeros((len(layers), len(heads), length), np.float32)
                    block[li][np.ix_(hidx, keys)] = probs[:, qi, :]
        queries = sorted(rows)
        full = np.stack([rows[q] for q in queries]) if queries else np.zeros((0, len(layers), len(heads), length), np.float32)
        del rows
        view = StreamView(stream, tmap, layers, heads, queries, *quantize(full),
                          tail=list(tail or []) if stream in ("language", "text") else [],
                          notes=beam_note(stream, row, sources))
        _summaries(view, full, (sinks or {}).get(stream))
        views.append(view)
    return views


def check_row(row: int, batch: int) -> None:
    """IndexError naming the batch rows there are, where `row` is not one of them (not Python's bare "list index out
    of range"; a negative row is refused, as the summaries view refuses it)."""
    if not 0 <= row < batch:
        raise IndexError(f"batch row {row} is out of range: the trace holds {batch} batch row{'s' * (batch != 1)} "
                         f"({'0' if batch == 1 else f'0..{batch - 1}'})")


def is_pad(tmap: TokenMap, position: int) -> bool:
    """Whether `position` is a padding position of `tmap` (one past its end, a generated token not labelled yet, is
    not): its query row, uniform or arbitrary as the model fills it, is no token's attention."""
    return position < len(tmap) and tmap.roles[position] == "pad"


def token_rows(view: StreamView) -> list[int]:
    """Indices into `view.queries` of the rows of tokens (`is_pad` rows left out): head metrics and thumbnails are
    over them."""
    return [i for i, q in enumerate(view.queries) if not is_pad(view.tokens, q)]


def _summaries(view: StreamView, full: np.ndarray, report=None) -> None:
    """Head metrics, sinks and pooled thumbnails from the float rows [q, l, h, k] (metrics and thumbnails over the
    tokens' rows, `token_rows`)."""
    from ..explain import sinks as sinklib

    if not len(view.queries):
        return
    if report is None:  # a trace file: the one detector's attention-mass criterion on the stored rows
        probs = []
        for li in range(full.shape[1]):
            a = np.zeros((full.shape[2], view.length, view.length), np.float32)
            a[:, view.queries] = full[:, li].transpose(1, 0, 2)
            probs.append(torch.from_numpy(a))
        report = sinklib.from_tensors([], probs, view.tokens, write=False)
        view.sink_rule = sinklib.MASS_ONLY
    else:
        view.sink_rule = sinklib.DEFINITION
    view.received = np.asarray(report.mass_ratio[: view.length], dtype=np.float32)
    view.sinks = [int(p) for p in report.positions if p < view.length]
    keep = token_rows(view)
    if not keep:  # only padding rows: no head metric or thumbnail to draw from them
        return
    queries = [view.queries[i] for i in keep]
    full = full[keep] if len(keep) < len(view.queries) else full
    ent = -(np.where(full > 0, full * np.log(np.where(full > 0, full, 1)), 0)).sum(-1)  # nats
    view.metrics[ENTROPY] = ent.mean(0)
    if view.sinks:
        view.metrics["sink mass"] = full[..., view.sinks].sum(-1).mean(0)
    image = view.tokens.positions("image")
    if image:
        view.metrics["image ratio"] = full[..., image].sum(-1).mean(0)
    view.metrics["self"] = np.stack([full[i, :, :, q] for i, q in enumerate(queries)]).mean(0)
    # thumbnails stay near 128 kB whatever the model: 32x32 for up to 128 heads, smaller for more
    size = int(np.clip(math.isqrt(131072 // max(1, full.shape[1] * full.shape[2])), 12, PATTERN))
    view.pattern = _pattern(full, queries, view.length, size)


def _pattern(full: np.ndarray, queries: list[int], length: int, size: int = PATTERN) -> np.ndarray:
    """[l, h, P, P] uint8: attention mass from query bins to key bins (stored rows only), each head scaled to its max."""
    p = min(size, length)
    qbin = np.minimum(np.asarray(queries) * p // length, p - 1)
    kbin = np.minimum(np.arange(length) * p // length, p - 1)
    q, layers, heads, _ = full.shape
    keyed = np.zeros((q, layers, heads, p), np.float32)
    np.add.at(np.moveaxis(keyed, -1, 0), kbin, np.moveaxis(full, -1, 0))
    out = np.zeros((layers, heads, p, p), np.float32)
    count = np.zeros(p, np.float32)
    np.add.at(np.moveaxis(out, 2, 0), qbin, keyed)
    np.add.at(count, qbin, 1)
    out /= np.maximum(count, 1)[None, None, :, None]
    top = out.max(axis=(2, 3), keepdims=True)
    return np.rint(out / np.where(top > 0, top, 1) * 255).astype(np.uint8)


# --- images -----------------------------------------------------------------------------------------------
def image_data_url(image: Image.Image, max_side: int = 448, fmt: str = "JPEG") -> str:
    """A data: URL of `image` (RGB), downscaled so its longer side is at most `max_side`."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=88) if fmt == "JPEG" else image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def seen_image(pixel_values: torch.Tensor, image_processor=None, index: int = 0) -> Image.Image:
    """The image as the model saw it (after resize and crop), from `pixel_values` [B, 3, H, W] and the
    processor's normalization, so heat maps over the patch grid line up with it exactly."""
    pv = pixel_values[index].detach().float().cpu()
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    std = getattr(image_processor, "image_std", None) or [0.5, 0.5, 0.5]
    pv = pv * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (pv.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


# --- the document ---------------------------------------------------------------------------------------
# shown above a trace written before metadata checksums: what was not checked, and how to add a checksum
UNCHECKED_LABELS = ("labels not checked: this trace was written before attnscope checksummed a trace's labels "
                    "(layers, heads, token roles, provenance), so an edit of them would go unnoticed; to add a "
                    "checksum, save it again: attnscope.Trace.load(path).save(new_path)")


def trace_notes(trace) -> list[str]:
    """What the page must say about where `trace` came from: a file written before metadata checksums (loaded with an
    `UncheckedMetadataWarning`, `Trace.labels_checked` False) has labels nothing verified."""
    return [] if getattr(trace, "labels_checked", True) else [UNCHECKED_LABELS]


def document(views: list[StreamView], images: list[Image.Image] | None = None, embed_rows: bool = True,
             provenance: dict | None = None, title: str = "", generation: dict | None = None,
             explanations: list[dict] | None = None, tables: list[dict] | None = None, extra: dict | None = None,
             notes: list[str] | None = None) -> dict:
    """The JSON-able view document the front end reads (embedded in HTML, or returned by the server). `notes`: lines
    the page shows above the viewer (`trace_notes`; `labels_checked` is False when one says the labels are unchecked),
    followed by each view's own (`StreamView.notes`: beam search's steps read from another batch row)."""
    doc = {
        "format": FORMAT, "title": title, "roles": list(ROLES),
        "streams": [v.meta(embed_rows) for v in views],
        "images": [image_data_url(im) for im in images or []],
        "provenance": _plain(provenance or {}),
        "sink_definition": next((v.sink_rule for v in views if v.sink_rule), ""),
        "generation": generation, "explanations": explanations or [], "tables": tables or [],
        "notes": list(notes or []) + [n for v in views for n in v.notes],
        "labels_checked": UNCHECKED_LABELS not in (notes or []),
    }
    return doc | (extra or {})


def _plain(value):
    """JSON-safe copy of provenance (tensors and tuples turned into lists, unknown objects and non-finite numbers,
    which JSON cannot hold, into strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def scores_entry(method: str, stream: str, scores, target=None, faithfulness=None, params: dict | None = None,
                 grid=None, explains: str | None = None, note: str | None = None, units: str | None = None,
                 readout: list[int] | None = None) -> dict:
    """An explanation as the viewer draws it: scores over a stream's positions as uint8 over [floor, max].

    The floor is 0 (negative scores are not drawn) unless every score is positive and the smallest is over a fifth
    of the largest (attention flow: every token receives much of the flow): then the colours span [min, max], so
    the map is not one colour. `explains` names the target in words; `target` is the position it is about
    (None for a default target such as the next token); `units` says what the numbers are."""
    arr = np.asarray(torch.as_tensor(scores).detach().float().cpu().numpy(), dtype=np.float32).reshape(-1)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    floor = lo if lo > 0 and lo > 0.2 * hi else 0.0
    span = np.clip(arr - floor, 0, None)
    u8, scale = quantize(span[None])
    if target is not None and not isinstance(target, int):  # e.g. attnscope.explain's target description
        params = dict(params or {}) | {"target": target}
        target = None
    return {"method": method, "stream": stream, "target": target, "params": _plain(params or {}),
            "faithfulness": _plain(faithfulness), "length": int(arr.shape[0]), "b64": b64(u8[0]),
            "scale": float(scale[0]), "floor": floor, "min": lo, "max": hi,
            "grid": None if grid is None else list(grid), "explains": explains, "note": note, "units": units,
            "readout": list(readout or [])}
