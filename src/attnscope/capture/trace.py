"""Trace: captured attention tensors, token roles and provenance; saved as safetensors with JSON metadata (with a
blake2b checksum of every tensor, and an XXH3-128 checksum of the metadata itself, both verified on load): one file
(`Trace.save`), or a directory of shards streamed while the model runs (`capture(..., out=dir)`, see `stream.py`),
opened lazily by `Trace.load`.

A tensor's checksum covers its values, not its labels (a record's heads, queries, keys, step and part, the token
maps' roles, the provenance): the metadata carries its own checksum (`checksums.sealed`, field
"metadata_checksum"), checked by `check_metadata` before anything in it is used. Files written before it was added
load with the structural checks only (`check_label`, `check_axes`, `check_listed`) and an
`UncheckedMetadataWarning`."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..core.tokens import CACHED_STREAMS, TokenMap
from .checksums import METADATA_FIELD, metadata_digest, sealed

FORMAT = "attnscope.trace/1"


class TraceFileError(ValueError):
    """A file that is not a valid attnscope trace."""


class UncheckedMetadataWarning(UserWarning):
    """A trace written before its metadata carried a checksum: its labels are checked for consistency only."""


def checksum(tensor: torch.Tensor) -> str:
    """blake2b (16 bytes, hex) of a tensor's dtype, shape and bytes: stored per record, checked by `Trace.load`."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{t.dtype}:{tuple(t.shape)}:".encode(), digest_size=16)
    digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    return digest.hexdigest()


@dataclass
class Record:
    """Probabilities [batch, heads, queries, keys] from one attention call.

    `queries`/`keys` are absolute sequence positions (keys None = all keys of that step), `step` counts
    forward calls within a run (0 = prefill), `part` counts repeated calls of one module within a step.
    A record of a streamed trace holds no tensor until `probs` is first read: `source` reads it from its shard
    (memory-mapped, checksum verified on that first read); `shape`/`dtype` never read it."""

    probs: torch.Tensor = field(repr=False)
    heads: list[int]
    queries: list[int]
    keys: list[int] | None
    step: int = 0
    part: int = 0
    source: object = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> list[int]:
        return list(self._probs.shape) if self._probs is not None else list(self.source.shape)

    @property
    def dtype(self) -> str:
        return str(self._probs.dtype if self._probs is not None else self.source.dtype).removeprefix("torch.")

    def meta(self) -> dict:
        return {"heads": self.heads, "queries": self.queries, "keys": self.keys, "step": self.step, "part": self.part,
                "shape": self.shape, "dtype": self.dtype}


def _get_probs(self: Record) -> torch.Tensor:
    if self._probs is None and self.source is not None:
        self._probs = self.source.read()
    return self._probs


def _set_probs(self: Record, value) -> None:
    self._probs = value


Record.probs = property(_get_probs, _set_probs)  # after @dataclass: __init__ assigns through the setter


