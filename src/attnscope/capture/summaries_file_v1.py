"""Summaries files of format "attnscope.summaries/1", the format `Summaries.save` wrote before the packed one
(`summaries_file.py`, "attnscope.summaries/2"): one tensor per record and summary, named `<record key>/<summary>`,
each with its shape, dtype and blake2b checksum in the JSON metadata (with the trace's format, provenance, token maps
and per record its heads, queries, step and part), plus the XXH3-128 checksum of the metadata itself
("metadata_checksum", `checksums.sealed`). `load` reads such a file eagerly as `Trace.load` always did, checking the
metadata and every tensor (a damaged or altered file, labels included, raises `TraceFileError`); `save` is the
writer kept to produce /1 files (for an older attnscope, and for the tests that check the /1 reader)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..core.tokens import ROLES
from .checksums import sealed
from .summaries import TENSORS
from .trace import TraceFileError, check_label, check_listed, check_metadata, checksum, run_from_meta

FORMAT = "attnscope.summaries/1"
NAMES = TENSORS
_RANK = {"key_count": 2, "role_mass": 4, "lookback": 3, "entropy": 3, "topk_index": 4, "topk_value": 4}


def check_roles(meta: dict, path) -> None:
    """The file's role masses are over this attnscope's `ROLES`, in its order (both formats store them)."""
    if meta.get("roles") != list(ROLES):
        raise TraceFileError(f"{path}: its role masses are over the token roles {meta.get('roles')}, this attnscope's "
                             f"are {list(ROLES)}: read it with the attnscope that wrote it")


def save(trace, path: str | Path) -> Path:
    """Write `trace` (a `Summaries`) to one .safetensors file of format /1; tensors are named
    `<record key>/<summary>`."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}

    def stored(key: str, rec) -> dict:
        entry = {}
        for name, value in rec.tensors().items():  # a copy each: records of one batch share storage
            value = tensors[f"{key}/{name}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
            entry[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                           "blake2b": checksum(value)}
        return {"tensors": entry}

    meta = sealed(trace.metadata(stored) | {"format": FORMAT, "roles": list(ROLES)})
    path.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(meta)}))
    return path


def load(f, meta: dict, path):
    """The `Summaries` of an open safetensors file `f` whose metadata `meta` has this FORMAT."""
    from .summaries import Summaries, SummaryRecord

    checked = check_metadata(meta, path, stacklevel=5)
    check_roles(meta, path)
    trace = Summaries(provenance=meta.get("provenance", {}), labels_checked=checked)
    check_listed(f, [f"{rm['key']}/{name}" for run_meta in meta["runs"] for rm in run_meta["records"]
                     for name in rm["tensors"]], path)
    for run_index, run_meta in enumerate(meta["runs"]):
        run = run_from_meta(run_meta)
        for rm in run_meta["records"]:
            check_label(rm, run_index, run, path)
            values = {name: _tensor(f, rm, name, info, path) for name, info in rm["tensors"].items()}
            _check_axes(rm, values, path)
            rec = SummaryRecord(list(rm["heads"]), list(rm["queries"]), int(rm["step"]), int(rm["part"]), **values)
            run.records.setdefault((rm["stream"], rm["layer"]), []).append(rec)
        trace.runs.append(run)
    return trace


def _tensor(f, rm: dict, name: str, info: dict, path) -> torch.Tensor:
    key = f"{rm['key']}/{name}"
    if name not in NAMES:
        raise TraceFileError(f"{path}: record {rm['key']} holds an unknown summary {name!r}; known: {NAMES}")
    tensor = f.get_tensor(key)
    if list(tensor.shape) != info["shape"] or str(tensor.dtype).removeprefix("torch.") != info["dtype"]:
        raise TraceFileError(f"{path}: tensor {key} is {list(tensor.shape)} {tensor.dtype}, metadata says "
                             f"{info['shape']} {info['dtype']}")
    if checksum(tensor) != info["blake2b"]:
        raise TraceFileError(f"{path}: tensor {key} does not match its checksum (the file was changed or damaged after "
                             "it was written)")
    return tensor


def _check_axes(rm: dict, values: dict, path) -> None:
    """Every summary is [B, heads, queries, ...] of its record; key counts [B, roles]."""
    if "key_count" not in values:
        raise TraceFileError(f"{path}: record {rm['key']} has no key counts")
    batch = values["key_count"].shape[0]
    for name, value in values.items():
        want = [batch, len(ROLES)] if name == "key_count" else [batch, len(rm["heads"]), len(rm["queries"])]
        if value.dim() != _RANK[name] or list(value.shape[:len(want)]) != want:
            raise TraceFileError(f"{path}: tensor {rm['key']}/{name} {list(value.shape)} does not match its record's "
                                 f"batch, heads and queries")
        if name == "role_mass" and value.shape[-1] != len(ROLES):
            raise TraceFileError(f"{path}: tensor {rm['key']}/role_mass has {value.shape[-1]} roles, not {len(ROLES)}")
        if value.is_floating_point() and not torch.isfinite(value).all():  # as a file of rows is checked
            raise TraceFileError(f"{path}: tensor {rm['key']}/{name} holds NaN or infinite values")
    index, top = values.get("topk_index"), values.get("topk_value")
    if (index is None) != (top is None) or index is not None and (
            index.shape != top.shape or index.dtype != torch.long or top.dtype != torch.float32):
        raise TraceFileError(f"{path}: record {rm['key']} has top-k keys and values that do not pair up (both int64 "
                             "and float32 of one shape are written)")
