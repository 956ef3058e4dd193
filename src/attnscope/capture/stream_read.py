"""Opening a streamed trace directory (`stream.py` writes it): the metadata at once, each record's tensor memory-mapped
from its shard and checked against its checksum on first read; shards the metadata does not list, or that lack a
tensor it lists, are refused from their headers alone."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .checksums import entry_checksum, tensor_checksum
from .shard_io import DTYPES, TORCH_DTYPES, read_header
from .trace import Record, TraceFileError, check_axes, check_format, check_label, check_metadata, run_from_meta

META, PARTIAL, MARK = "trace.json", "trace.partial.json", "INCOMPLETE"


def is_ours(name: str) -> bool:
    """A file name a trace directory holds (its metadata, marker and shards)."""
    return name in (META, PARTIAL, MARK, META + ".tmp") or (name.startswith("shard-") and name.endswith(".safetensors"))


class ShardTensor:
    """Where a record's tensor lies in a shard; `read()` maps it (copy-on-write, the file is never changed) and
    verifies its checksum, raising `TraceFileError` if the shard was altered or cut."""

    def __init__(self, shard: Path, key: str, shape: list[int], dtype: torch.dtype, checksum: dict | None):
        self.shard, self.key, self.shape, self.dtype = Path(shard), key, list(shape), dtype
        self.checksum = checksum  # {"algorithm", "digest", "rows"?}: see checksums.py
        self.verified = checksum is None
        self._stamp = None  # (inode, size, mtime) of the shard when its checksum was verified
        self.pending = None  # the writer's job while the shard is being written

    def read(self) -> torch.Tensor:
        """The whole tensor, memory-mapped, checked against its checksum on the first read."""
        tensor, stamp = self._map()
        if not self.verified or stamp != self._stamp:  # a shard replaced since it was verified is verified again
            c = self.checksum
            if c is None or tensor_checksum(tensor, c["algorithm"], c.get("rows"))["digest"] != c["digest"]:
                raise TraceFileError(f"{self.shard}: tensor {self.key} does not match its checksum (the shard was "
                                     "changed or damaged after it was written)")
            self.verified, self._stamp = True, stamp
        return tensor

    def select(self, row: int, queries: list[int]) -> torch.Tensor:
        """probs[row, :, queries] as float32 [h, n, k], copied out of the map, which is not kept (the viewer's read);
        the whole tensor is verified first if it never was."""
        return self.read()[row][:, queries].float()

    def _map(self) -> torch.Tensor:
        while self.pending is not None:  # read inside the capture block: wait until the shard is written and summed
            job = self.pending
            job.result()
            if self.pending is job:
                self.pending = None
        if not self.verified and self.checksum is None:
            raise TraceFileError(f"{self.shard}: tensor {self.key} was not written (the writer failed)")
        try:
            with open(self.shard, "rb") as f:
                st = os.fstat(f.fileno())
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                found, data = read_header(f)
                entry = found[self.key]
            start, end = entry["data_offsets"]
            size = end - start
            expected = int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()
            if entry["shape"] != self.shape or TORCH_DTYPES.get(entry["dtype"]) != self.dtype or size != expected:
                raise TraceFileError(f"{self.shard}: tensor {self.key} is {entry['shape']} {entry['dtype']} in the shard, "
                                     f"the metadata says {self.shape} {self.dtype}")
            if data + end > self.shard.stat().st_size:
                raise TraceFileError(f"{self.shard} is shorter than its header says (cut while written or after)")
            raw = np.memmap(self.shard, dtype=np.uint8, mode="c", offset=data + start, shape=(size,)) if size else np.zeros(0, np.uint8)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            if isinstance(err, TraceFileError):
                raise
            if isinstance(err, FileNotFoundError):
                raise TraceFileError(f"{self.shard} is missing: the trace directory lost a shard after it was "
                                     "written") from err
            raise TraceFileError(f"{self.shard}: cannot read tensor {self.key}: {err}") from err
        return torch.from_numpy(raw).view(self.dtype).reshape(self.shape), stamp


def required_checksum(entry: dict, where: str) -> dict:
    """The checksum of a metadata entry (a record's, a pack's): `TraceFileError` naming `where` if it is malformed,
    of an unknown algorithm, or missing (the metadata was edited)."""
    try:
        found = entry_checksum(entry)
    except ValueError as err:
        raise TraceFileError(f"{where}: {err}") from err
    if found is None:
        raise TraceFileError(f"{where} has no checksum (the metadata was edited)")
    return found


def load_dir(cls, path: Path, partial: bool = False):
    """Open a streamed trace directory: metadata now, tensors on first access (see `ShardTensor`)."""
    meta_path = path / (PARTIAL if partial else META)
    mark = path / MARK
    if not partial and (mark.exists() or not meta_path.exists()):
        why = mark.read_text().strip() if mark.exists() else "no trace.json"
        hint = " Trace.load(path, partial=True) opens the records written before it." if (path / PARTIAL).exists() else ""
        raise TraceFileError(f"{path} is not a complete attnscope trace ({why or 'the capture did not finish'}).{hint}")
    if not meta_path.exists():
        raise TraceFileError(f"{path} has no {meta_path.name}: not a (partial) attnscope trace directory")
    try:
        meta = json.loads(meta_path.read_text())
        check_format(meta, meta_path)
        checked = check_metadata(meta, meta_path, stacklevel=4)
        if meta.get("incomplete") and not partial:  # a partial trace's metadata put in trace.json's place
            raise TraceFileError(f"{meta_path} describes a capture that did not finish ({meta['incomplete']}); "
                                 "open it with Trace.load(path, partial=True)")
        trace = cls(provenance=meta.get("provenance", {}), labels_checked=checked)
        for run_index, run_meta in enumerate(meta["runs"]):
            run = run_from_meta(run_meta)
            for rm in run_meta["records"]:
                check_axes(rm, meta_path)
                check_label(rm, run_index, run, meta_path)
                shard = path / rm["shard"]
                if Path(rm["shard"]).name != rm["shard"] or not is_ours(rm["shard"]):
                    raise TraceFileError(f"{meta_path}: record {rm['key']} names shard {rm['shard']!r}, outside the trace")
                if not shard.is_file():
                    raise TraceFileError(f"{meta_path}: record {rm['key']} lies in {rm['shard']}, which is missing from "
                                         f"{path} (a shard was deleted or not copied)")
                summed = required_checksum(rm, f"{meta_path}: record {rm['key']}")
                dtype = getattr(torch, rm["dtype"], None)
                if dtype not in DTYPES:
                    raise TraceFileError(f"{meta_path}: record {rm['key']} has unsupported dtype {rm['dtype']!r}")
                source = ShardTensor(shard, rm["key"], rm["shape"], dtype, summed)
                rec = Record(None, rm["heads"], rm["queries"], rm["keys"], rm["step"], rm["part"], source=source)
                run.records.setdefault((rm["stream"], rm["layer"]), []).append(rec)
            trace.runs.append(run)
        check_shards_listed(path, meta_path, meta, partial)
        return trace
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, OSError) as err:
        if isinstance(err, TraceFileError):
            raise
        raise TraceFileError(f"{meta_path} is not readable attnscope trace metadata: {err}") from err


def shard_keys(shard: Path) -> set[str]:
    """The tensor names in a shard's safetensors header (its first bytes only; no tensor data is read)."""
    with open(shard, "rb") as f:
        found, _ = read_header(f)
    return set(found) - {"__metadata__"}


def check_shards_listed(path: Path, meta_path: Path, meta: dict, partial: bool) -> None:
    """Every tensor in the directory's shards has an entry in the metadata, and every entry's tensor is in the shard
    it names (as `check_listed` does for a single file): an entry taken out of trace.json would otherwise leave a
    trace missing records with every other check passing. Reads the shards' headers only. A partial trace may hold
    a shard its metadata does not name (a record whose writing failed is left out of it); such a shard is skipped."""
    listed: dict[str, set[str]] = {}
    for run_meta in meta["runs"]:
        for rm in run_meta["records"]:
            listed.setdefault(rm["shard"], set()).add(rm["key"])
    for name in sorted({p.name for p in path.glob("shard-*.safetensors")} | set(listed)):
        shard, names = path / name, listed.get(name)
        if names is None and partial:
            continue
        try:
            keys = shard_keys(shard)
        except (OSError, ValueError, struct.error) as err:
            raise TraceFileError(f"{shard}: cannot read its header ({err}); the shard was damaged, or it is not part "
                                 f"of the trace that {meta_path.name} describes") from err
        unlisted, absent = sorted(keys - (names or set())), sorted((names or set()) - keys)
        if unlisted:
            raise TraceFileError(f"{shard}: {len(unlisted)} tensor(s) ({', '.join(unlisted[:3])}) have no entry in "
                                 f"{meta_path.name}: the metadata was edited (records removed) or the shard does not "
                                 "belong to this trace")
        if absent:
            raise TraceFileError(f"{meta_path}: record(s) {', '.join(absent[:3])} are not in {shard.name}, the shard "
                                 "their entries name (the shard was replaced or the metadata edited)")