@dataclass
class Run:
    """One sequence: a forward pass, or a prefill plus the decode steps of `generate`.

    `prefix` counts positions a cache held before the capture saw the sequence (role "unknown"). Under beam
    search the rows change beams between steps: `eras` keeps the maps as they were before each reorder, as
    (last step they label, maps), and `lengths` the map length at each step, so `maps_at(step)` labels that
    step's rows (`lengths` holds the cached streams' lengths; a tower's map is the same at every step)."""

    tokens: dict[str, list[TokenMap]] = field(default_factory=dict)
    records: dict[tuple[str, int], list[Record]] = field(default_factory=dict)
    steps: int = 0
    prefix: int = 0
    eras: list[tuple[int, dict[str, list[TokenMap]]]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def reorder(self, rows: list[int], streams) -> None:
        """Row i now continues the sequence of row rows[i] (a beam reorder before the next step)."""
        self.eras.append((self.steps, {s: [t.copy() for t in maps] for s, maps in self.tokens.items() if s in streams}))
        for stream in streams:
            maps = self.tokens.get(stream)
            if maps:
                self.tokens[stream] = [maps[i].copy() for i in rows]

    def maps_at(self, stream: str, step: int | None = None) -> list[TokenMap] | None:
        """The maps labelling `stream`'s rows and keys at decode step `step` (None: after the last step)."""
        current = self.tokens.get(stream)
        if step is None or not current:
            return current
        if not 0 <= step <= self.steps:
            raise KeyError(f"step {step} is outside this run's steps 0..{self.steps}")
        maps = next((m[stream] for last, m in self.eras if step <= last and stream in m), current)
        if stream not in CACHED_STREAMS:  # a tower's or encoder's map does not grow with the decode steps
            return maps
        n = self.lengths[step] if step < len(self.lengths) else len(maps[0])
        return [t.head(n) for t in maps]


@dataclass
class Trace:
    runs: list[Run] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    # False for a trace loaded from a file written before metadata checksums (`UncheckedMetadataWarning`): its
    # labels were checked for consistency only; the viewer says so on the page
    labels_checked: bool = field(default=True, compare=False)

    def __repr__(self) -> str:
        keys = sorted({k for r in self.runs for k in r.records})
        streams = sorted({s for s, _ in keys})
        return f"Trace(runs={len(self.runs)}, streams={streams}, records={sum(len(v) for r in self.runs for v in r.records.values())})"

    def _repr_html_(self) -> str:
        from ..viz.html import notebook_html

        return notebook_html(self)

    def to_html(self, path=None, **kwargs):
        """The interactive viewer as one self-contained HTML string, written to `path` when given."""
        from ..viz import to_html

        return to_html(self, path, **kwargs)

    def run(self, run: int = -1) -> Run:
        if not self.runs:
            raise ValueError("the trace is empty: call the model inside the `with attnscope.capture(...)` block")
        n = len(self.runs)
        if not -n <= run < n:  # not Python's bare "list index out of range"
            raise IndexError(f"run {run} is out of range: the trace holds {n} run{'s' if n > 1 else ''} "
                             f"({'0' if n == 1 else f'0..{n - 1}'}, or -1 for the last)")
        return self.runs[run]

    def layers(self, stream: str, run: int = -1) -> list[int]:
        return sorted(layer for s, layer in self.run(run).records if s == stream)

    def layer_index(self, stream: str, layer: int, run: int = -1) -> int:
        """`layer` as a non-negative index: a negative one counts from the stream's last layer, as in
        `capture(layers=[0, -1])` (the stream's layer count is recorded in the provenance)."""
        if layer >= 0:
            return layer
        n = (self.provenance.get("streams") or {}).get(stream)
        if n is None:
            raise KeyError(f"this trace does not record how many layers stream {stream!r} has (written by an older "
                           f"attnscope, or an unknown stream); pass a layer from {self.layers(stream, run)}")
        if layer < -n:
            raise KeyError(f"layer {layer} is out of range: stream {stream!r} has {n} layers")
        return n + layer

    def tokens(self, stream: str, row: int = 0, run: int = -1, step: int | None = None) -> TokenMap:
        """The TokenMap of `stream` for batch row `row`; with `step`, the map that labels that decode step's rows
        (it differs from the final one only under beam search, where rows change beams between steps)."""
        maps = self.run(run).maps_at(stream, step)
        if not maps:
            raise KeyError(f"no token roles for stream {stream!r}; have {sorted(self.run(run).tokens)}")
        return maps[row]

    def record(self, stream: str, layer: int, step: int = 0, part: int = 0, run: int = -1) -> Record:
        """The record at (stream, layer) for one step and part; a negative layer counts from the last."""
        layer = self.layer_index(stream, layer, run)
        entries = self.run(run).records.get((stream, layer))
        if entries is None:
            have = sorted(self.run(run).records)
            raise KeyError(f"nothing captured at ({stream!r}, layer {layer}); captured: {have[:8]}{' ...' if len(have) > 8 else ''}")
        for rec in entries:
            if rec.step == step and rec.part == part:
                return rec
        raise KeyError(f"({stream!r}, layer {layer}) has no step {step} part {part}; steps: {sorted({r.step for r in entries})}")

    def attention(self, stream: str, layer: int, head: int | list[int] | None = None, step: int = 0, part: int = 0,
                  run: int = -1) -> torch.Tensor:
        """Probabilities [batch, heads, queries, keys] at (stream, layer), optionally for chosen heads (an int head
        drops the heads axis). A negative layer counts from the stream's last layer (-1 = the last)."""
        rec = self.record(stream, layer, step, part, run)
        if head is None:
            return rec.probs
        wanted = [head] if isinstance(head, int) else list(head)
        missing = [h for h in wanted if h not in rec.heads]
        if missing:
            raise KeyError(f"heads {missing} were not captured at ({stream!r}, layer {layer}); captured: {rec.heads}")
        idx = torch.tensor([rec.heads.index(h) for h in wanted])
        probs = rec.probs.index_select(1, idx.to(rec.probs.device))
        return probs[:, 0] if isinstance(head, int) else probs

    def steps(self, stream: str, layer: int, run: int = -1) -> torch.Tensor:
        """Rows of every step of a run stacked along queries, keys zero-padded to the final length
        (e.g. the last-token rows of each generated token). Needs all keys captured."""
        layer = self.layer_index(stream, layer, run)
        entries = sorted(self.run(run).records[(stream, layer)], key=lambda r: (r.step, r.part))
        if any(r.keys is not None for r in entries):
            raise ValueError("steps() needs every key from position 0 in every step: capture with keys=None (a "
                             "sliding-window cache records only its window; read those steps with record())")
        width = max(r.probs.shape[-1] for r in entries)
        return torch.cat([torch.nn.functional.pad(r.probs, (0, width - r.probs.shape[-1])) for r in entries], dim=2)

    # --- figures and exports --------------------------------------------------------------------------------
    def plot(self, stream: str | None = None, layer: int = -1, head: int | str = "mean", query: int | str = "cls",
             image=None, ax=None, step: int = 0, run: int = -1, row: int = 0):
        """Draw one captured head (or the mean/max over captured heads) of batch row `row` over the image (vision or
        VLM streams, as a heat map on the patch grid) or as a bar per token (text); a padding query is drawn grey and
        said so. See `attnscope.viz.figures.plot_trace`."""
        from ..viz.figures import plot_trace

        return plot_trace(self, stream, layer, head, query, image=image, ax=ax, step=step, run=run, row=row)

    def to_bertviz(self, stream: str | None = None, run: int = -1, row: int = 0) -> dict:
        """`{"attention": [per layer [1, heads, N, N]], "tokens": [...]}` for BertViz:
        `bertviz.head_view(**trace.to_bertviz())` (or `model_view`). Needs every query and key captured in a
        contiguous block of layers from 0 (`capture(model)` with the default selection). BertViz's views load
        their scripts from a CDN (require.js, d3, jQuery); attnscope's own HTML (`to_html`) needs no network."""
        from .export import to_bertviz

        return to_bertviz(self, stream, run, row)

    # --- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file: tensors plus JSON metadata (token roles, selection, provenance, a checksum
        per tensor). The file is created with the process's umask, like any file the user writes."""
        path = Path(path)
        tensors = {}

        def stored(key: str, rec: Record) -> dict:
            tensors[key] = rec.probs.detach().cpu().contiguous()
            return {"blake2b": checksum(tensors[key])}

        meta = sealed(self.metadata(stored))
        path.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(meta)}))
        return path

    def metadata(self, stored) -> dict:
        """The JSON metadata of a trace file: format, provenance, token maps and one entry per record;
        `stored(key, record)` puts the record's tensor somewhere and returns what the entry adds (checksum, shard)."""
        runs = []
        for r, run in enumerate(self.runs):
            records = []
            for (stream, layer), entries in run.records.items():
                for i, rec in enumerate(entries):
                    key = record_key(r, stream, layer, i)
                    records.append({"key": key, "stream": stream, "layer": layer} | rec.meta() | stored(key, rec))
            runs.append({"tokens": {s: [t.to_dict() for t in maps] for s, maps in run.tokens.items()},
                         "records": records, "steps": run.steps, "prefix": run.prefix, "lengths": run.lengths,
                         "eras": [[last, {s: [t.to_dict() for t in maps] for s, maps in m.items()}] for last, m in run.eras]})
        check_plain(self.provenance, "provenance")
        return {"format": FORMAT, "provenance": self.provenance, "runs": runs}

    @classmethod
    def load(cls, path: str | Path, partial: bool = False) -> Trace:
        """Read a trace written by `save`, validating its metadata against the checksum written with it (labels edited
        after writing raise `TraceFileError`; a file written before it carried one loads with an
        `UncheckedMetadataWarning`, `check_metadata`), every tensor against its recorded shape, dtype and checksum
        (a file with overwritten bytes raises `TraceFileError`; files written before checksums were recorded are
        checked for finite values only), and every entry's labels against its tensor's name (`check_label`).

        A file written by `Summaries.save` is read back as a `Summaries` (`summaries_file.py`), checked the same way
        (its packed tensors each checked when first read).

        A directory written by `capture(..., out=dir)` is opened lazily instead: metadata now, each tensor
        memory-mapped and checked against its checksum when first read (`stream.load_dir`). A directory whose
        capture did not finish is refused unless `partial=True` (then: the records written before it stopped)."""
        path = Path(path)
        if path.is_dir():
            from .stream_read import load_dir
            from .summaries import Summaries

            if issubclass(cls, Summaries):  # summaries are never streamed to a directory
                raise TraceFileError(f"{path} is a directory of attention rows, not summaries (a file written by "
                                     "Summaries.save): open it with Trace.load")
            return load_dir(cls, path, partial)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("attnscope")
                if raw is None:
                    raise TraceFileError(f"{path} is a safetensors file but not an attnscope trace (no 'attnscope' metadata)")
                meta = json.loads(raw)
                from . import summaries_file
                from .summaries import Summaries

                if isinstance(meta, dict) and meta.get("format") in summaries_file.FORMATS:  # summaries, not rows
                    return summaries_file.load(f, meta, path)
                found = meta.get("format") if isinstance(meta, dict) else None
                if isinstance(found, str) and found.startswith("attnscope.summaries/"):
                    raise TraceFileError(f"{path}: unsupported summaries format {found!r}; this attnscope reads "
                                         f"{' and '.join(summaries_file.FORMATS)}")
                if isinstance(found, str) and found.startswith("attnscope.explanation/"):  # Explanation.save's
                    raise TraceFileError(f"{path} is an explanation file ({found}), not a trace or summaries: read it "
                                         "with attnscope.Explanation.load(path) (its .to_html() is its page)")
                if issubclass(cls, Summaries):
                    raise TraceFileError(f"{path} holds attention rows, not summaries: open it with Trace.load")
                check_format(meta, path)
                checked = check_metadata(meta, path)
                trace = cls(provenance=meta.get("provenance", {}), labels_checked=checked)
                check_listed(f, [rm["key"] for run_meta in meta["runs"] for rm in run_meta["records"]], path)
                for run_index, run_meta in enumerate(meta["runs"]):
                    run = run_from_meta(run_meta)
                    for rm in run_meta["records"]:
                        check_label(rm, run_index, run, path)
                        tensor = f.get_tensor(rm["key"])
                        if list(tensor.shape) != rm["shape"] or str(tensor.dtype).removeprefix("torch.") != rm["dtype"]:
                            raise TraceFileError(f"{path}: tensor {rm['key']} is {list(tensor.shape)} {tensor.dtype}, "
                                                 f"metadata says {rm['shape']} {rm['dtype']}")
                        if "blake2b" in rm:
                            if checksum(tensor) != rm["blake2b"]:
                                raise TraceFileError(f"{path}: tensor {rm['key']} does not match its checksum (the file "
                                                     "was changed or damaged after it was written)")
                        elif not bool(torch.isfinite(tensor).all()):
                            raise TraceFileError(f"{path}: tensor {rm['key']} holds NaN or infinite values")
                        check_axes(rm, path)
                        rec = Record(tensor, rm["heads"], rm["queries"], rm["keys"], rm["step"], rm["part"])
                        run.records.setdefault((rm["stream"], rm["layer"]), []).append(rec)
                    trace.runs.append(run)
                return trace
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, TraceFileError):
                raise
            if isinstance(err, FileNotFoundError):
                raise
            raise TraceFileError(f"{path} is not a readable attnscope trace: {err}") from err


