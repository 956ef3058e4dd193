"""View data: quantized rows reproduce the trace, summaries are right, long sequences stay compact."""
import json

import numpy as np
import torch

import attnscope
from attnscope.viz import data, runner
from attnscope.viz.testing import synthetic_trace


def test_quantize_round_trip_within_half_a_step():
    rows = torch.softmax(torch.randn(5, 7, 300) * 3, -1).numpy()
    u8, scale = data.quantize(rows)
    back = data.dequantize(u8, scale)
    assert u8.dtype == np.uint8 and scale.shape == (5, 7)
    assert np.abs(back - rows).max() <= scale.max() / 255 / 2 + 1e-7
    assert (u8.max(-1) == 255).all()  # each row spans the full range


def test_minilm_views_match_the_trace(minilm):
    x = minilm.encode("The animal didn't cross the street because it was too tired.")
    with torch.no_grad(), attnscope.capture(minilm) as trace:
        minilm(**x)
    (view,) = data.stream_views(trace)
    n = x["input_ids"].shape[1]
    assert view.name == "text" and view.u8.shape == (n, 6, 12, n) and view.queries == list(range(n))
    for layer in (0, 5):
        ref = trace.attention("text", layer)[0].numpy()  # [heads, q, k]
        got = np.stack([view.rows(q)[layer] for q in range(n)], 1)  # [heads, q, k]
        assert np.abs(got - ref).max() <= ref.max() / 255
        # entropy in nats averaged over queries, per head (the head table's unit)
        ent = -(ref * np.log(np.clip(ref, 1e-30, None))).sum(-1)
        np.testing.assert_allclose(view.metrics[data.ENTROPY][layer], ent.mean(-1), atol=1e-3)
    assert view.pattern.shape == (6, 12, n, n)
    # a trace file has no hidden states: the one detector's attention-mass criterion, and the chip says so
    from attnscope.explain import sinks as sinklib

    assert view.sink_rule == sinklib.MASS_ONLY
    report = sinklib.from_tensors([], [trace.attention("text", layer)[0] for layer in range(6)], view.tokens, write=False)
    assert view.sinks == report.positions
    if view.sinks:
        share = np.stack([view.rows(q) for q in range(n)])[..., view.sinks].sum(-1).mean(0)
        np.testing.assert_allclose(view.metrics["sink mass"], share, atol=1e-2)


def test_dinov2_views_document_and_export_thinning(dinov2):
    r = runner.run(dinov2, image="chelsea")
    (view,) = r.views
    assert view.length == 257 and len(view.queries) == 257 and view.tokens.grids == [(16, 16)]
    assert 0 < view.metrics["image ratio"].min() <= view.metrics["image ratio"].max() <= 1
    assert r.images and r.images[0].size == (224, 224)  # the image as the model saw it
    keep = view.export_queries(1_500_000)
    per = 12 * 6 * 257
    assert len(keep) * per <= 1_500_000 and 0 in keep  # CLS always kept
    patches = [view.tokens.patch[q] for q in keep if view.tokens.patch[q]]
    assert len({p[1] for p in patches}) >= 6 and len({p[2] for p in patches}) >= 6  # spread over the grid
    doc = r.document(embed_rows=True, max_values=1_500_000)
    s = doc["streams"][0]
    assert s["queries"] == keep and s["rows"]["encoding"] == "u8-deflate"
    assert doc["images"][0].startswith("data:image/jpeg;base64,")
    json.dumps(doc, allow_nan=False)
    lazy = r.document(embed_rows=False)
    assert "rows" not in lazy["streams"][0] and len(json.dumps(lazy)) < 200_000


def test_nearest_stored_row():
    view = data.stream_views(synthetic_trace(layers=2, heads=2, length=100, queries=[0, 10, 20, 99]))[0]
    assert [view.nearest(q) for q in (0, 4, 6, 15, 16, 55, 60, 99)] == [0, 0, 10, 10, 20, 20, 99, 99]
    q, u8, scale = view.block(14)
    assert q == 10 and u8.shape == (2, 2, 100) and u8[:, :, 11:].max() == 0  # causal: nothing after the query


def test_query_plan_keeps_everything_small_and_strides_long(minilm):
    short = minilm.encode("a short sentence")
    assert data.query_plan(minilm, short) is None
    long = {"input_ids": torch.zeros(1, 2000, dtype=torch.long)}
    plan = data.query_plan(minilm, long, budget=8_000_000)
    ints = [p for p in plan if isinstance(p, int)]
    assert "last" in plan and "generated" in plan and "cls" in plan
    assert 6 * 12 * 2000 * len(ints) <= 8_000_000 * 1.1 and len(ints) >= 8


def test_two_thousand_tokens_stay_compact():
    trace = synthetic_trace(layers=30, heads=9, length=2000)
    (view,) = data.stream_views(trace)
    assert view.sinks == [0] and view.metrics["sink mass"].mean() > 0.1
    lazy = json.dumps(data.document([view], embed_rows=False))
    assert len(lazy) < 400_000, len(lazy)  # tokens, metrics, thumbnails: rows come per query
    q, u8, scale = view.block(1000)
    assert u8.nbytes == 30 * 9 * 2000  # one query's block: 540 kB, sent on demand


def test_both_view_builders_draw_self_attention_streams_and_refuse_cross_only():
    """data.stream_views and lazy.stream_views share one rule: cross-attention (not square) is left out, and a run
    holding only cross-attention is refused with the fix, by both."""
    import pytest

    from attnscope.viz import lazy

    trace = synthetic_trace(layers=2, heads=2, length=12, queries=[3, 11])
    run = trace.run()
    run.records[("cross", 0)] = run.records[("text", 0)]
    assert [v.name for v in data.stream_views(trace)] == ["text"]
    assert data.self_attention_streams(run) == ["text"]
    run.records = {k: v for k, v in run.records.items() if k[0] == "cross"}
    for build in (data.stream_views, lazy.stream_views):
        with pytest.raises(ValueError, match="only cross-attention.*capture the encoder or decoder stream"):
            build(trace)
