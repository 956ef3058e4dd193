"""The metadata of a trace is checksummed too, not only its tensors: a single file, a streamed directory (complete or
partial) and a summaries file whose labels were edited after writing (a record's heads permuted, a query shifted, a
step changed, a token relabelled, the provenance changed) are refused, where every tensor checksum still passes.
Untouched files load bit for bit; files written before the metadata checksum (simulated by removing it) still load,
with a warning. A streamed directory whose shards hold a tensor trace.json does not list is refused when opened, from
the shards' headers only."""
import builtins
import json
import shutil
import struct

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

import attnscope
from attnscope.capture import stream, stream_read, summaries_file_v1
from attnscope.capture.checksums import METADATA_FIELD, sealed
from attnscope.capture.summaries import Summaries
from attnscope.capture.trace import Trace, TraceFileError, UncheckedMetadataWarning

PROMPT = "The capital of France is"
EDITED = "metadata does not match its checksum: it was edited or damaged after it was written"


@pytest.fixture(scope="module")
def written(smollm, tmp_path_factory):
    """A file, a streamed directory and a summaries file of one generate (prefill + 2 decode steps), and the traces
    in memory they were written from."""
    root = tmp_path_factory.mktemp("sealed")
    x = smollm.encode(PROMPT)
    kw = dict(layers=[0, 3], heads=[1, 4, 7], queries=[1, 2, "last"])
    with torch.no_grad(), attnscope.capture(smollm, **kw) as memory:
        smollm.generate(**x, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), attnscope.capture(smollm, out=root / "dir", **kw):
        smollm.generate(**x, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), attnscope.capture(smollm, summaries="all", topk=3, **kw) as summaries:
        smollm.generate(**x, max_new_tokens=2, do_sample=False)
    return {"memory": memory, "file": memory.save(root / "t.safetensors"), "dir": root / "dir",
            "summaries": summaries, "summaries_file": summaries.save(root / "s.safetensors"),
            "summaries_file_v1": summaries_file_v1.save(summaries, root / "s1.safetensors")}


# --- edits of the labels (each leaves every tensor and its checksum as written) -------------------------------------
def _records(meta):
    """The first run's record entries: a list in a trace and a /1 summaries file, per layer in a /2 one."""
    run = meta["runs"][0]
    return run["records"] if "records" in run else [rm for layer in run["layers"] for rm in layer["records"]]


def _permute_heads(meta):
    rm = _records(meta)[0]
    rm["heads"] = rm["heads"][::-1]


def _shift_query(meta):
    rm = _records(meta)[-1]
    rm["queries"] = [q - 1 for q in rm["queries"]]


def _change_step(meta):
    _records(meta)[-1]["step"] += 1


def _relabel_role(meta):
    roles = meta["runs"][0]["tokens"]["text"][0]["roles"]
    roles[1] = "image" if roles[1] != "image" else "text"


def _edit_provenance(meta):
    meta["provenance"]["model"] = "minilm"


EDITS = [_permute_heads, _shift_query, _change_step, _relabel_role, _edit_provenance]


def _rewrite_file(path, out, edit):
    """A copy of the safetensors trace (or summaries) file at `path` with its metadata changed by `edit`."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(out), metadata={"attnscope": json.dumps(meta)})
    return out


def _copy_dir(src, out, edit=None, partial=False):
    """A copy of a streamed directory, its trace.json changed by `edit`; with `partial`, as a capture that raised."""
    shutil.copytree(src, out)
    meta = json.loads((out / stream.META).read_text())
    if edit is not None:
        edit(meta)
    if partial:
        (out / stream.META).unlink()
        (out / stream.MARK).write_text("the capture block raised\n")
    (out / (stream.PARTIAL if partial else stream.META)).write_text(json.dumps(meta))
    return out


def _drop_seal(meta):
    del meta[METADATA_FIELD]


def _same(a: Trace, b: Trace):
    """Equal bit for bit: provenance, token maps, steps and every record's labels and tensors."""
    assert a.provenance == b.provenance and len(a.runs) == len(b.runs)
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.steps, ra.prefix, ra.lengths) == (rb.steps, rb.prefix, rb.lengths)
        assert {s: [t.to_dict() for t in m] for s, m in ra.tokens.items()} == \
               {s: [t.to_dict() for t in m] for s, m in rb.tokens.items()}
        assert sorted(ra.records) == sorted(rb.records)
        for key in ra.records:
            assert len(ra.records[key]) == len(rb.records[key])
            for x, y in zip(ra.records[key], rb.records[key]):
                assert (x.heads, x.queries, x.step, x.part) == (y.heads, y.queries, y.step, y.part)
                if isinstance(a, Summaries):
                    tx, ty = x.tensors(), y.tensors()
                    assert tx.keys() == ty.keys() and all(torch.equal(tx[n], ty[n]) for n in tx)
                else:
                    assert x.probs.dtype == y.probs.dtype and torch.equal(x.probs, y.probs)


