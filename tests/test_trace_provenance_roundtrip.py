"""A trace's provenance comes back from every file kind exactly as captured (whole dict, types included), for
selections given as tuples, ranges, sets or generators; provenance a file cannot give back as itself is refused
before anything is written; a layers dict whose keys are not streams is refused instead of capturing nothing."""
import warnings

import pytest
import torch

import attnscope
from attnscope.capture import selection as selection_module
from attnscope.capture import summaries_file_v1, trace as trace_module
from attnscope.capture.stream_read import MARK

TEXT = "The cat sat on the mat"
# every non-list form a selection takes: a per-stream layers dict of a tuple, a range of heads, a tuple of roles
SELECTION = dict(streams=("text",), layers={"text": (0, 2, -1)}, heads=range(1, 4), queries=("last",))


def _capture(model, **kw):
    with torch.no_grad(), attnscope.capture(model, **kw) as trace:
        model(**model.encode(TEXT))
    return trace


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file written now carries its metadata checksum
        return attnscope.Trace.load(path)


def _write(kind: str, model, tmp_path, **kw):
    """Capture `kw` on `model` and write it as `kind`; (the captured trace, its path)."""
    if kind == "dir":
        trace = _capture(model, out=tmp_path / "dir", **kw)
        return trace, tmp_path / "dir"
    if kind == "rows":
        trace = _capture(model, **kw)
        return trace, trace.save(tmp_path / "rows.safetensors")
    trace = _capture(model, summaries="all", **kw)
    if kind == "summaries/1":
        return trace, summaries_file_v1.save(trace, tmp_path / "sum1.safetensors")
    return trace, trace.save(tmp_path / "sum2.safetensors")


KINDS = ["rows", "dir", "summaries/2", "summaries/1"]


@pytest.mark.parametrize("kind", KINDS)
def test_provenance_round_trips(smollm, tmp_path, kind):
    trace, path = _write(kind, smollm, tmp_path, **SELECTION)
    loaded = _load(path)
    assert type(loaded) is type(trace)
    assert loaded.provenance == trace.provenance
    assert repr(loaded.provenance) == repr(trace.provenance)  # the same types too (== says 1 == 1.0, True == 1)
    assert trace.provenance["selection"]["layers"] == {"text": [0, 2, -1]}
    assert trace.provenance["selection"]["heads"] == [1, 2, 3]
    assert loaded.layers("text") == [0, 2, smollm.streams["text"] - 1]
    assert all(r.heads == [1, 2, 3] for v in loaded.runs[0].records.values() for r in v)


@pytest.mark.parametrize("kind", KINDS)
def test_file_written_before_loads_as_a_capture_now_holds(smollm, tmp_path, kind, monkeypatch):
    """A file written before selections were listed (its tuples stored as JSON arrays) loads with the provenance the
    same capture holds now."""
    old = dict(SELECTION, heads=(1, 2, 3))  # a range could not be saved at all then
    with monkeypatch.context() as m:  # the writer as it was: the selection kept as given, nothing checked
        m.setattr(selection_module.Selection, "__post_init__", lambda self: None)
        m.setattr(trace_module, "check_plain", lambda value, where: None)
        before, path = _write(kind, smollm, tmp_path, **old)
        assert before.provenance["selection"]["heads"] == (1, 2, 3)  # the old in-memory form
    now = _capture(smollm, **old) if kind in ("rows", "dir") else _capture(smollm, summaries="all", **old)
    assert _load(path).provenance == now.provenance


def test_listed_selection_captures_the_same(smollm):
    """A range, set or generator selects what the list does, at every layer (a generator was spent by the first)."""
    want = _capture(smollm, layers=[0, 1, 2], heads=[0, 2], queries="last")
    for heads in (range(0, 3, 2), {2, 0}, (h for h in (0, 2))):
        got = _capture(smollm, layers=range(3), heads=heads, queries="last")
        assert got.provenance["selection"]["heads"] == [0, 2]
        for layer in range(3):
            assert got.record("text", layer).heads == [0, 2]
            assert torch.equal(got.attention("text", layer), want.attention("text", layer))


@pytest.mark.parametrize("layers", [{0: [1, 2]}, {"text": [0], "vision": [0]}])
def test_layers_dict_of_unknown_keys_is_refused(smollm, layers):
    """{layer: heads} (or a stream this model lacks) selected nothing and saved an int key that loaded as a str."""
    with pytest.raises(ValueError, match=r"\{stream: layers\}.*not a stream of this model"):
        with attnscope.capture(smollm, layers=layers):
            pass


def test_unknown_role_in_a_tuple_is_refused_up_front(smollm):
    with pytest.raises((ValueError, KeyError), match="nosuchrole"):
        with attnscope.capture(smollm, layers=[0], queries=("last", "nosuchrole")):
            pass


@pytest.mark.parametrize("bad, where", [({1: "a"}, "key 1"), ((1, 2), "tuple"), (torch.tensor(1.0), "Tensor")])
def test_provenance_a_file_cannot_give_back_is_refused(smollm, tmp_path, bad, where):
    trace = _capture(smollm, layers=[0], queries="last")
    trace.provenance["note"] = {"x": bad}
    with pytest.raises(ValueError, match=rf"provenance\['note'\]\['x'\].*{where}|provenance\['note'\].*{where}"):
        trace.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    summaries = _capture(smollm, layers=[0], summaries="entropy")
    summaries.provenance["note"] = bad
    with pytest.raises(ValueError, match=r"provenance\['note'\]"):
        summaries.save(tmp_path / "bad_summaries.safetensors")
    assert not (tmp_path / "bad_summaries.safetensors").exists()


def test_streamed_trace_with_bad_provenance_says_why(smollm, tmp_path):
    with pytest.raises(ValueError, match="tuple"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], out=tmp_path / "d") as trace:
            smollm(**smollm.encode(TEXT))
            trace.provenance["note"] = (1, 2)
    assert "no metadata written" in (tmp_path / "d" / MARK).read_text()
    with pytest.raises(trace_module.TraceFileError, match="not a complete"):
        attnscope.Trace.load(tmp_path / "d")


def test_steer_edit_with_a_generator_of_heads_edits_as_the_list_does(smollm):
    """An edit reads its selection at every install: a generator of heads was spent by the first read (its check),
    and the steered model then edited no head at all."""
    from attnscope.steer import steer
    from attnscope.steer.edits import HeadScale

    x = smollm.encode(TEXT)
    with torch.no_grad():
        base = smollm(**x).logits
        with steer(smollm, HeadScale(0.0, layers=[0, 1], heads=[0, 1])):
            want = smollm(**x).logits
        with steer(smollm, HeadScale(0.0, layers=range(2), heads=(h for h in (0, 1)))):
            got = smollm(**x).logits
    assert not torch.equal(want, base) and torch.equal(got, want)
