"""Trace files: safetensors + JSON round trip, validated on load, clear errors for corrupt or foreign files."""
import json

import pytest
import torch
from safetensors.torch import save_file

import attnscope
from attnscope.capture.checksums import sealed
from attnscope.capture.trace import TraceFileError
from test_trace_checksums import _duplicate, _duplicate_as_next_step, _swap_layers


@pytest.fixture(scope="module")
def saved(minilm, tmp_path_factory):
    x = minilm.encode("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad(), attnscope.capture(minilm, layers=[1, 3], heads=[2, 4], queries="last") as trace:
        minilm(**x)
    path = trace.save(tmp_path_factory.mktemp("trace") / "fox.safetensors")
    return trace, path


def test_round_trip(saved):
    trace, path = saved
    loaded = attnscope.Trace.load(path)
    assert loaded.layers("text") == [1, 3]
    for layer in (1, 3):
        assert torch.equal(loaded.attention("text", layer), trace.attention("text", layer))
        assert loaded.record("text", layer).heads == [2, 4]
    assert loaded.tokens("text").roles == trace.tokens("text").roles
    assert loaded.provenance["model"] == "minilm" and len(loaded.provenance["weights"]) == 32
    assert loaded.provenance["backend"] == {"text": "sdpa"}


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TraceFileError, match="not a readable attnscope trace"):
        attnscope.Trace.load(bad)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TraceFileError, match="not an attnscope trace"):
        attnscope.Trace.load(path)


def test_metadata_that_lies_about_shapes(saved, tmp_path):
    trace, _ = saved
    path = trace.save(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["runs"][0]["records"][0]["shape"][2] = 5
    save_file(tensors, str(path), metadata={"attnscope": json.dumps(sealed(meta))})
    with pytest.raises(TraceFileError, match="metadata says"):
        attnscope.Trace.load(path)


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "trace.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(TraceFileError):
        attnscope.Trace.load(path)


def test_metadata_of_the_wrong_shape_is_a_trace_file_error(tmp_path):
    """A safetensors file whose attnscope metadata is valid JSON of the wrong shape: a TraceFileError, never a bare
    AttributeError (the viewer turns TraceFileError into a 400)."""
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"attnscope": "[1, 2]"})
    with pytest.raises(TraceFileError):
        attnscope.Trace.load(path)


def _with_records_edited(path, bad, edit):
    """A copy of the trace file at `path`, written to `bad`, whose first run's record entries `edit` changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta["runs"][0]["records"])
    save_file(tensors, str(bad), metadata={"attnscope": json.dumps(sealed(meta))})
    return bad


@pytest.mark.parametrize("edit", [_swap_layers, _duplicate, _duplicate_as_next_step])
def test_records_whose_labels_disagree_with_their_keys_are_refused(saved, tmp_path, edit):
    """As in a streamed directory (test_trace_checksums.py): the checksum covers a tensor, not its labels. Layers 1
    and 3 have tensors of one shape, so a file whose entries were relabelled (layers swapped) or duplicated loaded
    with every check passing and layer 3's matrix under layer 1. The tensor's name says which run, stream, layer and
    index it is; an entry that disagrees is refused, as the directory's loader refuses it."""
    bad = _with_records_edited(saved[1], tmp_path / "relabelled.safetensors", edit)
    with pytest.raises(TraceFileError, match=r"r0/text/\d/0 is labelled run 0, stream 'text', layer \d, record \d"):
        attnscope.Trace.load(bad)


def _drop_last(records):
    records.pop()


def _drop_layer(records):
    records[:] = [rm for rm in records if rm["layer"] != records[-1]["layer"]]


def _layer_as_text(records):
    for rm in records:
        rm["layer"] = str(rm["layer"])


@pytest.mark.parametrize("edit, says", [(_drop_last, r"1 tensor\(s\) of the file \(r0/text/3/0\) have no entry"),
                                        (_drop_layer, r"have no entry in its metadata: .*records removed"),
                                        (_layer_as_text, r"layer '1': a stream is a name and a layer an integer")])
def test_records_taken_out_of_the_metadata_or_relabelled_by_type_are_refused(saved, tmp_path, edit, says):
    """Entries taken out of the metadata (the last record of a layer, a whole layer) passed every check: the trace
    loaded without them, and their tensors stayed in the file unread. A layer written as "1" spelled the same tensor
    name and loaded under ('text', '1'), apart from layer 1. Each is refused by name."""
    bad = _with_records_edited(saved[1], tmp_path / "edited.safetensors", edit)
    with pytest.raises(TraceFileError, match=says):
        attnscope.Trace.load(bad)
