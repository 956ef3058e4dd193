"""Summaries in a file: `Summaries.save(path)` writes one .safetensors file of format "attnscope.summaries/2";
`Trace.load(path)` reads it (and the per-record format /1, `summaries_file_v1.py`) back as a `Summaries`.

Packed: one tensor per (stream, layer, summary), named `<stream>/<layer>/<summary>`, holding the values of that
layer's records of every run laid end to end (flattened, run by run, each run's records in order), so the number of
tensors does not grow with steps or runs (a 200-step generation on SmolLM2: 180 tensors instead of 36,000). Every
summary of a record has a shape fixed by four numbers, `batch`, its heads, its query rows and, for top-k, `k`
(`shape_of`); the metadata lists per run and layer the records (heads, queries, step, part, batch, k, and `has`
where a record lacks some of its layer's summaries), so each record's slice of each pack is the running sum of the
sizes before it. Each record also states where it starts (`at`, `advance`: the running sums of batch rows, of rows
and of top-k keys before it), so a record entry moved, or dims moved from one record to another, which would leave
every pack's size fitting and a record reading another's values, is refused at load; so are a layer's records of
a run out of (step, part) order, beyond the run's steps or with query rows beyond its token maps (`out_of_order`),
which `save` does not write either.
Per pack the metadata gives its dtype, size and XXH3-128 checksum (`checksums.tensor_checksum`); the metadata
itself is sealed (`checksums.sealed`, a /2 file without its seal is refused). `save` refuses NaN or infinite
summaries, which both loaders refuse as damage (no file the tool cannot read back).

Loading is lazy where it pays: `load` checks the metadata (its checksum, every record's dims and start, each pack's
size against the sum of its records', the file's tensors against the packs) and builds the records without reading a
tensor. A record's summary is read on first access (`SummaryRecord.source`): the whole pack it lies in is read from
the file then, checked against its checksum and for finite values once, and every record of that layer slices it
from memory after. So a reader of one layer reads and checksums that layer's packs only; a damaged pack raises
`TraceFileError` when first read, not at load (`Summaries.verify()` reads and checks every pack up front). The file is
reopened by its absolute path (a change of directory after loading does not matter; moving the file does)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..core.tokens import ROLES
from . import summaries_file_v1 as v1
from .checksums import METADATA_FIELD, sealed, tensor_checksum
from .shard_io import read_header
from .stream_read import required_checksum
from .summaries import TENSORS, UNREAD
from .trace import TraceFileError, check_metadata, run_from_meta

FORMAT = "attnscope.summaries/2"
FORMATS = (v1.FORMAT, FORMAT)  # what `load` reads
_PAIRED = {"topk_index": torch.int64, "topk_value": torch.float32}  # written as a pair, of these dtypes


def shape_of(name: str, batch: int, heads: int, rows: int, k: int | None) -> tuple[int, ...]:
    """The shape of summary `name` of a record: key counts [B, R], role masses [B, h, r, R], top-k [B, h, r, k],
    the rest [B, h, r]."""
    if name == "key_count":
        return batch, len(ROLES)
    if name == "role_mass":
        return batch, heads, rows, len(ROLES)
    return (batch, heads, rows, k) if name in _PAIRED else (batch, heads, rows)


def pack_name(stream: str, layer: int, name: str) -> str:
    return f"{stream}/{layer}/{name}"


# --- writing -----------------------------------------------------------------------------------------------------
def save(trace, path: str | Path) -> Path:
    """Write `trace` (a `Summaries`) to one .safetensors file of FORMAT."""
    path = Path(path)
    meta = trace.metadata(lambda key, rec: {})
    parts: dict[tuple, list[torch.Tensor]] = {}  # (stream, layer, name) -> every run's values, in order
    found = [{key: [rec.tensors() for rec in entries] for key, entries in run.records.items()} for run in trace.runs]
    held: dict[tuple, set] = {}  # (stream, layer) -> the summaries its records hold, over every run
    for run_found in found:
        for key, values in run_found.items():
            held.setdefault(key, set()).update(n for v in values for n in v)
    starts: dict[tuple, list[int]] = {}  # (stream, layer) -> the `at` of its next record, over every run
    labels: dict[tuple, list[tuple]] = {}  # (stream, layer, name) -> each value's (step, run), for messages
    for index, (run, run_found, run_meta) in enumerate(zip(trace.runs, found, meta["runs"])):
        del run_meta["records"]
        run_meta["layers"] = [{"stream": stream, "layer": layer, "records": _entries(
            stream, layer, entries, run_found[stream, layer], [n for n in TENSORS if n in held[stream, layer]], parts,
            starts.setdefault((stream, layer), [0, 0, 0]), labels, index, run.steps, run.tokens.get(stream))}
            for (stream, layer), entries in run.records.items()]
    tensors, packs = {}, {}
    for (stream, layer, name), values in parts.items():
        dtypes = {v.dtype for v in values}
        if len(dtypes) > 1:
            raise ValueError(f"({stream!r}, layer {layer}): the records' {name} tensors have several dtypes "
                             f"{sorted(map(str, dtypes))}; a summaries file packs one dtype per layer and summary")
        key = pack_name(stream, layer, name)
        packed = tensors[key] = torch.cat(values)
        if packed.is_floating_point() and not bool(torch.isfinite(packed).all()):  # both loaders refuse such a file
            step, run = next(w for w, v in zip(labels[stream, layer, name], values)
                             if not bool(torch.isfinite(v).all()))
            raise ValueError(f"({stream!r}, layer {layer}) step {step} of run {run}: {name} holds NaN or infinite "
                             "values, which no summary of attention probabilities has and both loaders refuse as "
                             "damage; nothing was written")
        packs[key] = {"dtype": str(packed.dtype).removeprefix("torch."), "numel": packed.numel(),
                      "checksum": tensor_checksum(packed)}
    meta = sealed(meta | {"format": FORMAT, "roles": list(ROLES), "packs": packs})
    path.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(meta)}))
    return path


def _entries(stream: str, layer: int, entries: list, values: list[dict], names: list[str], parts: dict,
             at: list[int], labels: dict, run: int, trace_steps: int, maps: list | None) -> list[dict]:
    """The metadata entries of run `run`'s records at (stream, layer), with their tensors `values`, whose layer holds
    `names` (in some record of some run); their values flattened onto `parts`; `at`, the layer's running sums
    (`advance`), moved past them."""
    wrong = out_of_order(entries, trace_steps, maps)
    if wrong:
        raise ValueError(f"({stream!r}, layer {layer}) of run {run}: {wrong}; a capture makes them in order, and the "
                         "loader refuses a file whose records are not")
    out = []
    for rec, found in zip(entries, values):
        if "key_count" not in found:
            raise ValueError(f"({stream!r}, layer {layer}) step {rec.step}: a record without key counts")
        k = next((found[n].shape[-1] for n in _PAIRED if n in found), None)
        dims = (found["key_count"].shape[0], len(rec.heads), len(rec.queries), k)
        entry = {"heads": list(rec.heads), "queries": list(rec.queries), "step": int(rec.step),
                 "part": int(rec.part), "batch": dims[0]} | ({} if k is None else {"k": k}) | {"at": list(at)}
        advance(at, dims)
        if len(found) != len(names):
            entry["has"] = [n for n in names if n in found]
        for name, value in found.items():
            if tuple(value.shape) != shape_of(name, *dims):
                raise ValueError(f"({stream!r}, layer {layer}) step {rec.step}: {name} is {list(value.shape)}, its "
                                 f"record's batch, heads, queries and k make it {list(shape_of(name, *dims))}")
            parts.setdefault((stream, layer, name), []).append(value.detach().cpu().reshape(-1))
            labels.setdefault((stream, layer, name), []).append((rec.step, run))
        out.append(entry)
    return out


def out_of_order(records: list, steps: int, maps: list | None) -> str | None:
    """What is wrong with the steps, parts and query rows of one run's records at a layer, None if nothing: a capture
    appends them as the forwards run, so their (step, part) never decreases, each step lies in 0..`steps` (the run's
    decode steps) and each query row is a position of the stream's token maps `maps`. Two records' steps swapped, a
    step or query row set beyond the run, would otherwise label values with another step or position."""
    order = [(rec.step, rec.part) for rec in records]
    if any(b < a for a, b in zip(order, order[1:])):
        return f"its records' (step, part) {order[:12]} are not in the order a capture makes them"
    if order and not (0 <= order[0][0] and order[-1][0] <= steps):
        return f"its records' steps {[st for st, _ in order][:12]} are not within the run's steps 0..{steps}"
    if maps:
        n = max(len(m) for m in maps)
        wrong = next((rec for rec in records if any(not 0 <= q < n for q in rec.queries)), None)
        if wrong is not None:
            return f"step {wrong.step} has query rows {wrong.queries[:12]} outside the stream's {n} positions"
    return None


def advance(at: list[int], dims: tuple) -> None:
    """Move `at`, a layer's running sums [batch rows, batch x heads x query rows, the same x k] over its records
    (every run, in order), past a record of `dims` (batch, heads, rows, k). Each record's entry holds the sums before
    it, so an entry moved, or dims moved between records, make a record's slice start elsewhere than it says: the
    pack sizes alone would still fit, and each such record would read another's values."""
    batch, heads, rows, k = dims
    at[0] += batch
    at[1] += batch * heads * rows
    at[2] += batch * heads * rows * (k or 0)


