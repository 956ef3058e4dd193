"""Traces streamed to disk while the model runs, and opened lazily.

`capture(model, ..., out="trace_dir/")` hands every record to a `TraceWriter` as it is computed, and a background
thread writes it into a safetensors shard and checksums it; the record then keeps only where it lies. A record of
at least `SHARD_BYTES` (a full matrix) never exists whole: its query rows are computed a chunk at a time
(`TraceWriter.add_rows`), each chunk written at its place in its own shard while the next is computed, and hashed
from memory as it is written (XXH3-128 in chunk order, `checksums.py`). The chunks are computed in page-aligned
buffers the writer hands out and takes back (`TraceWriter.buffers`: no fresh memory per chunk) and their rows go to
disk by direct I/O where offsets and lengths allow (`shard_io.write_piece`: no copy into the page cache; the time this saves is in
bench/results/stream.md). Smaller records (last-token rows, decode
steps) are gathered into shards of about `SHARD_BYTES`. So memory holds a few row chunks plus at most one gathered
shard, whatever the number of layers, steps and runs. Finished shards are flushed to disk and dropped from the page
cache once `WRITEBACK_BYTES` more were written (`shard_io.write_through`), all of them before the metadata. The directory:

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
checked against its checksum then (`stream_read.ShardTensor.read`), so opening a 10 GB trace costs its metadata and reading one
layer reads one layer. A directory without `trace.json`, or still marked INCOMPLETE, is refused
(`Trace.load(dir, partial=True)` opens the partial metadata). An existing non-empty directory is refused unless
`overwrite=True`, and even then only a directory holding nothing but an earlier trace's files (its metadata or
marker among them; another tool's trace.json is not ours) is cleared. A missing shard, a record without a checksum
or with one this version cannot check, or whose run/stream/layer/index disagree with its tensor's name (a relabelled or
duplicated entry: a checksum covers the tensor, not its labels) is refused when the directory is opened, as is a tensor in
a shard that trace.json does not list (records taken out of the metadata; found from the shards' safetensors
headers, `stream_read.check_shards_listed`, no tensor bytes read); a shard replaced after it was verified is verified again
when next read."""
from __future__ import annotations

import itertools
import json
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import shard_io
from .checksums import TensorDigest, sealed
from .shard_io import DTYPES
from .stream_read import MARK, META, PARTIAL, ShardTensor, is_ours
from .trace import FORMAT, Record, TraceFileError, record_key

SHARD_BYTES = 16 * 1024 * 1024  # records smaller than this are gathered into shards of about this size
WRITEBACK_BYTES = 64 * 1024 * 1024  # finished shards left in the page cache before the oldest is flushed (`shard_io.write_through`)
SPARE_BUFFERS = 4  # row-chunk buffers in flight and kept for reuse: one being computed, two queued, one being written
STREAMED_DTYPES = tuple(DTYPES)


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
            foreign = [n for n in names if not is_ours(n)]
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
        if tensor.dtype not in DTYPES:
            raise TypeError(f"a streamed trace stores {sorted(str(d) for d in DTYPES)}, not {tensor.dtype}")
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
        sums = shard_io.write_shard(self.path / name, [(key, tensor) for key, _, tensor in items])
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
            if buf is None or buf.numel() < size + shard_io.ALIGN:
                buf = torch.empty(size + shard_io.ALIGN, dtype=torch.uint8)
            start = -buf.data_ptr() % shard_io.ALIGN
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
            raw = shard_io.header([(key, dtype, shape, batch * heads * rows * row_bytes)], align=shard_io.ALIGN)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            direct = shard_io.open_direct(path)
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
                            still = shard_io.write_piece(fd, direct, piece, len(raw) + ((b * heads + h) * rows + start) * row_bytes)
                            if still is None and direct is not None:  # refused: closed here, once (the finally
                                os.close(direct)                      # below closes it if the write raised)
                            direct = still
                            digest.update(piece)
                    filled += n
                    self._give_back(block)
                except BaseException as err:
                    self._error = err
            if fd is not None and item is None and self._error is None:
                shard_io.pwrite_all(fd, raw, 0)
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
            shard_io.trim_heap()
            self._idle.release()

    def _give_back(self, block: torch.Tensor) -> None:
        """A chunk is written: the buffer it was computed in (if `buffers` lent it) is free for the next chunk."""
        buf = self._lent.pop(block.data_ptr(), None)
        if buf is not None and len(self._spare) < SPARE_BUFFERS:
            self._spare.append(buf)

    def _written(self, path: Path, size: int) -> None:
        """A shard is complete: once more than WRITEBACK_BYTES were written after it, it is flushed to disk and its
        pages dropped from the page cache (`shard_io.write_through`)."""
        self._unsynced.append((path, size))
        self._unsynced_bytes += size
        while self._unsynced and self._unsynced_bytes - self._unsynced[0][1] >= WRITEBACK_BYTES:
            self._sync_oldest()

    def _sync_oldest(self) -> None:
        path, size = self._unsynced.popleft()
        self._unsynced_bytes -= size
        shard_io.write_through(path)

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
        try:
            meta = trace.metadata(lambda key, rec: self.entries.get(key, {"missing": True}))
        except ValueError as err:  # provenance a file cannot store as itself (`trace.check_plain`): no metadata
            if error is not None:  # the block's own error goes on (the caller re-raises it), not this one
                self._mark(f"the capture block raised {error!r}; no metadata written: {err}\n")
                return
            self._mark(f"no metadata written: {err}\n")
            raise
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