# --- the definition --------------------------------------------------------------------------------------------
def test_the_checksum_is_xxh3_128_of_the_canonical_json_by_hand(written):
    with safe_open(str(written["file"]), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
    seal = meta.pop(METADATA_FIELD)
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    assert seal == {"algorithm": "xxh3_128", "digest": xxhash.xxh3_128(canonical).hexdigest()}
    on_disk = json.loads((written["dir"] / stream.META).read_text())
    assert on_disk[METADATA_FIELD]["digest"] == xxhash.xxh3_128(json.dumps(
        {k: v for k, v in on_disk.items() if k != METADATA_FIELD}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


# --- untouched: bit for bit, no warning -----------------------------------------------------------------------
def test_untouched_files_load_bit_for_bit_without_a_warning(written, recwarn):
    _same(written["memory"], Trace.load(written["file"]))
    _same(written["memory"], Trace.load(written["dir"]))
    _same(written["summaries"], Trace.load(written["summaries_file"]))
    _same(written["summaries"], Trace.load(written["summaries_file_v1"]))
    assert not [w for w in recwarn if issubclass(w.category, UncheckedMetadataWarning)]


# --- edited labels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", EDITS)
def test_edited_labels_of_a_file_are_refused(written, tmp_path, edit):
    bad = _rewrite_file(written["file"], tmp_path / "bad.safetensors", edit)
    with pytest.raises(TraceFileError, match=EDITED) as err:
        Trace.load(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("partial", [False, True], ids=["trace.json", "trace.partial.json"])
@pytest.mark.parametrize("edit", EDITS)
def test_edited_labels_of_a_streamed_directory_are_refused(written, tmp_path, edit, partial):
    bad = _copy_dir(written["dir"], tmp_path / "bad", edit, partial)
    with pytest.raises(TraceFileError, match=EDITED) as err:
        Trace.load(bad, partial=partial)
    assert (stream.PARTIAL if partial else stream.META) in str(err.value)


@pytest.mark.parametrize("kind", ["summaries_file", "summaries_file_v1"], ids=["format 2", "format 1"])
@pytest.mark.parametrize("edit", EDITS)
def test_edited_labels_of_a_summaries_file_are_refused(written, tmp_path, edit, kind):
    bad = _rewrite_file(written[kind], tmp_path / "bad.safetensors", edit)
    with pytest.raises(TraceFileError, match=EDITED):
        Trace.load(bad)


@pytest.mark.parametrize("seal, says", [({"algorithm": "sha3_999", "digest": "00"}, "'sha3_999' is not known"),
                                        ({"algorithm": "xxh3_128"}, "malformed metadata_checksum"),
                                        ({"algorithm": ["xxh3_128"], "digest": "00"}, "malformed metadata_checksum"),
                                        ("abc", "malformed metadata_checksum"),
                                        (None, "malformed metadata_checksum")])  # no attnscope writes null
def test_a_checksum_field_this_version_cannot_check_is_refused(written, tmp_path, seal, says):
    bad = _rewrite_file(written["file"], tmp_path / "bad.safetensors", lambda m: m.update({METADATA_FIELD: seal}))
    with pytest.raises(TraceFileError, match=says):
        Trace.load(bad)


# --- written before the metadata checksum ------------------------------------------------------------------------
def test_files_without_a_metadata_checksum_still_load_with_a_warning(written, tmp_path):
    old_file = _rewrite_file(written["file"], tmp_path / "old.safetensors", _drop_seal)
    old_dir = _copy_dir(written["dir"], tmp_path / "old", _drop_seal)
    # summaries files written before the metadata checksum were of format /1; a /2 file is always sealed
    old_summaries = _rewrite_file(written["summaries_file_v1"], tmp_path / "old-s.safetensors", _drop_seal)
    with pytest.raises(TraceFileError, match="without its metadata_checksum"):
        Trace.load(_rewrite_file(written["summaries_file"], tmp_path / "unsealed-s2.safetensors", _drop_seal))
    for path, memory in ((old_file, "memory"), (old_dir, "memory"), (old_summaries, "summaries")):
        with pytest.warns(UncheckedMetadataWarning, match="no checksum") as caught:
            loaded = Trace.load(path)
        assert [w.filename for w in caught] == [__file__]  # one warning, pointing at the caller of Trace.load
        _same(written[memory], loaded)
    resaved = tmp_path / "resaved.safetensors"
    with pytest.warns(UncheckedMetadataWarning):
        Trace.load(old_file).save(resaved)
    with safe_open(str(resaved), framework="pt") as f:
        assert METADATA_FIELD in json.loads(f.metadata()["attnscope"])  # saved again: sealed


# --- a streamed directory lists every tensor of its shards ---------------------------------------------------------
def _shard_of(out, index=0):
    return json.loads((out / stream.META).read_text())["runs"][0]["records"][index]["shard"]


def test_a_tensor_in_a_shard_that_trace_json_does_not_list_is_refused(written, tmp_path):
    out = _copy_dir(written["dir"], tmp_path / "extra")
    shard = out / _shard_of(out)
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | {"r0/text/0/9": torch.zeros(1, 3, 1, 4)}, str(shard))  # listed tensors unchanged
    with pytest.raises(TraceFileError, match=r"1 tensor\(s\) \(r0/text/0/9\) have no entry in trace.json"):
        Trace.load(out)


def test_an_entry_taken_out_of_trace_json_is_refused_even_resealed(written, tmp_path):
    """The metadata checksum does not stop an edit whose writer seals it again (it is no signature); the tensor left
    in its shard without an entry still does."""
    def drop_last(meta):
        meta["runs"][0]["records"].pop()
        meta.update(sealed(meta))

    out = _copy_dir(written["dir"], tmp_path / "dropped", drop_last)
    with pytest.raises(TraceFileError, match="have no entry in trace.json: the metadata was edited"):
        Trace.load(out)


def test_a_shard_that_no_entry_names(written, tmp_path):
    """A complete trace refuses a shard none of its entries names; a partial one skips it (a record whose writing
    failed leaves its shard behind and its entry out)."""
    for partial in (False, True):
        out = _copy_dir(written["dir"], tmp_path / f"stray{partial}", partial=partial)
        save_file({"r0/text/0/9": torch.zeros(2)}, str(out / "shard-09999.safetensors"))
        if partial:
            _same(written["memory"], Trace.load(out, partial=True))
        else:
            with pytest.raises(TraceFileError, match="shard-09999.safetensors: 1 tensor"):
                Trace.load(out)


def test_opening_a_directory_reads_the_shard_headers_only(written, monkeypatch):
    out = written["dir"]
    shards = sorted(out.glob("shard-*.safetensors"))
    headers = sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in shards)
    assert sum(p.stat().st_size for p in shards) > headers + 256  # the shards hold tensor bytes past their headers
    read = {"bytes": 0}

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read["bytes"] += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(stream_read, "open", lambda *a, **k: Counted(builtins.open(*a, **k)), raising=False)
    maps = []
    monkeypatch.setattr(stream_read.np, "memmap", lambda *a, **k: maps.append(a))
    trace = Trace.load(out)
    assert read["bytes"] == headers and maps == []
    assert all(r._probs is None for run in trace.runs for rs in run.records.values() for r in rs)


# --- the viewer and the CLI ----------------------------------------------------------------------------------------
def test_the_viewer_refuses_an_edited_upload(written, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    client = TestClient(create_app(), base_url="http://127.0.0.1")
    bad = _rewrite_file(written["file"], tmp_path / "bad.safetensors", _relabel_role)
    r = client.post("/api/trace", files={"trace": ("t.safetensors", bad.read_bytes(), "application/octet-stream")})
    assert r.status_code == 400 and "does not match its checksum" in r.json()["error"]
    r = client.post("/api/trace", files={"trace": ("t.safetensors", written["file"].read_bytes(),
                                                   "application/octet-stream")})
    assert r.status_code == 200, r.text


def test_serve_trace_on_an_edited_directory_is_one_error_line(written, tmp_path, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn

    from attnscope.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, **kw: None)  # never serves, even if the check failed
    bad = _copy_dir(written["dir"], tmp_path / "bad", _permute_heads)
    assert main(["serve", "--trace", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not match its checksum" in err[0]
