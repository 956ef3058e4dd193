"""Traces streamed to disk while the model runs, and opened lazily.

`capture(model, ..., out="trace_dir/")` hands every record to a `TraceWriter` as it is computed, and a background
thread writes it into a safetensors shard and checksums it; the record then keeps only where it lies. A record of
at least `SHARD_BYTES` (a full matrix) never exists whole: its query rows are computed a chunk at a time
(`TraceWriter.add_rows`), each chunk written at its place in its own shard while the next is computed, and hashed
from memory as it is written (XXH3-128 in chunk order, `checksums.py`). The chunks are computed in page-aligned
buffers the writer hands out and takes back (`TraceWriter.buffers`: no fresh memory per chunk) and their rows go to
disk by direct I/O where offsets and lengths allow (`_write_piece`: no copy into the page cache; the time this saves is in
bench/results/stream.md). Smaller records (last-token rows, decode
steps) are gathered into shards of about `SHARD_BYTES`. So memory holds a few row chunks plus at most one gathered
shard, whatever the number of layers, steps and runs. Finished shards are flushed to disk and dropped from the page
cache once `WRITEBACK_BYTES` more were written (`_write_through`), all of them before the metadata. The directory:

    trace_dir/
      INCOMPLETE                 present from the start until the metadata is written; says why if the block raised
      shard-00000.safetensors    plain safetensors files (readable by `safetensors.safe_open`), one or more records each
      ...
      trace.json                 written last (atomically): format, provenance, token maps, one entry per record with
                                 its shard and checksum (algorithm, digest, row order), as in a single-file trace's
                                 metadata; traces written before the algorithm was named carry "blake2b" and still load
      trace.partial.json         instead of trace.json when the block raised: the records written before it

Both metadata files carry the checksum of their own content in the field "metadata_checksum" (XXH3-128 of the
canonical JSON of every other field, `checksums.sealed`), checked when the directory is opened: a record's heads,
queries, step or part, a token's role or the provenance edited in trace.json is refused like an edited shard.

`Trace.load(dir)` reads `trace.json` only; each record's tensor is memory-mapped from its shard on first access and
checked against its checksum then (`ShardTensor.read`), so opening a 10 GB trace costs its metadata and reading one
layer reads one layer. A directory without `trace.json`, or still marked INCOMPLETE, is refused
(`Trace.load(dir, partial=True)` opens the partial metadata). An existing non-empty directory is refused unless
`overwrite=True`, and even then only a directory holding nothing but an earlier trace's files (its metadata or
marker among them; another tool's trace.json is not ours) is cleared. A missing shard, a record without a checksum
or with one this version cannot check, or whose run/stream/layer/index disagree with its tensor's name (a relabelled or
duplicated entry: a checksum covers the tensor, not its labels) is refused when the directory is opened, as is a tensor in
a shard that trace.json does not list (records taken out of the metadata; found from the shards' safetensors
headers, `check_shards_listed`, no tensor bytes read); a shard replaced after it was verified is verified again
when next read."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
from collections import deque
import json
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .checksums import TensorDigest, entry_checksum, sealed, tensor_checksum
from .trace import (FORMAT, Record, TraceFileError, check_axes, check_format, check_label, check_metadata, record_key,
                    run_from_meta)

META, PARTIAL, MARK = "trace.json", "trace.partial.json", "INCOMPLETE"
SHARD_BYTES = 16 * 1024 * 1024  # records smaller than this are gathered into shards of about this size
WRITEBACK_BYTES = 64 * 1024 * 1024  # finished shards left in the page cache before the oldest is flushed (`_write_through`)
ALIGN = 4096  # row-chunk buffers, a chunked shard's data and each direct write start (and end) at multiples of this
SPARE_BUFFERS = 4  # row-chunk buffers in flight and kept for reuse: one being computed, two queued, one being written
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH = {v: k for k, v in _DTYPES.items()}
STREAMED_DTYPES = tuple(_DTYPES)


def _is_ours(name: str) -> bool:
    return name in (META, PARTIAL, MARK, META + ".tmp") or (name.startswith("shard-") and name.endswith(".safetensors"))


def _is_trace_metadata(path: Path) -> bool:
    """`path` holds an attnscope trace's metadata (another tool's trace.json is the user's, never replaced)."""
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class TraceWriter:
    """Writes the records of one capture into `directory` as they come (see the module docstring)."""

    def __init__(self, directory, overwrite: bool = False, shard_bytes: int | None = None):
        self.path = Path(directory)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a directory; give a directory for out=")
        if self.path.is_dir() and any(self.path.iterdir()):
            names = sorted(p.name for p in self.path.iterdir())
            if not overwrite:
                raise FileExistsError(f"{self.path} is not empty ({len(names)} entries); pass overwrite=True (--overwrite) to replace "
                                      "the trace in it, or give a new directory")
            foreign = [n for n in names if not _is_ours(n)]
            foreign += [n for n in (META, PARTIAL) if n in names and not _is_trace_metadata(self.path / n)]
            if not foreign and not any(n in names for n in (META, PARTIAL, MARK)):
                foreign = names  # shard-named files without any trace metadata: not known to be a trace's
            if foreign:
                raise FileExistsError(f"{self.path} holds files that are not part of an attnscope trace ({foreign[:3]}); "
                                      "overwrite=True only replaces a trace directory: give a new directory")
            for n in names:
                (self.path / n).unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARK).write_text("capture in progress\n")
        self.shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
        self.entries: dict[str, dict] = {}  # record key -> {"shard", "checksum"}
        self._names = itertools.count()  # shard numbers, drawn from both threads
        self._pending: list[tuple[str, Record, torch.Tensor]] = []
        self._pending_bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="attnscope-trace-writer")
        self._unsynced: deque[tuple[Path, int]] = deque()  # finished shards still in the page cache, oldest first
        self._unsynced_bytes = 0
        self._idle = threading.Semaphore(1)  # one record in the writer at a time: bounds what is held in memory
        self._spare: list[torch.Tensor] = []  # row-chunk buffers written and free again (`buffers`)
        self._lent: dict[int, torch.Tensor] = {}  # address of a chunk handed out -> the buffer it lies in
        self._error: BaseException | None = None

    # --- records -------------------------------------------------------------------------------------------------
    def add(self, run: int, stream: str, layer: int, index: int, record: Record) -> None:
        """Hand over a just-computed record; it is written in the background and then drops its tensor."""
        self._raise()
        tensor = record.probs.detach().cpu().contiguous()
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"a streamed trace stores {sorted(str(d) for d in _DTYPES)}, not {tensor.dtype}")
        self._idle.acquire()
        self._raise(release=True)
        self._pool.submit(self._take, record_key(run, stream, layer, index), record, tensor)

    def _take(self, key: str, record: Record, tensor: torch.Tensor) -> None:
        try:
            self._pending.append((key, record, tensor))
            self._pending_bytes += tensor.numel() * tensor.element_size()
            if self._pending_bytes >= self.shard_bytes:
                self._flush()
        except BaseException as err:  # re-raised in the capturing thread at the next record or at the end
            self._error = err
        finally:
            self._idle.release()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{next(self._names):05d}.safetensors"
        items = sorted(self._pending, key=lambda it: -it[2].element_size())  # keeps every tensor aligned
        sums = write_shard(self.path / name, [(key, tensor) for key, _, tensor in items])
        for (key, record, tensor), entry in zip(items, sums):
            self.entries[key] = {"shard": name, "checksum": entry}
            record.source = ShardTensor(self.path / name, key, list(tensor.shape), tensor.dtype, entry)
            record.probs = None  # the record now reads from the shard
        self._pending, self._pending_bytes = [], 0
        self._written(self.path / name, (self.path / name).stat().st_size)

    def buffers(self, shape: list[int], dtype: torch.dtype):
        """For a record of `shape` [B, H, rows, K]: a function n -> an empty [B, H, n, K] tensor of `dtype` to compute
        a chunk of n rows in, ALIGN-aligned (so its rows go to disk by direct I/O, `_write_rows`) and taken from the
        chunks already written (their pages stay mapped: no fresh memory to fault in for every chunk)."""
        batch, heads, _, width = shape
        itemsize = torch.empty((), dtype=dtype).element_size()

        def take(n: int) -> torch.Tensor:
            size = batch * heads * n * width * itemsize
            buf = self._spare.pop() if self._spare else None  # only this (the capturing) thread pops
            if buf is None or buf.numel() < size + ALIGN:
                buf = torch.empty(size + ALIGN, dtype=torch.uint8)
            start = -buf.data_ptr() % ALIGN
            chunk = buf[start: start + size].view(dtype).view(batch, heads, n, width)
            self._lent[chunk.data_ptr()] = buf
            return chunk

        return take

    def add_rows(self, run: int, stream: str, layer: int, index: int, record: Record, shape: list[int],
                 dtype: torch.dtype, chunks) -> None:
        """Write a large record chunk by chunk: `chunks` yields (first row, probs [B, H, rows, K]) in `dtype`,
        computed in `buffers(shape, dtype)`'s tensors or not; the record (created without a tensor) reads from its own
        shard once the writer has finished it."""
        key = record_key(run, stream, layer, index)
        name = f"shard-{next(self._names):05d}.safetensors"
        # set before anything can raise: the record is already listed in the trace, and a record refused here is
        # left out of trace.partial.json by its missing entry (without a source its metadata could not be written)
        record.source = ShardTensor(self.path / name, key, shape, dtype, None)
        record.source.verified = False  # unreadable until its rows are written and summed
        self._raise()
        self._idle.acquire()
        self._raise(release=True)
        self._lent.clear()  # the previous record is written: a buffer still listed was not used for its chunk
        pieces: queue.Queue = queue.Queue(maxsize=SPARE_BUFFERS - 2)  # chunks in flight between the two threads
        record.source.pending = self._pool.submit(self._write_rows, name, key, record, shape, dtype, pieces)
        ok = False
        try:
            for start, block in chunks:
                pieces.put((start, block.detach().cpu().contiguous()))
            ok = True
        finally:
            pieces.put(None if ok else _ABORT)

    def _write_rows(self, name: str, key: str, record: Record, shape: list[int], dtype: torch.dtype, pieces) -> None:
        path, item = self.path / name, None
        batch, heads, rows, width = shape
        row_bytes = width * torch.empty((), dtype=dtype).element_size()
        direct = None
        try:
            raw = _header([(key, dtype, shape, batch * heads * rows * row_bytes)], align=ALIGN)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            direct = _open_direct(path)
        except BaseException as err:
            self._error, fd = err, None
        filled, digest = 0, None
        try:
            while (item := pieces.get()) is not None and item is not _ABORT:  # always drained, even after an error
                start, block = item
                if fd is None or self._error is not None:
                    self._give_back(block)
                    continue
                try:
                    n = block.shape[2]
                    if digest is None:  # hashed a chunk at a time, in the order the chunks come (checksums.py)
                        digest = TensorDigest(dtype, shape, rows=n if n < rows else None)
                    if start != filled or digest.rows is not None and (n > digest.rows or n < digest.rows and start + n != rows):
                        raise RuntimeError(f"record {key}: rows {start}..{start + n} came out of order")
                    for b in range(batch):
                        for h in range(heads):
                            piece = block[b, h]
                            still = _write_piece(fd, direct, piece, len(raw) + ((b * heads + h) * rows + start) * row_bytes)
                            if still is None and direct is not None:  # refused: closed here, once (the finally
                                os.close(direct)                      # below closes it if the write raised)
                            direct = still
                            digest.update(piece)
                    filled += n
                    self._give_back(block)
                except BaseException as err:
                    self._error = err
            if fd is not None and item is None and self._error is None:
                _pwrite_all(fd, raw, 0)
                if filled != rows:
                    raise RuntimeError(f"record {key}: {filled} of {rows} query rows were written")
                os.close(fd)
                fd = None
                entry = (digest or TensorDigest(dtype, shape)).entry()
                self.entries[key] = {"shard": name, "checksum": entry}
                record.source.checksum = entry
                self._written(path, len(raw) + filled * batch * heads * row_bytes)
        except BaseException as err:
            self._error = err
        finally:
            for f in (fd, direct):
                if f is not None:
                    os.close(f)
            _trim_heap()
            self._idle.release()

    def _give_back(self, block: torch.Tensor) -> None:
        """A chunk is written: the buffer it was computed in (if `buffers` lent it) is free for the next chunk."""
        buf = self._lent.pop(block.data_ptr(), None)
        if buf is not None and len(self._spare) < SPARE_BUFFERS:
            self._spare.append(buf)

    def _written(self, path: Path, size: int) -> None:
        """A shard is complete: once more than WRITEBACK_BYTES were written after it, it is flushed to disk and its
        pages dropped from the page cache (`_write_through`)."""
        self._unsynced.append((path, size))
        self._unsynced_bytes += size
        while self._unsynced and self._unsynced_bytes - self._unsynced[0][1] >= WRITEBACK_BYTES:
            self._sync_oldest()

    def _sync_oldest(self) -> None:
        path, size = self._unsynced.popleft()
        self._unsynced_bytes -= size
        _write_through(path)

    def _raise(self, release: bool = False) -> None:
        if self._error is not None:
            if release:
                self._idle.release()
            raise TraceFileError(f"writing the trace to {self.path} failed: {self._error}") from self._error

    # --- end -----------------------------------------------------------------------------------------------------
    def finish(self, trace, error: BaseException | None = None) -> None:
        """Write the last shard and the metadata. With `error` (the block raised), the metadata of what was written
        goes to trace.partial.json and the directory stays marked INCOMPLETE."""
        self._pool.submit(self._flush).result()
        self._pool.shutdown()
        self._spare.clear()
        self._lent.clear()
        try:  # every shard on disk before the metadata says the trace is complete
            while self._unsynced:
                self._sync_oldest()
        except OSError as err:
            self._error = self._error or err
        if self._error is not None and error is None:
            self._mark(f"writing failed: {self._error!r}")
            self._raise()
        meta = trace.metadata(lambda key, rec: self.entries.get(key, {"missing": True}))
        for run_meta in meta["runs"]:  # records never written (the writer failed) are left out
            run_meta["records"] = [r for r in run_meta["records"] if not r.get("missing")]
        if error is not None or self._error is not None:
            meta["incomplete"] = repr(error or self._error)
            _write_json(self.path / PARTIAL, meta)
            self._mark(f"the capture block raised {error!r}; trace.partial.json holds the records written before it\n")
            return
        _write_json(self.path / META, meta)
        (self.path / MARK).unlink()

    def _mark(self, why: str) -> None:
        (self.path / MARK).write_text(why)


