"""Traces streamed to disk (`capture(..., out=dir)`): bit-for-bit equal to the in-memory trace, opened lazily,
checksummed, never loadable as complete after a block that raised, and the model restored either way."""
import json

import pytest
import torch
from safetensors import safe_open

import attnscope
from attnscope.capture.checksums import sealed
from attnscope.capture import stream
from attnscope.capture.trace import Trace, TraceFileError
from attnscope.core.dispatch import registered_names


def _state(model):
    hf = model.hf
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())
    return hf.config._attn_implementation, hooks, registered_names()


def _session(model, x, **kw):
    """A forward and a short greedy generate (prefill + decode steps): two runs."""
    with torch.no_grad(), attnscope.capture(model, **kw) as trace:
        model(**x)
        model.hf.generate(**x, max_new_tokens=3, do_sample=False)
    return trace


def _assert_same(a: Trace, b: Trace):
    assert a.provenance == b.provenance
    assert len(a.runs) == len(b.runs)
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.steps, ra.prefix, ra.lengths) == (rb.steps, rb.prefix, rb.lengths)
        assert {s: [t.to_dict() for t in m] for s, m in ra.tokens.items()} == \
               {s: [t.to_dict() for t in m] for s, m in rb.tokens.items()}
        assert list(ra.records) == list(rb.records)
        for key in ra.records:
            assert len(ra.records[key]) == len(rb.records[key])
            for x, y in zip(ra.records[key], rb.records[key]):
                assert (x.heads, x.queries, x.keys, x.step, x.part) == (y.heads, y.queries, y.keys, y.step, y.part)
                assert x.probs.dtype == y.probs.dtype and torch.equal(x.probs, y.probs), key


@pytest.fixture(scope="module")
def smol_pair(smollm, tmp_path_factory):
    x = smollm.encode("The capital of France is")
    memory = _session(smollm, x, queries=None)
    out = tmp_path_factory.mktemp("stream") / "trace"
    streamed = _session(smollm, x, queries=None, out=out)
    return memory, streamed, out, x


def test_streamed_equals_in_memory_bit_for_bit(smol_pair, tmp_path):
    memory, streamed, out, _ = smol_pair
    assert len(memory.runs) == 2 and memory.runs[1].steps == 2  # the generate: prefill + 2 decode forwards
    assert (out / stream.META).exists() and not (out / stream.MARK).exists()
    _assert_same(memory, streamed)  # the trace the block returned, now reading from disk
    loaded = Trace.load(out)
    _assert_same(memory, loaded)
    assert torch.equal(loaded.steps("text", -1, run=1), memory.steps("text", -1, run=1))
    # the single-file format still works, from a streamed trace too
    _assert_same(memory, Trace.load(loaded.save(tmp_path / "one.safetensors")))


def test_records_leave_memory_and_shards_are_plain_safetensors(smol_pair):
    _, streamed, out, _ = smol_pair
    fresh = Trace.load(out)
    recs = [r for run in fresh.runs for entries in run.records.values() for r in entries]
    meta = json.loads((out / stream.META).read_text())
    shard = meta["runs"][0]["records"][0]["shard"]
    with safe_open(str(out / shard), framework="pt") as f:
        key = meta["runs"][0]["records"][0]["key"]
        assert torch.equal(f.get_tensor(key), recs[0].probs)
    written = [r for run in streamed.runs for entries in run.records.values() for r in entries]
    assert all(r.source is not None for r in written)


def test_lazy_load_reads_only_what_is_asked(smol_pair, monkeypatch):
    memory, _, out, _ = smol_pair
    reads = []
    original = stream.ShardTensor.read
    monkeypatch.setattr(stream.ShardTensor, "read", lambda self: reads.append(self.key) or original(self))
    trace = Trace.load(out)
    assert reads == []
    assert trace.layers("text") == list(range(30)) and trace.record("text", 4).shape[1] == 9  # metadata only
    assert reads == []
    got = trace.attention("text", 4, head=2)
    assert reads == ["r1/text/4/0"]
    assert torch.equal(got, memory.attention("text", 4, head=2))
    trace.attention("text", 4)
    assert reads == ["r1/text/4/0"]  # read once, then kept (memory-mapped)


