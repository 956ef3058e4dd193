"""Summaries in a file (`Summaries.save`, `Trace.load`, `attnscope capture --summaries`): the round trip is bit for
bit in both formats (the packed /2 that `save` writes, and /1 from the kept writer), a damaged or mismatched /1 file
is a `TraceFileError` at load as it always was (/2: tests/test_summaries_file_packed.py), the CLI writes a loadable
file and refuses bad names in one `error:` line naming the valid ones."""
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import attnscope
from attnscope.capture import summaries_file_v1
from attnscope.capture.checksums import sealed
from attnscope.capture.summaries import SUMMARIES, Summaries
from attnscope.capture.trace import TraceFileError, checksum
from attnscope.cli import main

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def saved(smollm, tmp_path_factory):
    x = smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29], heads=[1, 5], queries="last", summaries="all",
                                            topk=3) as s:
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    return s, s.save(tmp_path_factory.mktemp("summaries") / "s.safetensors")


@pytest.fixture(scope="module")
def saved_v1(saved, tmp_path_factory):
    """The same summaries in a file of format /1 (the writer `Summaries.save` used before /2, kept)."""
    s, _ = saved
    return s, summaries_file_v1.save(s, tmp_path_factory.mktemp("summaries-v1") / "s1.safetensors")


@pytest.mark.parametrize("written", ["saved", "saved_v1"], ids=["format 2", "format 1"])
def test_round_trip_is_bit_for_bit(request, written):
    s, path = request.getfixturevalue(written)
    with safe_open(str(path), "pt") as f:
        version = 1 if written == "saved_v1" else 2
        assert json.loads(f.metadata()["attnscope"])["format"] == f"attnscope.summaries/{version}"
    loaded = attnscope.Trace.load(path)
    assert isinstance(loaded, Summaries) and isinstance(Summaries.load(path), Summaries)
    assert loaded.provenance == s.provenance
    assert len(loaded.runs) == len(s.runs) == 1
    a, b = s.run(), loaded.run()
    assert a.steps == b.steps == 2 and a.lengths == b.lengths
    assert b.tokens["text"][0].to_dict() == a.tokens["text"][0].to_dict()
    assert sorted(a.records) == sorted(b.records) == [("text", 0), ("text", 29)]
    for key in a.records:
        assert len(a.records[key]) == len(b.records[key]) == 3
        for ra, rb in zip(a.records[key], b.records[key]):
            assert (ra.heads, ra.queries, ra.step, ra.part) == (rb.heads, rb.queries, rb.step, rb.part)
            ta, tb = ra.tensors(), rb.tensors()
            assert ta.keys() == tb.keys() and len(ta) == 6
            for name in ta:
                assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
                assert torch.equal(ta[name], tb[name]), name
    assert torch.equal(loaded.lookback("text", 29, step=None), s.lookback("text", 29, step=None))
    assert loaded.topk("text", 0, step=2)[0].shape == (1, 2, 1, 3)


def _data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]  # safetensors: a u64 header length, the JSON header, then the bytes


