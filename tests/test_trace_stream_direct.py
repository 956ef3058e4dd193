"""Streamed full matrices computed in the writer's buffers and written by direct I/O: the same bits as the in-memory
capture, the same result when the file system refuses direct writes, and the buffers reused from chunk to chunk."""
import errno
import os

import pytest
import torch
from safetensors import safe_open

import attnscope
from attnscope.capture import shard_io, stream
from attnscope.capture.trace import Trace
from attnscope.core.probs import attention_probs


class _Attn(torch.nn.Module):
    is_causal = True


def _case(heads=6, kv_heads=2, q_len=40, kv_len=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, q_len, dim, generator=g), torch.randn(2, kv_heads, kv_len, dim, generator=g)


@pytest.mark.parametrize("kv_heads", [2, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("term", ["causal", "mask", "keys", "sinks", "softcap"])
def test_probs_computed_in_a_given_tensor_are_the_same_bits(kv_heads, dtype, term):
    q, k = _case(kv_heads=kv_heads)
    mask, kw, keys = None, {}, None
    if term == "mask":
        mask = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    if term == "sinks":
        kw = {"sinks": torch.linspace(-1, 1, 6)}
    if term == "softcap":
        kw = {"softcap": 5.0}
    if term == "keys":
        keys = torch.tensor([0, 3, 7, 39])
    rows = torch.arange(8, 24)
    plain = attention_probs(_Attn(), q, k, mask, kw, rows=rows, keys=keys, chunk=16, dtype=dtype)
    given = torch.full_like(plain, float("nan"))
    got = attention_probs(_Attn(), q, k, mask, kw, rows=rows, keys=keys, chunk=16, dtype=dtype, out=given)
    assert got.data_ptr() == given.data_ptr()
    assert torch.equal(given, plain)
    whole = attention_probs(_Attn(), q, k, mask, kw, keys=keys, chunk=16, dtype=dtype)  # in-memory chunking
    assert torch.equal(given, whole[:, :, 8:24])
    if term == "causal":
        assert torch.allclose(given.float().sum(-1), torch.ones(2, 6, 16), atol=1e-3)


def test_a_given_tensor_of_the_wrong_shape_or_rows_beyond_a_chunk_is_refused():
    q, k = _case()
    with pytest.raises(ValueError, match="out="):
        attention_probs(_Attn(), q, k, None, {}, rows=torch.arange(4), out=torch.empty(2, 6, 5, 40))
    with pytest.raises(ValueError, match="out="):
        attention_probs(_Attn(), q, k, None, {}, chunk=16, out=torch.empty(2, 6, 40, 40))


def _direct_io_works(path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


def _capture(model, x, out=None, **kw):
    with torch.no_grad(), attnscope.capture(model, layers=[0, 1, 29], queries=None, chunk=64, out=out, **kw) as trace:
        model(**x)
    return trace


def _same(memory, streamed):
    for key, records in memory.runs[0].records.items():
        for a, b in zip(records, streamed.runs[0].records[key]):
            assert torch.equal(a.probs, b.source.read())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_matrices_written_by_direct_io_are_the_in_memory_bits(smollm, tmp_path, monkeypatch, dtype):
    """256 tokens: rows of 1 (float32) or 0.5 KiB, chunks of 64 rows, so every piece is ALIGN-aligned."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    x = {k: v[:, :256] for k, v in smollm.encode("The capital of France is Paris. " * 40).items()}
    assert x["input_ids"].shape[1] == 256
    direct, writes = set(), []
    open_direct, pwrite_all = shard_io.open_direct, shard_io.pwrite_all
    monkeypatch.setattr(shard_io, "open_direct", lambda p: direct.add(fd := open_direct(p)) or fd)
    monkeypatch.setattr(shard_io, "pwrite_all", lambda fd, data, at: writes.append((fd, at)) or pwrite_all(fd, data, at))
    memory = _capture(smollm, x, dtype=dtype)
    _capture(smollm, x, tmp_path / "d", dtype=dtype)
    _same(memory, Trace.load(tmp_path / "d"))
    if _direct_io_works(tmp_path / "probe"):
        through = [at for fd, at in writes if fd in direct]
        assert len(through) == 3 * 9 * 4  # every (head, chunk) piece of the three layers, none through the cache
        assert all(at % shard_io.ALIGN == 0 for at in through)
    for shard in (tmp_path / "d").glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:  # a plain safetensors file, its data page-aligned
            (key,) = f.keys()
            assert f.get_tensor(key).dtype == dtype
        assert (int.from_bytes(shard.read_bytes()[:8], "little") + 8) % shard_io.ALIGN == 0


def test_refused_direct_writes_go_through_the_page_cache(smollm, tmp_path, monkeypatch):
    """A file system that refuses a direct write (EINVAL) gets the rest through the page cache: the same bits."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    refused = []

    def refusing(fd, data, at):
        if fd in opened:
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite_all(fd, data, at)

    opened, pwrite_all, open_direct = set(), shard_io.pwrite_all, shard_io.open_direct
    monkeypatch.setattr(shard_io, "open_direct", lambda p: opened.add(fd := open_direct(p) or os.open(p, os.O_WRONLY)) or fd)
    monkeypatch.setattr(shard_io, "pwrite_all", refusing)
    monkeypatch.setattr(shard_io, "ALIGN", 4)  # every piece qualifies for a direct write
    x = smollm.encode("The capital of France is")
    memory = _capture(smollm, x)
    _capture(smollm, x, tmp_path / "r")
    _same(memory, Trace.load(tmp_path / "r"))
    assert len(refused) == 3  # one refusal per record, then the page cache for its other pieces


def test_chunk_buffers_are_reused_and_released(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    x = smollm.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    memory = {}
    buffers = stream.TraceWriter.buffers

    def spying(self, shape, dtype):
        take = buffers(self, shape, dtype)
        memory.setdefault("writer", self)

        def counted(n):
            chunk = take(n)
            memory.setdefault("bases", set()).add(id(self._lent[chunk.data_ptr()]))
            memory["chunks"] = memory.get("chunks", 0) + 1
            return chunk
        return counted

    monkeypatch.setattr(stream.TraceWriter, "buffers", spying)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 1, 2, 3, 4, 5], queries=None, chunk=2,
                                            out=tmp_path / "b"):
        smollm(**x)
    assert memory["chunks"] >= 6 * 7
    assert len(memory["bases"]) <= stream.SPARE_BUFFERS + 1
    assert memory["writer"]._spare == [] and memory["writer"]._lent == {}  # nothing held after the block


def test_a_failed_write_leaves_a_partial_trace_that_says_why(smollm, tmp_path, monkeypatch):
    """A write that fails (a full disk) while the next full-matrix record is handed over: the capture raises the write
    error itself, the directory keeps the records written before it in trace.partial.json and INCOMPLETE says why (a
    record refused before its source was set made the metadata raise AttributeError instead)."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    pwrite_all, calls = shard_io.pwrite_all, []

    def full(fd, data, at):
        calls.append(at)
        if len(calls) == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite_all(fd, data, at)

    monkeypatch.setattr(shard_io, "pwrite_all", full)
    x = smollm.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    memory = _capture(smollm, x)
    with pytest.raises(stream.TraceFileError, match="No space left"):
        with torch.no_grad(), attnscope.capture(smollm, queries=None, chunk=4, out=tmp_path / "f"):
            smollm(**x)
    assert "No space left" in (tmp_path / "f" / stream.MARK).read_text()
    partial = Trace.load(tmp_path / "f", partial=True)
    kept = [(key, rec) for key, recs in partial.runs[0].records.items() for rec in recs]
    assert 0 < len(kept) < 30
    for key, rec in kept:
        if key[1] in (0, 1, 29):
            assert torch.equal(rec.probs, memory.runs[0].records[key][0].probs)


def test_a_refused_direct_write_then_a_failed_write_closes_each_descriptor_once(tmp_path, monkeypatch):
    """EINVAL from a direct write gives up the direct descriptor; if the page-cache write of the same piece then
    fails, the descriptor was closed a second time at the end of the record (EBADF raised from the writer's cleanup,
    which then never released its slot: the next record waited forever, or another file's descriptor was closed)."""
    closed, real_close, real_open_direct = [], os.close, shard_io.open_direct
    opened = set()
    monkeypatch.setattr(stream.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    monkeypatch.setattr(shard_io, "open_direct",
                        lambda p: opened.add(fd := real_open_direct(p) or os.open(p, os.O_WRONLY)) or fd)

    def pwrite_all(fd, data, at):
        raise OSError(errno.EINVAL if fd in opened else errno.ENOSPC, "refused")

    monkeypatch.setattr(shard_io, "pwrite_all", pwrite_all)
    monkeypatch.setattr(shard_io, "ALIGN", 4)  # every piece qualifies for a direct write
    writer = stream.TraceWriter(tmp_path / "w")
    rec = stream.Record(None, [0], list(range(4)), None)
    writer.add_rows(0, "text", 0, 0, rec, [1, 1, 4, 4], torch.float32, iter([(0, torch.ones(1, 1, 4, 4))]))
    writer._pool.submit(lambda: None).result()  # the record's writer job has ended
    assert writer._idle.acquire(timeout=5)  # its slot was released
    (direct,) = opened
    assert closed.count(direct) == 1
    assert isinstance(writer._error, OSError) and writer._error.errno == errno.ENOSPC  # the write's own error


@pytest.mark.parametrize("chunk", [0, -5, 2.5, True])
def test_a_chunk_that_is_not_a_positive_integer_is_refused(smollm, chunk):
    """chunk=-5 computed no chunk at all and returned torch.empty's uninitialised memory as the probabilities."""
    q, k = _case()
    with pytest.raises(ValueError, match="positive integer"):
        attention_probs(_Attn(), q, k, None, {}, chunk=chunk)
    with pytest.raises(ValueError, match="positive integer"):
        attnscope.capture(smollm, queries=None, chunk=chunk)


def test_a_misused_out_is_refused_with_what_is_wrong_and_gradients_still_flow():
    q, k = _case()
    cases = [(torch.empty(2, 6, 40, 40).transpose(-1, -2), "not contiguous"),
             (torch.empty(2, 6, 40, 40, dtype=torch.float16), "torch.float16"),
             (torch.empty(2 * 6 * 40 * 40), "shape"),
             ([0.0], "a list, not a tensor")]
    for out, why in cases:
        with pytest.raises(ValueError, match=f"out=.*got {why}"):
            attention_probs(_Attn(), q, k, None, {}, out=out)
    with pytest.raises(ValueError, match="0 rows"):
        attention_probs(_Attn(), q, k, None, {}, rows=torch.tensor([], dtype=torch.long), out=torch.empty(2, 6, 0, 40))
    q.requires_grad_()
    given = torch.empty(2, 6, 40, 40)
    got = attention_probs(_Attn(), q, k, None, {}, out=given)
    assert got.data_ptr() == given.data_ptr() and torch.equal(got, attention_probs(_Attn(), q, k, None, {}))
    got.sum().backward()
    assert q.grad is not None