def check_plain(value, where: str, _inside: tuple = ()) -> None:
    """`value` is what JSON gives back as itself (None, bool, int, float, str, list, dict with str keys), so a trace
    loaded from a file has the provenance it was saved with (`loaded.provenance == trace.provenance`, but for a NaN,
    which is unequal to itself: a file stores NaN and the infinities as Python's JSON writes them); anything else (a
    tuple comes back a list, an int key a str, other objects not at all, a dict or list that holds itself) is a ValueError naming where it is, raised before anything is written. A capture's own
    provenance always is."""
    if isinstance(value, (dict, list)):
        if id(value) in _inside:  # JSON has no references: it would recurse without end
            raise ValueError(f"{where} holds itself (a {type(value).__name__} inside itself), which a trace file "
                             "(JSON) cannot store: store a copy")
        _inside = (*_inside, id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); a trace file stores JSON, whose "
                                 f"keys are strings, so it would load as {str(key)!r}: use string keys")
            check_plain(item, f"{where}[{key!r}]", _inside)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", _inside)
    elif value is not None and not isinstance(value, (str, int, float)):  # bool is an int
        hint = "a list" if isinstance(value, (tuple, set, frozenset, range)) else "plain JSON values"
        raise ValueError(f"{where} is a {type(value).__name__} ({value!r:.80}), which a trace file (JSON) does not give "
                         f"back as itself: store {hint} instead")


