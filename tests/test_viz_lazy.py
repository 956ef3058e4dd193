"""The viewer on a streamed trace directory: the same view data as the in-memory path, read a layer or a row at a
time from disk when asked, never loaded whole; served by `attnscope serve --trace DIR`."""
import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture import stream, stream_read
from attnscope.capture.trace import Trace
from attnscope.viz import data, lazy, runner

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.viz.server import create_app  # noqa: E402


@pytest.fixture(scope="module", params=[None, [0, 2, "last"]], ids=["every-row", "some-rows"])
def streamed(request, smollm, tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy") / "trace"
    x = smollm.encode("Paris is the capital of France, and Rome")
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 7, 29], queries=request.param, out=out):
        smollm.hf.generate(**x, max_new_tokens=2, do_sample=False)
    return out


def test_lazy_views_equal_the_in_memory_views(streamed, tmp_path):
    eager_trace = Trace.load(Trace.load(streamed).save(tmp_path / "whole.safetensors"))  # the in-memory path
    assert not lazy.is_streamed(eager_trace.run())
    ref = data.stream_views(eager_trace)[0]
    trace = Trace.load(streamed)
    assert lazy.is_streamed(trace.run())
    view = runner.from_trace(trace).views[0]
    assert isinstance(view, lazy.LazyStreamView)
    assert (view.layers, view.heads, view.queries, view.length) == (ref.layers, ref.heads, ref.queries, ref.length)
    assert view.tokens.tokens == ref.tokens.tokens and view.tokens.roles == ref.tokens.roles
    assert view.sinks == ref.sinks and view.sink_rule == ref.sink_rule
    assert list(view.metrics) == list(ref.metrics)
    for name in ref.metrics:
        np.testing.assert_allclose(view.metrics[name], ref.metrics[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(view.received, ref.received, rtol=1e-5, atol=1e-6)
    assert np.abs(view.pattern.astype(int) - ref.pattern.astype(int)).max() <= 1
    for q in (ref.queries[0], ref.queries[-1], ref.queries[len(ref.queries) // 2]):
        got, want = view.block(q), ref.block(q)
        assert got[0] == want[0] and np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    for li in range(len(ref.layers)):
        assert all(np.array_equal(a, b) for a, b in zip(view.layer_block(li), ref.layer_block(li)))
    keep = ref.queries[::2]
    sub, ref_sub = view.subset(keep), ref.subset(keep)
    assert sub.queries == ref_sub.queries and np.array_equal(sub.u8, ref_sub.u8)
    assert all(r._probs is None for entries in trace.run().records.values() for r in entries)  # nothing kept


def test_rows_are_read_only_when_asked(streamed, monkeypatch):
    trace = Trace.load(streamed)
    view = runner.from_trace(trace).views[0]
    maps = []
    original = stream.ShardTensor._map
    monkeypatch.setattr(stream.ShardTensor, "_map", lambda self: maps.append(self.key) or original(self))
    hashed = []
    monkeypatch.setattr(stream_read, "tensor_checksum", lambda *a, **k: hashed.append(1) or {})
    view.layer_block(1)
    layer7 = {k for k in maps}
    assert layer7 and all("/text/7/" in k for k in layer7)  # one layer: only its records
    maps.clear()
    view.block(view.queries[-1])
    assert len(maps) == len({k for k in maps}) <= len(view.layers) * 3  # the records holding that row, once each
    assert hashed == []  # verified once during the summary pass, not on every read


def test_server_opens_a_trace_directory(streamed):
    app = create_app()
    rid = app.state.viewer.open_trace(streamed)
    client = TestClient(app, base_url="http://127.0.0.1")
    stream_doc = client.get(f"/api/runs/{rid}").json()["doc"]["streams"][0]
    assert stream_doc["layers"] == [0, 7, 29]
    q = stream_doc["queries"][-1]
    block = client.get(f"/api/runs/{rid}/text/query/{q}").json()
    assert block["q"] == q
    assert client.get(f"/api/runs/{rid}/text/layer/7").status_code == 200
    assert client.get(f"/api/runs/{rid}/export").status_code == 200


def test_a_streamed_trace_stays_lazy_after_a_read(streamed):
    """Reading one record (trace.attention) does not send the viewer down the path that holds every row in memory."""
    trace = Trace.load(streamed)
    trace.attention("text", 7)
    assert lazy.is_streamed(trace.run())
    assert isinstance(runner.from_trace(trace).views[0], lazy.LazyStreamView)
