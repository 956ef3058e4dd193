"""Trace files and helpers: a checksum per tensor verified on load (a file with overwritten bytes is refused, in
`Trace.load` and in the viewer), files created with the user's umask, negative layer indices meaning the same as in
`capture`, the BertViz export, and `Trace.plot` over an image for a `keys="image"` capture."""
from __future__ import annotations

import os
import struct

import matplotlib
import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.trace import TraceFileError


@pytest.fixture(scope="module")
def text_trace(minilm):
    x = minilm.encode("The cat sat on the mat.")
    with torch.no_grad(), attnscope.capture(minilm) as trace:
        minilm(**x)
    return trace


def tensor_region(path) -> tuple[int, int]:
    """(start, end) byte offsets of the tensor data in a safetensors file."""
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    return 8 + header, len(raw)


def test_overwritten_bytes_fail_the_checksum(tmp_path, text_trace):
    path = text_trace.save(tmp_path / "t.safetensors")
    assert attnscope.Trace.load(path).attention("text", 3).shape == text_trace.attention("text", 3).shape
    start, end = tensor_region(path)
    raw = bytearray(path.read_bytes())
    raw[start + (end - start) // 2: start + (end - start) // 2 + 8] = b"\xff" * 8  # NaN bytes in some tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(TraceFileError, match="checksum"):
        attnscope.Trace.load(path)
    # a flipped low bit keeps a finite, plausible value: only the checksum can see it
    path = text_trace.save(tmp_path / "u.safetensors")
    raw = bytearray(path.read_bytes())
    raw[start + 4] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(TraceFileError, match="checksum"):
        attnscope.Trace.load(path)


def test_viewer_answers_a_damaged_trace_with_a_clear_400(tmp_path, text_trace):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    path = text_trace.save(tmp_path / "t.safetensors")
    start, end = tensor_region(path)
    raw = bytearray(path.read_bytes())
    raw[start: start + 16] = b"\xff" * 16
    client = TestClient(create_app(), base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.post("/api/trace", files={"trace": ("t.safetensors", bytes(raw), "application/octet-stream")})
    assert r.status_code == 400 and "checksum" in r.json()["error"]
    # NaN written by the library itself (a model that produced them): checksum fine, still a clear 400
    rec = text_trace.record("text", 0)
    saved = rec.probs
    rec.probs = saved.clone()
    rec.probs[0, 0, 0, 0] = float("nan")
    try:
        path = text_trace.save(tmp_path / "nan.safetensors")
    finally:
        rec.probs = saved
    r = client.post("/api/trace", files={"trace": ("nan.safetensors", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 400 and "NaN" in r.json()["error"]


def test_trace_files_follow_the_umask(tmp_path, text_trace):
    old = os.umask(0o022)
    try:
        assert oct(text_trace.save(tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o077)
        assert oct(text_trace.save(tmp_path / "b.safetensors").stat().st_mode & 0o777) == oct(0o600)
    finally:
        os.umask(old)


def test_negative_layers_mean_the_same_as_in_capture(tmp_path, minilm, smollm):
    x = minilm.encode("The cat sat on the mat.")
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, -1]) as trace:
        minilm(**x)
    last = minilm.streams["text"] - 1
    assert trace.layers("text") == [0, last]
    assert torch.equal(trace.attention("text", -1), trace.attention("text", last))
    assert torch.equal(trace.attention("text", -1, head=2), trace.attention("text", last, head=2))
    loaded = attnscope.Trace.load(trace.save(tmp_path / "t.safetensors"))
    assert torch.equal(loaded.attention("text", -1), trace.attention("text", last))
    with pytest.raises(KeyError, match="out of range"):
        trace.attention("text", -99)
    with pytest.raises(KeyError, match="nothing captured"):
        trace.attention("text", -2)  # the layer before the last exists in the model, but was not captured
    # steering: a keep schedule at -2 is the schedule at L-2
    from attnscope.steer import DropTokens

    n = smollm.streams["text"]
    drop = DropTokens({-2: 0.5, 3: 1.0}, role="text")
    drop.check(smollm)
    assert drop.schedule == {3: 1.0, n - 2: 0.5}
    # explain: raw attention at layer -1 is the last layer's
    from attnscope.explain import explain

    a = explain(minilm, x, method="raw", layer=-1)
    b = explain(minilm, x, method="raw", layer=last)
    assert torch.equal(a.scores, b.scores)


def test_to_bertviz_is_one_call(text_trace, minilm):
    out = text_trace.to_bertviz()
    n_layers = minilm.streams["text"]
    assert len(out["attention"]) == n_layers and out["tokens"] == text_trace.tokens("text").tokens
    for layer, a in enumerate(out["attention"]):
        assert a.shape == (1, 12, len(out["tokens"]), len(out["tokens"]))
        assert torch.equal(a, text_trace.attention("text", layer)[:1].float())
    bertviz = pytest.importorskip("bertviz")
    html = bertviz.head_view(**out, html_action="return")
    assert "[CLS]" in html.data and "require" in html.data  # BertViz loads its scripts with require.js (a CDN)
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, 2]) as partial:
        minilm(**minilm.encode("a cat"))
    with pytest.raises(ValueError, match="every layer"):
        partial.to_bertviz()


def test_plot_draws_a_captured_head_over_the_image(dinov2):
    matplotlib.use("Agg")
    x = dinov2.encode(image="chelsea")
    with torch.no_grad(), attnscope.capture(dinov2, layers=[-1], queries="cls", keys="image") as trace:
        dinov2(**x)
    fig = trace.plot(layer=-1, head=3, query="cls", image="chelsea")
    ax = fig.axes[0]
    heat = ax.images[-1].get_array()
    rows, cols = trace.tokens("vision").grids[0]
    assert heat.shape == (rows, cols)
    rec = trace.record("vision", -1)
    expected = rec.probs[0, 3, 0].numpy().reshape(rows, cols)  # keys = the image patches, in grid order
    np.testing.assert_allclose(np.asarray(heat), expected, rtol=0, atol=0)
    assert len(fig.axes) == 2 and "attention probability" in fig.axes[1].get_ylabel()  # the colour bar
    with pytest.raises(KeyError, match="head 9"):
        trace.plot(head=9)
    with pytest.raises(KeyError, match="query"):
        trace.plot(query=5)  # only the CLS row was captured
    matplotlib.pyplot.close("all")