def test_damaged_or_mismatched_file_is_a_trace_file_error(saved_v1, smollm, tmp_path):
    _, path = saved_v1
    raw = bytearray(path.read_bytes())
    raw[_data_start(raw) + 9] ^= 0x40  # one bit of one summary tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(TraceFileError, match="checksum"):
        attnscope.Trace.load(bad)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(TraceFileError, match="not a readable attnscope trace"):
        attnscope.Trace.load(cut)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as rows:
        smollm(**smollm.encode(PROMPT))
    with pytest.raises(TraceFileError, match="not summaries"):
        Summaries.load(rows.save(tmp_path / "rows.safetensors"))
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], out=tmp_path / "rows-dir"):
        smollm(**smollm.encode(PROMPT))
    with pytest.raises(TraceFileError, match="not summaries"):  # was a Summaries holding rows
        Summaries.load(tmp_path / "rows-dir")
    with safe_open(str(path), "pt") as f:  # a later summaries format: named as such, not "holds attention rows"
        meta, tensors = json.loads(f.metadata()["attnscope"]), {k: f.get_tensor(k) for k in f.keys()}
    later = tmp_path / "later.safetensors"
    later.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(meta | {"format": "attnscope.summaries/3"})}))
    for load in (Summaries.load, attnscope.Trace.load):
        with pytest.raises(TraceFileError, match="unsupported summaries format 'attnscope.summaries/3'"):
            load(later)

    def rewritten(name: str, edit) -> Path:
        """The file with `edit(tensors)` applied and the metadata's shapes, dtypes and checksums made to agree."""
        edited = dict(tensors)
        edit(edited)
        records = [rm for run in meta["runs"] for rm in run["records"]]
        for rm in records:
            for key, info in rm["tensors"].items():
                t = edited[f"{rm['key']}/{key}"]
                info.update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."), blake2b=checksum(t))
        out = tmp_path / name
        out.write_bytes(safetensors_bytes(edited, metadata={"attnscope": json.dumps(sealed(meta))}))
        return out

    first = meta["runs"][0]["records"][0]["key"]
    edits = {"roles": lambda t: t.update({f"{first}/role_mass": t[f"{first}/role_mass"][..., :-1].contiguous()}),
             "pair up": lambda t: t.update({f"{first}/topk_value": t[f"{first}/topk_value"][..., :-1].contiguous()}),
             "NaN": lambda t: t.update({f"{first}/entropy": torch.full_like(t[f"{first}/entropy"], float("nan"))})}
    for says, edit in edits.items():  # each was loaded as it was
        with pytest.raises(TraceFileError, match=says):
            attnscope.Trace.load(rewritten(f"{says}.safetensors", edit))


def test_cli_writes_a_loadable_file_and_refuses_bad_names(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    base = ["capture", "--model", "smollm2-135m", "--text", PROMPT, "--layers", "0,-1", "--queries", "last"]
    assert main(base + ["--summaries", "lookback,topk", "--topk", "2", "--out", str(out)]) == 0
    s = attnscope.Trace.load(out)
    assert isinstance(s, Summaries) and s.layers("text") == [0, 29]
    rec = s.record("text", -1)
    assert set(rec.tensors()) == {"key_count", "lookback", "topk_index", "topk_value"}
    assert rec.topk_value.shape == (1, 9, 1, 2) and torch.all(rec.lookback == 1)  # nothing generated: ratio 1
    capsys.readouterr()
    for bad, says in ((["--summaries", "entropy,lookback_lens"], list(SUMMARIES)), (["--topk", "3"], ["--summaries"]),
                      (["--summaries", "lookback", "--topk", "3"], ["--topk", "topk"]),
                      (["--summaries", "--to-dir"], ["--to-dir"])):
        assert main(base + bad + ["--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and all(w in err[0] for w in says), err


def test_summary_records_whose_labels_disagree_with_their_keys_are_refused(saved_v1, tmp_path):
    """Layers 0 and 29 hold summaries of one shape: swapping their entries' layers passed every tensor check and put
    layer 29's numbers under layer 0. The tensors' names say which record they are; a disagreeing entry is refused
    (format /1; in /2 a layer's label is the name of its packs)."""
    _, path = saved_v1
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    records = meta["runs"][0]["records"]
    a = next(i for i, rm in enumerate(records) if rm["layer"] == 0)
    b = next(i for i, rm in enumerate(records) if rm["layer"] == 29)
    records[a]["layer"], records[b]["layer"] = 29, 0
    bad = tmp_path / "relabelled.safetensors"
    bad.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(sealed(meta))}))
    with pytest.raises(TraceFileError, match="is labelled run 0"):
        attnscope.Trace.load(bad)


@pytest.mark.parametrize("edit", ["last record", "one summary"])
def test_summary_entries_taken_out_of_the_metadata_are_refused(saved_v1, tmp_path, edit):
    """An entry taken out of the metadata (a layer's last step, or one summary of a record) loaded without it, its
    tensors left in the file unread; every tensor of the file must be named by the metadata (format /1; /2:
    test_summaries_file_packed.py)."""
    _, path = saved_v1
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    records = meta["runs"][0]["records"]
    if edit == "last record":
        records.pop()
    else:
        records[0]["tensors"].pop("entropy")
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(sealed(meta))}))
    with pytest.raises(TraceFileError, match=r"have no entry in its metadata: the metadata was edited"):
        attnscope.Trace.load(bad)
