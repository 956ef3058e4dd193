"""Checksums of streamed traces: XXH3-128 taken from memory in the order the chunks are written (checked here
against a digest computed by hand from the shard's bytes), blake2b traces written before still load and verify,
edited checksum fields are refused, and every shard is on disk before the metadata."""
import hashlib
import os
import json

import pytest
import torch
import xxhash
from safetensors import safe_open

import attnscope
from attnscope.capture.checksums import sealed
from attnscope.capture import shard_io, stream
from attnscope.capture.trace import Trace, TraceFileError


def _capture(model, out, text="The capital of France is", **kw):
    with torch.no_grad(), attnscope.capture(model, out=out, overwrite=True, **kw) as trace:
        model(**model.encode(text))
    return trace


def _entries(out):
    meta = json.loads((out / stream.META).read_text())
    return meta, meta["runs"][0]["records"]


def _tensor(out, rm):
    with safe_open(str(out / rm["shard"]), framework="pt") as f:
        return f.get_tensor(rm["key"])


def _by_hand(t, new, rows=None):
    """The digest as checksums.py defines it, from the tensor's bytes sliced here with numpy."""
    h = new()
    h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    a = t.numpy()
    if rows is None:
        h.update(a.tobytes())
    else:
        for start in range(0, a.shape[2], rows):
            for b in range(a.shape[0]):
                for head in range(a.shape[1]):
                    h.update(a[b, head, start: start + rows].tobytes())
    return h.hexdigest()


def test_chunked_and_gathered_records_are_summed_as_defined(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)  # every record streamed a chunk of rows at a time
    out = tmp_path / "c"
    _capture(smollm, out, layers=[0, 5], queries=None, chunk=2)
    _, records = _entries(out)
    for rm in records:
        t = _tensor(out, rm)
        assert t.shape[2] > 2 and rm["checksum"]["algorithm"] == "xxh3_128" and rm["checksum"]["rows"] == 2
        assert rm["checksum"]["digest"] == _by_hand(t, xxhash.xxh3_128, rows=2)
        assert rm["checksum"]["digest"] != _by_hand(t, xxhash.xxh3_128)  # the order is part of the definition
    monkeypatch.setattr(stream, "SHARD_BYTES", 1 << 30)  # small records gathered, summed whole
    _capture(smollm, out, layers=[0, 5], queries="last")
    for rm in _entries(out)[1]:
        assert "rows" not in rm["checksum"]
        assert rm["checksum"]["digest"] == _by_hand(_tensor(out, rm), xxhash.xxh3_128)


