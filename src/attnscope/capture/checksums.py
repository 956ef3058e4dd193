"""Checksums of the tensors in a streamed trace, taken from memory while they are written.

A record's entry in `trace.json` carries `"checksum": {"algorithm": ..., "digest": ..., "rows": ...}`:
- `algorithm`: `xxh3_128` (XXH3, 128 bits, ~8 GB/s on one core) for what this version writes; `blake2b` (16
  bytes, ~0.5 GB/s here) is still read, as is the bare `"blake2b": digest` field of traces written before the
  algorithm was named. Both detect a cut, a flipped bit or a swapped shard; neither is a signature (whoever can
  edit a shard can edit trace.json too).
- `digest`: hex, over `"{dtype}:{shape}:"` then the tensor's bytes.
- `rows` (optional): the bytes were fed a block of that many query rows at a time, every batch row and head of
  one block before the next block (the order a record streamed chunk by chunk is written in, so the writer
  hashes each chunk while it is in memory instead of reading the shard back); absent: in memory order.

The metadata itself (a file's "attnscope" JSON, a directory's trace.json or trace.partial.json, a summaries file's
JSON) carries `"metadata_checksum": {"algorithm": "xxh3_128", "digest": ...}` (`sealed`): XXH3-128 of the
canonical JSON of every other field (keys sorted, compact separators, ASCII), so a label edited after writing (a
record's heads, queries or step, a token's role, the provenance) is caught on load like an edited tensor
(`trace.check_metadata`). Files written before it carry none and are still read (with a warning)."""
from __future__ import annotations

import hashlib
import json

import torch
import xxhash

WRITTEN = "xxh3_128"  # the algorithm new streamed shards are checksummed with
_NEW = {"xxh3_128": xxhash.xxh3_128, "blake2b": lambda: hashlib.blake2b(digest_size=16)}


class TensorDigest:
    """An incremental checksum of a tensor of `shape`/`dtype`: feed it the bytes in the order `rows` defines."""

    def __init__(self, dtype: torch.dtype, shape, algorithm: str = WRITTEN, rows: int | None = None):
        if algorithm not in _NEW:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {sorted(_NEW)}")
        self.algorithm, self.rows = algorithm, rows
        self._h = _NEW[algorithm]()
        self._h.update(f"{dtype}:{tuple(shape)}:".encode())

    def update(self, tensor: torch.Tensor) -> None:
        """Add a contiguous CPU tensor's bytes (read in place, not copied)."""
        if tensor.numel():
            self._h.update(tensor.reshape(-1).view(torch.uint8).numpy())

    def entry(self) -> dict:
        out = {"algorithm": self.algorithm, "digest": self._h.hexdigest()}
        return out if self.rows is None else out | {"rows": self.rows}


def tensor_checksum(tensor: torch.Tensor, algorithm: str = WRITTEN, rows: int | None = None) -> dict:
    """The checksum entry of a whole tensor [B, H, Q, K] (or any shape when `rows` is None), in `rows` order."""
    t = tensor.detach().cpu().contiguous()
    digest = TensorDigest(t.dtype, t.shape, algorithm, rows)
    if rows is None or t.dim() != 4 or rows >= t.shape[2]:
        digest.update(t)
    else:
        for start in range(0, t.shape[2], rows):
            for b in range(t.shape[0]):
                for h in range(t.shape[1]):
                    digest.update(t[b, h, start: start + rows])
    return digest.entry()


def entry_checksum(rm: dict) -> dict | None:
    """The checksum of a record entry of trace.json ({"algorithm", "digest", "rows"?}), None if it has none;
    ValueError for one this version cannot check (an unknown algorithm, a malformed field)."""
    if "checksum" not in rm:
        return {"algorithm": "blake2b", "digest": rm["blake2b"]} if isinstance(rm.get("blake2b"), str) else None
    c = rm["checksum"]
    if not isinstance(c, dict) or not isinstance(c.get("digest"), str):
        raise ValueError("malformed checksum field")
    if c.get("algorithm") not in _NEW:
        raise ValueError(f"checksum algorithm {c.get('algorithm')!r} is not known to this attnscope (known: "
                         f"{sorted(_NEW)}); it may come from a newer version")
    rows = c.get("rows")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"malformed checksum rows {rows!r}")
    return {"algorithm": c["algorithm"], "digest": c["digest"]} | ({"rows": rows} if rows is not None else {})


METADATA_FIELD = "metadata_checksum"  # the field of the metadata that holds its own checksum


def canonical_json(meta: dict) -> bytes:
    """The bytes the metadata checksum is taken over: `meta` as JSON with sorted keys and compact separators, ASCII
    only. Taken over `meta` as read back from JSON, so tuples, int keys and floats hash as they will be read."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def metadata_digest(meta: dict, algorithm: str = WRITTEN) -> str:
    """The hex digest of `meta` (its checksum field left out) under `algorithm`."""
    if algorithm not in _NEW:
        raise ValueError(f"metadata checksum algorithm {algorithm!r} is not known to this attnscope (known: "
                         f"{sorted(_NEW)}); it may come from a newer version")
    h = _NEW[algorithm]()
    h.update(canonical_json({k: v for k, v in meta.items() if k != METADATA_FIELD}))
    return h.hexdigest()


def sealed(meta: dict) -> dict:
    """`meta` as it will be read back from JSON, plus its checksum field (what every trace writer stores)."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != METADATA_FIELD}))
    return plain | {METADATA_FIELD: {"algorithm": WRITTEN, "digest": metadata_digest(plain)}}
