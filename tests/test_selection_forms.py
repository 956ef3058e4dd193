"""Selection forms capture must refuse or record exactly: selections that were taken silently as something else (a
bool or a dict as positions, an empty selection), unclear errors (a NumPy int called out of range, no head failing inside the forward), a streamed
capture whose own error was replaced by a provenance refusal, and provenance a capture made itself that no file could
hold (a slice with NumPy bounds, a set's order changing between processes)."""
import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.selection import Selection
from attnscope.capture.stream_read import MARK
from attnscope.capture.trace import check_plain

TEXT = "The cat sat on the mat"


@pytest.mark.parametrize("kw", [dict(queries=True), dict(queries=False), dict(queries=[True]),
                                dict(queries="last", keys=[True]), dict(queries="last", keys=True)])
def test_a_bool_is_not_a_position(smollm, kw):
    """True is the int 1 in Python: queries=True captured the row of token 1, without a word."""
    with pytest.raises(TypeError, match="bool"):
        with attnscope.capture(smollm, layers=[0], **kw):
            pass


@pytest.mark.parametrize("kw", [dict(queries={"text": "last"}), dict(queries="last", keys={"text": [0, 1]})])
def test_a_dict_is_not_a_position_spec(smollm, kw):
    """list() of a dict is its keys: queries={"text": "last"} captured every text row (the key taken as a role)."""
    with pytest.raises(TypeError, match="dict"):
        with attnscope.capture(smollm, layers=[0], **kw):
            pass


@pytest.mark.parametrize("kw", [dict(queries=np.int64(2)), dict(layers=np.arange(2)), dict(heads=[np.int64(0)])])
def test_a_numpy_int_is_named_not_called_out_of_range(smollm, kw):
    with pytest.raises(TypeError, match="int64"):
        with attnscope.capture(smollm, **{"layers": [0], **kw}):
            pass


def test_a_streamed_block_keeps_its_own_error_when_the_provenance_is_bad(smollm, tmp_path):
    with pytest.raises(KeyError, match="the user's own error"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], out=tmp_path / "d") as trace:
            smollm(**smollm.encode(TEXT))
            trace.provenance["note"] = (1, 2)
            raise KeyError("the user's own error")
    mark = (tmp_path / "d" / MARK).read_text()
    assert "the user's own error" in mark and "tuple" in mark


def test_a_provenance_that_holds_itself_is_a_value_error_named_in_the_marker(smollm, tmp_path):
    with pytest.raises(ValueError, match="holds itself"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], out=tmp_path / "d") as trace:
            smollm(**smollm.encode(TEXT))
            trace.provenance["self"] = trace.provenance
    assert "holds itself" in (tmp_path / "d" / MARK).read_text()
    shared = [1, 2]
    check_plain({"a": shared, "b": shared, "c": [shared, shared]}, "provenance")  # a value used twice is no cycle


@pytest.mark.parametrize("bound", [np.int64(0), torch.tensor(0)])
def test_a_slice_with_integer_like_bounds_round_trips(smollm, tmp_path, bound):
    """The capture took slice(np.int64(0), 2) and kept it in its provenance: a streamed capture was written in full,
    then marked INCOMPLETE (its provenance could not be stored), and `save` refused it."""
    with torch.no_grad(), attnscope.capture(smollm, layers=slice(bound, 2), queries="last", out=tmp_path / "d") as t:
        smollm(**smollm.encode(TEXT))
    loaded = attnscope.Trace.load(tmp_path / "d")
    assert loaded.provenance == t.provenance and loaded.layers("text") == [0, 1]
    assert t.provenance["selection"]["layers"] == {"slice": [0, 2, None]}
    assert json.loads(json.dumps(t.provenance)) == t.provenance


def test_a_set_of_ints_and_roles_is_listed_in_one_order():
    """sorted() of a set of ints and strings fails; list() of it is in hash order, which for strings changes from one
    process to the next: the same capture recorded different provenance."""
    assert Selection(queries={"text", "last", 3, 0}).queries == [0, 3, "last", "text"]


@pytest.mark.parametrize("kw", [dict(heads=[]), dict(heads=(h for h in ())), dict(heads=slice(5, 2))])
def test_no_head_is_refused_up_front(smollm, kw):
    """heads=[] (or a spent generator) failed inside the forward with index_select()'s dtype error."""
    with pytest.raises(ValueError, match="selects no head"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], **kw):
            smollm(**smollm.encode(TEXT))


@pytest.mark.parametrize("kw", [dict(layers=[]), dict(streams=[]), dict(layers={}), dict(layers=(i for i in []))])
def test_a_selection_of_no_module_is_refused_up_front(smollm, kw):
    """layers=[], streams=[], layers={} or a spent generator gave an empty trace without a word."""
    with pytest.raises(ValueError, match="select no attention module"):
        with torch.no_grad(), attnscope.capture(smollm, **kw):
            smollm(**smollm.encode(TEXT))