def test_corrupted_shard_raises_on_access(smol_pair, tmp_path):
    _, _, out, _ = smol_pair
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    meta = json.loads((copy / stream.META).read_text())
    rm = meta["runs"][0]["records"][7]
    shard = copy / rm["shard"]
    raw = bytearray(shard.read_bytes())  # flip one bit of one value of record 7
    header_len = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8: 8 + header_len])[rm["key"]]["data_offsets"][0]
    raw[8 + header_len + start + 5] ^= 0x40
    shard.write_bytes(bytes(raw))
    trace = Trace.load(copy)  # lazily: the damage is found on first access
    with pytest.raises(TraceFileError, match="checksum"):
        trace.attention("text", rm["layer"], run=0)
    raw[8 + header_len + start + 5] ^= 0x40  # undo the flip
    shard.write_bytes(bytes(raw[:-64]))  # cut: the records at the end of the shard can no longer be read
    cut = Trace.load(copy)
    with pytest.raises(TraceFileError, match="shorter"):
        for run in cut.runs:
            for entries in run.records.values():
                [r.probs for r in entries]


def test_raising_block_leaves_incomplete_trace_and_model_restored(smollm, tmp_path):
    before = _state(smollm)
    x = smollm.encode("The capital of France is")
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="stop here"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[0, 5], queries=None, out=out) as trace:
            smollm(**x)
            raise RuntimeError("stop here")
    assert _state(smollm) == before
    assert (out / stream.MARK).exists() and not (out / stream.META).exists()
    with pytest.raises(TraceFileError, match="not a complete attnscope trace.*stop here"):
        Trace.load(out)
    partial = Trace.load(out, partial=True)  # what was written before the error, checksummed as usual
    assert torch.equal(partial.attention("text", 5), trace.attention("text", 5))
    (out / stream.PARTIAL).rename(out / stream.META)  # the partial metadata passed off as complete
    (out / stream.MARK).unlink()
    with pytest.raises(TraceFileError, match="did not finish.*stop here"):
        Trace.load(out)


def test_existing_directory_refused_unless_overwrite(smollm, tmp_path):
    x = smollm.encode("Hello there")
    out = tmp_path / "t"
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", out=out):
        smollm(**x)
    before = _state(smollm)  # after a forward: transformers may add its own hooks on the first one
    with pytest.raises(FileExistsError, match="overwrite=True"):
        attnscope.capture(smollm, layers=[0], out=out).__enter__()
    assert _state(smollm) == before
    with torch.no_grad(), attnscope.capture(smollm, layers=[1], queries="last", out=out, overwrite=True):
        smollm(**x)
    assert Trace.load(out).layers("text") == [1]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not part of an attnscope trace"):
        attnscope.capture(smollm, layers=[0], out=out, overwrite=True).__enter__()
    assert (out / "notes.txt").read_text() == "mine" and Trace.load(out).layers("text") == [1]
    with pytest.raises(ValueError, match="grad=True"):
        attnscope.capture(smollm, out=tmp_path / "g", grad=True)