def _write_json(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sealed(meta)))
    os.replace(tmp, path)


_ABORT = object()  # ends a chunked record whose rows could not all be computed


def _pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte is written: one call may write fewer than asked (a full disk, a signal, a
    file-size limit) and says so only in what it returns; a call that writes nothing raises."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} of {len(view)} bytes at offset {offset}")
        view, offset = view[n:], offset + n


def _open_direct(path: Path) -> int | None:
    """A second descriptor of `path` for direct I/O (O_DIRECT: the bytes go from the process's memory to the disk,
    not copied into the page cache first); None where the system or file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def _write_piece(fd: int, direct: int | None, piece: torch.Tensor, offset: int) -> int | None:
    """Write a contiguous tensor's bytes at `offset`: by direct I/O when its address, offset and length are
    multiples of ALIGN (what O_DIRECT asks), else through the page cache. Returns the direct descriptor, or None
    once the file system refused a direct write (the rest go through the page cache); the caller closes it then (and
    only the caller: if the page-cache write raises, the caller still holds the descriptor and closes it once)."""
    data = piece.reshape(-1).view(torch.uint8).numpy()
    if direct is not None and not (piece.data_ptr() | offset | data.nbytes) % ALIGN:
        try:
            _pwrite_all(direct, data, offset)
            return direct
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            direct = None
    _pwrite_all(fd, data, offset)
    return direct


def _header(items: list[tuple[str, torch.dtype, list[int], int]], align: int = 8) -> bytes:
    """The safetensors header (length prefix included) for (key, dtype, shape, bytes) laid end to end, padded with
    spaces so that the data starts at a multiple of `align` (8, as safetensors writes it, or ALIGN)."""
    header, offset = {}, 0
    for key, dtype, shape, size in items:
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % align)
    return struct.pack("<Q", len(raw)) + raw


def _load_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_trim()


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim) once a full-matrix record is written:
    with glibc's default malloc, the row chunks and score blocks freed while a layer streams otherwise stay in the
    heap and add up (bench/results/stream.md: 0.21-0.23x of eager + output_attentions at 1k tokens with it; the
    same bench before this trim, with blake2b checksums, gave 0.30-0.33x); ~2 ms a record, on the writer thread."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _write_through(path: Path) -> None:
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
    raw = _header([(key, t.dtype, list(t.shape), t.numel() * t.element_size()) for key, t in items])
    sums = []
    with open(path, "wb") as f:
        f.write(raw)
        for _, t in items:
            sums.append(tensor_checksum(t))
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    return sums


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
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header length out of range")
                entry = json.loads(f.read(n))[self.key]
            start, end = entry["data_offsets"]
            size = end - start
            expected = int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()
            if entry["shape"] != self.shape or _TORCH.get(entry["dtype"]) != self.dtype or size != expected:
                raise TraceFileError(f"{self.shard}: tensor {self.key} is {entry['shape']} {entry['dtype']} in the shard, "
                                     f"the metadata says {self.shape} {self.dtype}")
            if 8 + n + end > self.shard.stat().st_size:
                raise TraceFileError(f"{self.shard} is shorter than its header says (cut while written or after)")
            raw = np.memmap(self.shard, dtype=np.uint8, mode="c", offset=8 + n + start, shape=(size,)) if size else np.zeros(0, np.uint8)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            if isinstance(err, TraceFileError):
                raise
            if isinstance(err, FileNotFoundError):
                raise TraceFileError(f"{self.shard} is missing: the trace directory lost a shard after it was "
                                     "written") from err
            raise TraceFileError(f"{self.shard}: cannot read tensor {self.key}: {err}") from err
        return torch.from_numpy(raw).view(self.dtype).reshape(self.shape), stamp


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
                if Path(rm["shard"]).name != rm["shard"] or not _is_ours(rm["shard"]):
                    raise TraceFileError(f"{meta_path}: record {rm['key']} names shard {rm['shard']!r}, outside the trace")
                if not shard.is_file():
                    raise TraceFileError(f"{meta_path}: record {rm['key']} lies in {rm['shard']}, which is missing from "
                                         f"{path} (a shard was deleted or not copied)")
                try:
                    summed = entry_checksum(rm)
                except ValueError as err:
                    raise TraceFileError(f"{meta_path}: record {rm['key']}: {err}") from err
                if summed is None:
                    raise TraceFileError(f"{meta_path}: record {rm['key']} has no checksum (the metadata was edited)")
                dtype = getattr(torch, rm["dtype"], None)
                if dtype not in _DTYPES:
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
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return set(header) - {"__metadata__"}


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