def record_key(run: int, stream: str, layer: int, index: int) -> str:
    """The tensor name of the `index`-th record at (stream, layer) of run `run`, in files and shards alike."""
    return f"r{run}/{stream}/{layer}/{index}"


def check_format(meta, path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TraceFileError(f"{path}: unsupported trace format {found!r}; expected {FORMAT}")


TRACE_LABELS = "a record's heads, queries or step, a token's role or the provenance"


def check_metadata(meta: dict, path, stacklevel: int = 3, what: str = "trace", labels: str = TRACE_LABELS,
                   resave: str = "Trace.save", error: type[ValueError] = TraceFileError) -> bool:
    """The metadata matches the checksum it was written with (`checksums.sealed`): a record's heads, queries, keys,
    step or part, a token's role, a grid, the steps, eras or provenance edited after writing (each of which leaves
    every tensor's checksum passing) is refused. Metadata without one (an attnscope before it) passes with a
    warning (`stacklevel`: frames up to the caller of `Trace.load`); one this version cannot check (unknown
    algorithm, malformed field, or a field set to null: no attnscope writes that) is refused. `what`, `labels`,
    `resave` and `error` name the kind of file in the messages (an explanation file is checked the same way).
    Returns True when the checksum was verified, False for metadata without one."""
    if METADATA_FIELD not in meta:
        warnings.warn(f"{path} was written by an attnscope whose {what} metadata had no checksum: its labels "
                      f"({labels}) are checked for consistency only; save it again ({resave}) to add one",
                      UncheckedMetadataWarning, stacklevel=stacklevel)
        return False
    entry = meta[METADATA_FIELD]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("algorithm", "digest")):
        raise error(f"{path}: malformed {METADATA_FIELD} field (the metadata was edited or damaged)")
    try:
        digest = metadata_digest(meta, entry.get("algorithm"))
    except ValueError as err:
        raise error(f"{path}: {err}") from err
    if digest != entry["digest"]:
        raise error(f"{path}: the {what} metadata does not match its checksum: it was edited or damaged after it was "
                    f"written (its labels, e.g. {labels}, cannot be trusted)")
    return True