# --- reading -----------------------------------------------------------------------------------------------------
def load(f, meta: dict, path):
    """The `Summaries` of an open safetensors file `f` whose metadata `meta` has a format of FORMATS."""
    if meta.get("format") == v1.FORMAT:
        return v1.load(f, meta, path)
    from .summaries import Summaries, SummaryRecord

    if METADATA_FIELD not in meta:  # every writer of /2 seals it: its labels could not be trusted
        raise TraceFileError(f"{path}: a {FORMAT} file without its {METADATA_FIELD} field (the metadata was edited)")
    check_metadata(meta, path)
    v1.check_roles(meta, path)
    path = Path(path).absolute()  # packs are read later, perhaps after a change of directory
    located = _locate(path)
    if set(located) != set(meta["packs"]):
        extra, missing = sorted(set(located) - set(meta["packs"])), sorted(set(meta["packs"]) - set(located))
        raise TraceFileError(f"{path}: the file's tensors are not its metadata's packs (not listed: {extra[:3]}, "
                             f"missing: {missing[:3]}): the file was edited")
    layers: dict[tuple, PackedLayer] = {}
    trace = Summaries(provenance=meta.get("provenance", {}), labels_checked=True)
    for run_meta in meta["runs"]:
        run = run_from_meta(run_meta)
        for lm in run_meta["layers"]:
            stream, layer = lm["stream"], lm["layer"]
            if not isinstance(stream, str) or type(layer) is not int or (stream, layer) in run.records:
                raise TraceFileError(f"{path}: layer entry {stream!r}, {layer!r} is not a new (stream name, integer "
                                     "layer) of its run (the metadata was edited)")
            packed = layers.get((stream, layer))
            if packed is None:
                packed = layers[stream, layer] = PackedLayer(path, stream, layer, meta["packs"], located)
            run.records[stream, layer] = [packed.add(rm, SummaryRecord) for rm in lm["records"]]
            wrong = out_of_order(run.records[stream, layer], run.steps, run.tokens.get(stream))
            if wrong:
                raise TraceFileError(f"{path}: ({stream!r}, layer {layer}) of run {len(trace.runs)}: {wrong} (the "
                                     "metadata was edited)")
        trace.runs.append(run)
    for packed in layers.values():
        packed.check_sizes()
    unused = set(located) - {key for p in layers.values() for key in p.packs}
    if unused:
        raise TraceFileError(f"{path}: packs {sorted(unused)[:3]} belong to no record (the metadata was edited)")
    return trace


