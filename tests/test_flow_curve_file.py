"""A knockout curve saved as .json carries the checksum of its content: a flow, window, example or number edited after
writing is refused on load; an untouched file loads without a warning; a file written before the checksum (simulated
by removing it) still loads, with a warning."""
import json
import warnings

import numpy as np
import pytest

from attnscope.capture.checksums import METADATA_FIELD
from attnscope.capture.trace import UncheckedMetadataWarning
from attnscope.flow import CurveFileError, KnockoutCurve, knockout_curve

EDITED = "knockout curve metadata does not match its checksum"


@pytest.fixture(scope="module")
def curve(smollm):
    return knockout_curve(smollm, "The capital of France is", question="capital of France is", subject="France",
                          answer=" Paris", chat=False, window=30, stride=30)


def _swap_flows(meta):
    a, b = meta["flows"]
    meta["changes"] = {a: meta["changes"][b], b: meta["changes"][a]}


def _shift_window(meta):
    meta["windows"][0][1] -= 1


def _change_value(meta):
    meta["changes"][meta["flows"][0]][0][0] += 0.5


def _change_answer(meta):
    meta["examples"][0]["answer"] = " London"


@pytest.mark.parametrize("edit", [_swap_flows, _shift_window, _change_value, _change_answer])
def test_an_edited_curve_file_is_refused(curve, tmp_path, edit):
    meta = json.loads(curve.save(tmp_path / "c.json").read_text())
    edit(meta)
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(CurveFileError, match=EDITED):
        KnockoutCurve.load(tmp_path / "bad.json")


def test_untouched_and_older_files_load(curve, tmp_path):
    path = curve.save(tmp_path / "c.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = KnockoutCurve.load(path)
    assert back.windows == curve.windows and back.flows == curve.flows
    assert all(np.array_equal(back.changes[f], curve.changes[f]) for f in curve.flows)
    meta = json.loads(path.read_text())
    del meta[METADATA_FIELD]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    with pytest.warns(UncheckedMetadataWarning, match="knockout curve metadata had no checksum"):
        old = KnockoutCurve.load(tmp_path / "old.json")
    assert all(np.array_equal(old.changes[f], curve.changes[f]) for f in curve.flows)