def run_from_meta(run_meta: dict) -> Run:
    """A Run with its token maps, steps and beam eras from its metadata entry (records are added by the loader)."""
    return Run({s: [TokenMap.from_dict(t) for t in maps] for s, maps in run_meta["tokens"].items()},
               steps=run_meta.get("steps", 0), prefix=run_meta.get("prefix", 0),
               lengths=list(run_meta.get("lengths", [])),
               eras=[(int(last), {s: [TokenMap.from_dict(t) for t in maps] for s, maps in m.items()})
                     for last, m in run_meta.get("eras", [])])


def check_listed(f, names: list[str], path) -> None:
    """Every tensor of a single file is named by an entry of its metadata: an entry taken out (a layer's last records,
    a whole layer) would leave a trace missing records with every other check passing."""
    unlisted = sorted(set(f.keys()) - set(names))
    if unlisted:
        raise TraceFileError(f"{path}: {len(unlisted)} tensor(s) of the file ({', '.join(unlisted[:3])}) have no "
                             "entry in its metadata: the metadata was edited (records removed)")


def check_label(rm: dict, run_index: int, run: Run, path) -> None:
    """A checksum covers a tensor, not its labels: the tensor's name (`record_key`) must say the same run, stream and
    layer as the entry, at the next index of that layer in `run` (no record relabelled, reordered or duplicated); the
    stream is a str and the layer an int (a layer "1" would spell the same name and be filed apart from layer 1)."""
    if not isinstance(rm["stream"], str) or not isinstance(rm["layer"], int) or isinstance(rm["layer"], bool):
        raise TraceFileError(f"{path}: record {rm['key']} is labelled stream {rm['stream']!r}, layer {rm['layer']!r}: "
                             "a stream is a name and a layer an integer (the metadata was edited)")
    index = len(run.records.get((rm["stream"], rm["layer"]), []))
    if rm["key"] != record_key(run_index, rm["stream"], rm["layer"], index):
        raise TraceFileError(f"{path}: record {rm['key']} is labelled run {run_index}, stream {rm['stream']!r}, layer "
                             f"{rm['layer']}, record {index} of that layer: the metadata was edited (records "
                             "relabelled, reordered or duplicated)")


def check_axes(rm: dict, path) -> None:
    """A record's shape agrees with its heads, queries and keys."""
    b, h, q, k = rm["shape"]
    if h != len(rm["heads"]) or q != len(rm["queries"]) or (rm["keys"] is not None and k != len(rm["keys"])):
        raise TraceFileError(f"{path}: tensor {rm['key']} does not match its heads/queries/keys")