@pytest.fixture()
def legacy(minilm, tmp_path, monkeypatch):
    """A trace as versions before the algorithm was named wrote it: a bare blake2b of each tensor in memory order."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    out = tmp_path / "old"
    memory = _capture(minilm, out, chunk=3)
    meta, records = _entries(out)
    for rm in records:
        del rm["checksum"]
        rm["blake2b"] = _by_hand(_tensor(out, rm), lambda: hashlib.blake2b(digest_size=16))
    (out / stream.META).write_text(json.dumps(sealed(meta)))
    return out, records, memory


def test_blake2b_traces_written_before_still_load_and_verify(legacy):
    out, records, memory = legacy
    loaded = Trace.load(out)
    for layer in loaded.layers("text"):
        assert torch.equal(loaded.attention("text", layer), memory.attention("text", layer))
    rm = records[2]
    raw = bytearray((out / rm["shard"]).read_bytes())
    raw[-3] ^= 0x01  # one low bit of the last value
    (out / rm["shard"]).write_bytes(bytes(raw))
    with pytest.raises(TraceFileError, match="checksum"):
        Trace.load(out).attention("text", rm["layer"])


def test_blake2b_named_in_the_checksum_field_verifies_too(legacy):
    out, records, memory = legacy
    meta, records = _entries(out)
    for rm in records:
        rm["checksum"] = {"algorithm": "blake2b", "digest": rm.pop("blake2b")}
    (out / stream.META).write_text(json.dumps(sealed(meta)))
    assert torch.equal(Trace.load(out).attention("text", 1), memory.attention("text", 1))


@pytest.mark.parametrize("edit, when", [
    (lambda c: c.update(algorithm="sha3_999"), "load"),
    (lambda c: c.update(rows="all"), "load"),
    (lambda c: c.pop("digest"), "load"),
    (lambda c: c.update(rows=c["rows"] + 1), "read"),
    (lambda c: c.pop("rows"), "read"),
    (lambda c: c.update(algorithm="blake2b"), "read"),
    (lambda c: c.update(digest="0" * 32), "read"),
])
def test_edited_checksum_fields_are_refused(minilm, tmp_path, monkeypatch, edit, when):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    out = tmp_path / "t"
    _capture(minilm, out, chunk=3)
    meta, records = _entries(out)
    edit(records[0]["checksum"])
    (out / stream.META).write_text(json.dumps(sealed(meta)))
    if when == "load":
        with pytest.raises(TraceFileError, match=records[0]["key"]):
            Trace.load(out)
    else:
        trace = Trace.load(out)
        with pytest.raises(TraceFileError, match="checksum"):
            trace.attention("text", records[0]["layer"])


def test_chunks_out_of_order_are_refused(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    cap = attnscope.capture(smollm, layers=[0], queries=None, chunk=2, out=tmp_path / "o")
    original = type(cap)._row_chunks

    def swapped(self, *a):
        chunks = list(original(self, *a))
        return iter([chunks[1], chunks[0], *chunks[2:]])

    monkeypatch.setattr(type(cap), "_row_chunks", swapped)
    with pytest.raises(TraceFileError, match="out of order"):
        with torch.no_grad(), cap:
            smollm(**smollm.encode("The capital of France is"))
    with pytest.raises(TraceFileError, match="not a complete"):
        Trace.load(tmp_path / "o")


def test_every_shard_is_on_disk_before_the_metadata(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    monkeypatch.setattr(stream, "WRITEBACK_BYTES", 0)  # each shard flushed once the next one is finished
    out = tmp_path / "d"
    flushed = []
    original = shard_io.write_through
    monkeypatch.setattr(shard_io, "write_through", lambda p: flushed.append((p.name, (out / stream.META).exists()))
                        or original(p))
    _capture(minilm, out)
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert sorted(name for name, _ in flushed) == shards and len(shards) > 1
    assert not any(meta_written for _, meta_written in flushed)
    assert Trace.load(out).attention("text", 0).shape[-1] > 0


def _swap_layers(records):
    records[0]["layer"], records[1]["layer"] = records[1]["layer"], records[0]["layer"]


def _duplicate(records):
    records.append(dict(records[0]))


def _duplicate_as_next_step(records):
    records.append(dict(records[0], step=1))


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("edit", [_swap_layers, _duplicate, _duplicate_as_next_step])
def test_records_whose_labels_disagree_with_their_keys_are_refused(minilm, tmp_path, monkeypatch, edit, partial):
    """The checksum covers a tensor, not its labels: a trace.json whose records were relabelled (two records' layers
    swapped) or duplicated loaded with every checksum passing and the wrong layer's matrix under a label. Each
    record's tensor name says which run, stream, layer and index it is; an entry that disagrees is refused."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    out = tmp_path / "t"
    _capture(minilm, out, layers=[0, 1], chunk=3)
    meta, records = _entries(out)
    edit(records)
    if partial:
        (out / stream.META).unlink()
        (out / stream.MARK).write_text("the capture block raised\n")
    (out / (stream.PARTIAL if partial else stream.META)).write_text(json.dumps(sealed(meta)))
    with pytest.raises(TraceFileError, match="r0/text/"):
        Trace.load(out, partial=partial)


def test_unedited_partial_trace_still_loads(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    out = tmp_path / "t"
    memory = _capture(minilm, out, layers=[0, 1], chunk=3)
    (out / stream.META).rename(out / stream.PARTIAL)
    (out / stream.MARK).write_text("the capture block raised\n")
    loaded = Trace.load(out, partial=True)
    for layer in (0, 1):
        assert torch.equal(loaded.attention("text", layer), memory.attention("text", layer))


def test_short_positional_writes_are_continued(minilm, tmp_path, monkeypatch):
    """os.pwrite may write fewer bytes than asked (a full disk, a signal, a file-size limit) and says so only in its
    return value: the writer ignored it, so the capture reported success over a shard with a hole in it and the
    trace failed its checksum when read. Every chunk is now written to its last byte."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    real = os.pwrite
    short = []

    def pwrite(fd, data, offset):
        data = memoryview(data).cast("B")
        if len(data) > 1 and len(short) < 5:  # the first few calls write only half their bytes
            short.append(offset)
            return real(fd, data[: len(data) // 2], offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with torch.no_grad(), attnscope.capture(minilm, chunk=3) as memory:
        minilm(**minilm.encode("The capital of France is"))
    streamed = _capture(minilm, tmp_path / "s", chunk=3)
    assert len(short) == 5
    loaded = Trace.load(tmp_path / "s")
    for trace in (streamed, loaded):
        for layer in trace.layers("text"):
            assert torch.equal(trace.attention("text", layer), memory.attention("text", layer))
