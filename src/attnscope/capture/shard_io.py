"""Writing safetensors shards for streamed traces (`stream.py`): the header, writes that go whole to disk, by direct I/O
where the system allows, shards flushed and dropped from the page cache once written, and the heap given back after a
large record."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import struct
from pathlib import Path

import torch

from .checksums import tensor_checksum

ALIGN = 4096  # row-chunk buffers, a chunked shard's data and each direct write start (and end) at multiples of this
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # safetensors names
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte is written: one call may write fewer than asked (a full disk, a signal, a
    file-size limit) and says so only in what it returns; a call that writes nothing raises."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} of {len(view)} bytes at offset {offset}")
        view, offset = view[n:], offset + n


def open_direct(path: Path) -> int | None:
    """A second descriptor of `path` for direct I/O (O_DIRECT: the bytes go from the process's memory to the disk,
    not copied into the page cache first); None where the system or file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def write_piece(fd: int, direct: int | None, piece: torch.Tensor, offset: int) -> int | None:
    """Write a contiguous tensor's bytes at `offset`: by direct I/O when its address, offset and length are
    multiples of ALIGN (what O_DIRECT asks), else through the page cache. Returns the direct descriptor, or None
    once the file system refused a direct write (the rest go through the page cache); the caller closes it then (and
    only the caller: if the page-cache write raises, the caller still holds the descriptor and closes it once)."""
    data = piece.reshape(-1).view(torch.uint8).numpy()
    if direct is not None and not (piece.data_ptr() | offset | data.nbytes) % ALIGN:
        try:
            pwrite_all(direct, data, offset)
            return direct
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            direct = None
    pwrite_all(fd, data, offset)
    return direct


def header(items: list[tuple[str, torch.dtype, list[int], int]], align: int = 8) -> bytes:
    """The safetensors header (length prefix included) for (key, dtype, shape, bytes) laid end to end, padded with
    spaces so that the data starts at a multiple of `align` (8, as safetensors writes it, or ALIGN)."""
    header, offset = {}, 0
    for key, dtype, shape, size in items:
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % align)
    return struct.pack("<Q", len(raw)) + raw


def read_header(fh) -> tuple[dict, int]:
    """The safetensors header of an open file (`header` writes it; `__metadata__` included) and the offset its data
    starts at; ValueError for a file that does not start with one."""
    head = fh.read(8)
    if len(head) != 8:
        raise ValueError("no safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > 100_000_000:
        raise ValueError("header length out of range")
    found = json.loads(fh.read(n))
    if not isinstance(found, dict):
        raise ValueError("the header is not a JSON object")
    return found, 8 + n


def _load_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_trim()


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim) once a full-matrix record is written:
    with glibc's default malloc, the row chunks and score blocks freed while a layer streams otherwise stay in the
    heap and add up (bench/results/stream.md: 0.21-0.23x of eager + output_attentions at 1k tokens with it; the
    same bench before this trim, with blake2b checksums, gave 0.30-0.33x); ~2 ms a record, on the writer thread."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def write_through(path: Path) -> None:
    """Flush a finished shard to disk and drop its pages from the page cache. The capture then keeps at most about
    WRITEBACK_BYTES of its output in the cache however long the trace (8.6 GB at 4k tokens in float16), the pages
    it freed are the ones the next shards are written into, and the trace is on disk when trace.json says it is
    complete. On the benchmark machine (a VM) writing into pages the kernel had not used in the last seconds cost
    1.8 s of CPU per GB, written through like this 0.24 s (bench/results/stream.md)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:  # a file system without it: the pages stay cached, nothing else changes
                pass
    finally:
        os.close(fd)


def write_shard(path: Path, items: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """Write contiguous CPU tensors as one safetensors file, straight from their memory; returns their checksum
    entries (checksums.py), taken from the same memory."""
    raw = header([(key, t.dtype, list(t.shape), t.numel() * t.element_size()) for key, t in items])
    sums = []
    with open(path, "wb") as f:
        f.write(raw)
        for _, t in items:
            sums.append(tensor_checksum(t))
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    return sums