def _locate(path) -> dict[str, tuple[int, int]]:
    """Each tensor of a safetensors file: its (start, end) byte offsets in the file."""
    with open(path, "rb") as fh:
        found, data = read_header(fh)
    found.pop("__metadata__", None)
    return {key: (data + e["data_offsets"][0], data + e["data_offsets"][1]) for key, e in found.items()}


class PackedLayer:
    """The summaries of one (stream, layer) in every run of a /2 file: a pack per summary, read from the file and
    verified (checksum, finite values) when a record first reads it, then sliced from memory."""

    def __init__(self, path, stream: str, layer: int, packs: dict, located: dict):
        self.path, self.where = path, f"({stream!r}, layer {layer})"
        self.packs: dict[str, tuple] = {}  # file tensor name -> (name, dtype, numel, checksum, (start, end))
        self.names: dict[str, str] = {}  # summary name -> file tensor name
        for name in TENSORS:
            key = pack_name(stream, layer, name)
            if key in packs:
                entry = packs[key]
                dtype = getattr(torch, entry["dtype"], None) if isinstance(entry["dtype"], str) else None
                numel = entry["numel"]
                if not isinstance(dtype, torch.dtype) or type(numel) is not int or (
                        name in _PAIRED and dtype != _PAIRED[name]):
                    raise TraceFileError(f"{path}: pack {key} is {entry['dtype']!r} of {numel!r} values, not a "
                                         f"summary this attnscope writes")
                start, end = located[key]
                if end - start != numel * dtype.itemsize:
                    raise TraceFileError(f"{path}: pack {key} holds {end - start} bytes, its metadata says {numel} "
                                         f"{entry['dtype']}")
                self.packs[key] = (name, dtype, numel, required_checksum(entry, f"{path}: pack {key}"), (start, end))
                self.names[name] = key
        if "key_count" not in self.names or (("topk_index" in self.names) != ("topk_value" in self.names)):
            raise TraceFileError(f"{path}: {self.where} has no key counts, or top-k keys without their values")
        self.dims: list[tuple] = []  # per record (batch, heads, rows, k)
        self.offsets: dict[str, list] = {name: [] for name in self.names}  # per record its start, None: not held
        self._size = dict.fromkeys(self.names, 0)
        self._at = [0, 0, 0]  # the running sums a record's "at" must equal (`advance`)
        self._read: dict[str, torch.Tensor] = {}

    def add(self, rm: dict, record_type):
        """The record of metadata entry `rm` (the next of this layer), its tensors unread."""
        heads, queries, batch, k = rm["heads"], rm["queries"], rm["batch"], rm.get("k")
        has = rm.get("has", self.names)
        if not (isinstance(heads, list) and isinstance(queries, list) and type(batch) is int and batch >= 0
                and type(rm["step"]) is int and type(rm["part"]) is int and "key_count" in has
                and all(n in self.names for n in has) and (k is None) == ("topk_index" not in has)
                and ("topk_index" in has) == ("topk_value" in has) and (k is None or type(k) is int and k >= 0)):
            raise TraceFileError(f"{self.path}: a record of {self.where} has malformed labels or summaries {rm}")
        dims = (batch, len(heads), len(queries), k)
        if "at" not in rm:
            raise TraceFileError(f"{self.path}: record {len(self.dims)} of {self.where} (over every run; step "
                                 f"{rm['step']}) does not say where its slices start ('at'): the metadata was edited, "
                                 "or a development version of this format wrote it before records said so")
        if rm["at"] != self._at:
            raise TraceFileError(f"{self.path}: record {len(self.dims)} of {self.where} (over every run; step "
                                 f"{rm['step']}) starts at {rm.get('at')}, the records before it end at {self._at}: "
                                 "records were moved or their batch, heads, queries or k edited (the metadata was "
                                 "edited)")
        advance(self._at, dims)
        self.dims.append(dims)
        for name, starts in self.offsets.items():
            if name in has:
                starts.append(self._size[name])
                self._size[name] += math.prod(shape_of(name, *dims))
            else:
                starts.append(None)
        rec = record_type(heads, queries, rm["step"], rm["part"], **{n: UNREAD for n in has})
        rec.source = (self, len(self.dims) - 1)
        return rec

    def check_sizes(self) -> None:
        """Each pack holds exactly its records' values (none missing, none left over)."""
        for name, key in self.names.items():
            if self._size[name] != self.packs[key][2]:
                raise TraceFileError(f"{self.path}: pack {key} holds {self.packs[key][2]} values, its records "
                                     f"{self._size[name]} (the metadata was edited)")

    def read(self, index: int, name: str) -> torch.Tensor | None:
        """Summary `name` of this layer's `index`-th record (counted over every run), a view of its pack."""
        start = self.offsets[name][index] if name in self.offsets else None
        if start is None:
            return None
        pack = self._read.get(name)
        if pack is None:
            pack = self._read[name] = self._pack(name)
        shape = shape_of(name, *self.dims[index])
        strides, size = [], 1  # contiguous: one view op (a slice and a view are two, several times slower)
        for n in reversed(shape):
            strides.append(size)
            size *= n
        return pack.as_strided(shape, strides[::-1], start)

    def nbytes(self, index: int, name: str) -> int:
        """Bytes of summary `name` of the `index`-th record, without reading it."""
        if name not in self.offsets or self.offsets[name][index] is None:
            return 0
        return math.prod(shape_of(name, *self.dims[index])) * self.packs[self.names[name]][1].itemsize

    def _pack(self, name: str) -> torch.Tensor:
        key = self.names[name]
        _, dtype, numel, check, (start, end) = self.packs[key]
        out = torch.empty(numel, dtype=dtype)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(start)
                got = fh.readinto(out.view(torch.uint8).numpy()) if numel else 0
        except OSError as err:
            raise TraceFileError(f"{self.path}: cannot read pack {key}: {err}") from err
        if got != end - start:
            raise TraceFileError(f"{self.path} is shorter than when it was loaded (pack {key} cut): it was cut or "
                                 "replaced since; load it again")
        if tensor_checksum(out, check["algorithm"])["digest"] != check["digest"]:
            raise TraceFileError(f"{self.path}: pack {key} does not match its checksum (the file was changed or "
                                 "damaged after it was written, or replaced after it was loaded: packs are read "
                                 "when first used)")
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise TraceFileError(f"{self.path}: pack {key} holds NaN or infinite values")
        return out