def test_minilm_float16_streamed_equals_in_memory(minilm, tmp_path):
    x = minilm.encode("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad(), attnscope.capture(minilm, dtype=torch.float16) as memory:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, dtype=torch.float16, out=tmp_path / "m") as streamed:
        minilm(**x)
    _assert_same(memory, Trace.load(tmp_path / "m"))
    _assert_same(memory, streamed)
    assert streamed.attention("text", 0).dtype == torch.float16


def test_large_records_each_get_a_shard_small_ones_are_gathered(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)  # every record is "large"
    x = minilm.encode("A short sentence.")
    with torch.no_grad(), attnscope.capture(minilm, out=tmp_path / "a"):
        minilm(**x)
    n_layers = len(Trace.load(tmp_path / "a").layers("text"))
    assert len(list((tmp_path / "a").glob("shard-*.safetensors"))) == n_layers
    monkeypatch.setattr(stream, "SHARD_BYTES", 1 << 30)
    with torch.no_grad(), attnscope.capture(minilm, out=tmp_path / "b"):
        minilm(**x)
    assert len(list((tmp_path / "b").glob("shard-*.safetensors"))) == 1


def test_large_records_stream_row_chunks_bit_for_bit(smollm, tmp_path, monkeypatch):
    """Records at or above SHARD_BYTES are computed and written a chunk of rows at a time (never whole); chunked
    exactly as the in-memory capture chunks them, so equal bit for bit."""
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    x = smollm.encode("The capital of France is")
    memory = _session(smollm, x, layers=[0, 11, 29], queries=None, chunk=2)
    written = []
    original = stream.TraceWriter.add_rows
    monkeypatch.setattr(stream.TraceWriter, "add_rows", lambda self, *a: written.append(a[4]) or original(self, *a))
    streamed = _session(smollm, x, layers=[0, 11, 29], queries=None, chunk=2, out=tmp_path / "c")
    assert len(written) == sum(len(e) for run in memory.runs for e in run.records.values())  # every record chunked
    _assert_same(memory, Trace.load(tmp_path / "c"))
    _assert_same(memory, streamed)
    first = json.loads((tmp_path / "c" / stream.META).read_text())["runs"][0]["records"][0]
    with safe_open(str(tmp_path / "c" / first["shard"]), framework="pt") as f:
        assert torch.equal(f.get_tensor(first["key"]), memory.runs[0].records[("text", 0)][0].probs)


def test_failure_inside_a_chunked_record(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    before = _state(smollm)
    x = smollm.encode("The capital of France is")
    calls = []
    cap = attnscope.capture(smollm, layers=[0, 3], queries=None, chunk=2, out=tmp_path / "f")
    original = type(cap)._probs

    def failing(self, call, rows, keys, **out):
        calls.append(1)
        if len(calls) == 5:  # layer 3's second chunk (layer 0 has 3 chunks of 2 rows)
            raise RuntimeError("chunk failed")
        return original(self, call, rows, keys, **out)

    monkeypatch.setattr(type(cap), "_probs", failing)
    with pytest.raises(RuntimeError, match="chunk failed"):
        with torch.no_grad(), cap:
            smollm(**x)
    assert _state(smollm) == before
    with pytest.raises(TraceFileError, match="not a complete"):
        Trace.load(tmp_path / "f")
    partial = Trace.load(tmp_path / "f", partial=True)
    assert partial.layers("text") == [0]  # the record that failed half-way is not in the metadata
    assert partial.attention("text", 0).shape[-1] == x["input_ids"].shape[1]


def test_cli_capture_to_dir(minilm, tmp_path, capsys):
    from attnscope.cli import main

    out = tmp_path / "cli"
    args = ["capture", "--model", "minilm", "--text", "hello world", "--out", str(out), "--to-dir", "--fp16"]
    assert main(args) == 0
    assert Trace.load(out).attention("text", 0).dtype == torch.float16
    capsys.readouterr()
    assert main(args) == 2  # the directory is not empty
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite" in err[0]
    assert main([*args, "--overwrite"]) == 0


def test_chunked_records_of_a_batch(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1)
    x = dict(minilm.tokenizer(["a short one", "and a somewhat longer second sentence"], padding=True, return_tensors="pt"))
    with torch.no_grad(), attnscope.capture(minilm, chunk=3) as memory:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, chunk=3, out=tmp_path / "b") as streamed:
        minilm(**x)
    assert memory.attention("text", 0).shape[0] == 2
    _assert_same(memory, Trace.load(tmp_path / "b"))
    _assert_same(memory, streamed)


def _minilm_dir(minilm, out, text="The quick brown fox."):
    with torch.no_grad(), attnscope.capture(minilm, out=out, overwrite=True) as trace:
        minilm(**minilm.encode(text))
    return trace


def test_missing_shard_or_checksum_refused_at_load(minilm, tmp_path):
    """A shard deleted (or not copied) and a record whose checksum was removed from trace.json are TraceFileErrors
    when the directory is opened, never a bare FileNotFoundError or a tensor read without verification."""
    out = tmp_path / "t"
    _minilm_dir(minilm, out)
    meta = json.loads((out / stream.META).read_text())
    del meta["runs"][0]["records"][3]["checksum"]
    (out / stream.META).write_text(json.dumps(sealed(meta)))
    with pytest.raises(TraceFileError, match="no checksum"):
        Trace.load(out)
    _minilm_dir(minilm, out)
    trace = Trace.load(out)
    (out / meta["runs"][0]["records"][0]["shard"]).unlink()
    with pytest.raises(TraceFileError, match="missing"):
        trace.attention("text", 0)  # removed after opening: found when read
    with pytest.raises(TraceFileError, match="missing"):
        Trace.load(out)


def test_overwrite_never_deletes_another_tools_files(minilm, tmp_path):
    """overwrite=True replaces an attnscope trace only: a profiler's trace.json or shard-named files without any
    attnscope metadata are the user's."""
    before = _state(minilm)  # transformers adds its own output-capturing hooks after an output_attentions call
    for name, text in (("trace.json", '{"traceEvents": []}'), ("shard-00000.safetensors", "weights")):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text(text)
        with pytest.raises(FileExistsError, match="not part of an attnscope trace"):
            attnscope.capture(minilm, out=out, overwrite=True).__enter__()
        assert (out / name).read_text() == text and sorted(p.name for p in out.iterdir()) == [name]
    assert _state(minilm) == before


def test_a_replaced_shard_is_verified_again(minilm, tmp_path):
    """A trace opened before its directory was overwritten (the viewer serving it) refuses the new shards instead of
    showing their rows under the old trace's tokens."""
    out = tmp_path / "t"
    _minilm_dir(minilm, out, "first sentence here")
    old = Trace.load(out)
    source = old.run().records[("text", 0)][0].source
    source.select(0, [0])  # verified
    _minilm_dir(minilm, out, "other words entirely")  # the same shape, other values
    with pytest.raises(TraceFileError, match="checksum"):
        source.select(0, [0])


def test_cli_fp16_applies_to_a_single_file_too(minilm, tmp_path):
    from attnscope.cli import main

    out = tmp_path / "one.safetensors"
    assert main(["capture", "--model", "minilm", "--text", "hello world", "--out", str(out), "--fp16"]) == 0
    assert Trace.load(out).attention("text", 0).dtype == torch.float16


def test_cli_capture_to_a_file_keeps_a_file_that_is_not_a_trace(minilm, tmp_path, capsys):
    """A single-file capture replaces an earlier trace or summaries file, but not another file (nor a directory) the
    --out path names, unless --overwrite: the user's data is never replaced by a trace without being asked, as a
    non-empty directory is not with --to-dir."""
    from attnscope.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    args = ["capture", "--model", "minilm", "--text", "hello world", "--out", str(notes)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not an attnscope trace" in err and "--overwrite" in err
    assert notes.read_text() == "my notes\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main([*args[:-1], str(folder)]) == 2
    assert "--to-dir" in capsys.readouterr().err
    trace = tmp_path / "t.safetensors"
    assert main([*args[:-1], str(trace)]) == 0
    assert main([*args[:-1], str(trace), "--text", "other words"]) == 0  # an earlier trace is replaced as before
    assert main([*args, "--overwrite"]) == 0
    assert Trace.load(notes).attention("text", 0).shape[-1] > 0


def test_page_of_a_streamed_trace_reads_a_layer_at_a_time(smol_pair, monkeypatch):
    """`attnscope view DIR` / `Trace.load(dir).to_html()` draw a streamed trace from its shards one layer at a time
    (`viz.lazy`, as `serve --trace DIR` does), never the whole trace's rows as one float array (with every head
    metric's temporaries: about six times the trace on disk, out of memory for the long inputs a directory is for);
    the page is the one the in-memory trace gives."""
    from attnscope.viz import data, html

    memory, _, out, _ = smol_pair
    expected = [html.trace_html(memory, run=r) for r in (0, 1)]
    whole = data.stream_views

    def no_whole_rows(trace, *a, **k):
        assert not any(rec.source is not None for run in trace.runs for v in run.records.values() for rec in v), \
            "the whole streamed trace was read into one array"
        return whole(trace, *a, **k)

    monkeypatch.setattr(data, "stream_views", no_whole_rows)
    assert [html.trace_html(Trace.load(out), run=r) for r in (0, 1)] == expected
