"""What the viewers' numbers are labelled as, on smollm2-135m and minilm: a padded batch's padding rows (the model
fills a padding query's row with a uniform or arbitrary row) are left out of the head metrics and thumbnails of the
rows viewer (a file and a streamed trace alike) and marked in the static figure; the lookback ratio (1 by definition
without a generated key) is not offered for a stream that has none, and is marked at a row that sees none; numbers in
the server's paths and bodies that are not whole numbers get the server's 400 {"error"} naming the valid range."""
import re

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.trace import Trace
from attnscope.viz import data, figures, lazy, summary_view

PROMPTS = ["Hi there", "The cat sat on the mat today"]  # row 0 is padded


@pytest.fixture(scope="module")
def padded(smollm, tmp_path_factory):
    """Two prompts of different length, left-padded (the model's default for a generating model), every query row of
    layers 0 and 29: as a trace in memory and as a streamed trace directory."""
    x = smollm.encode(PROMPTS)
    assert x["attention_mask"][0].tolist().count(0) > 0  # row 0 holds padding
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], queries=None) as trace:
        smollm(**x)
    out = tmp_path_factory.mktemp("padded") / "streamed"
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], queries=None, out=out):
        smollm(**x)
    return trace, Trace.load(out), x


def reference_metrics(trace, x) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) and self-attention per (layer, head), averaged over row 0's token rows only, straight from the
    records' probabilities (an independent reading of what the viewer should show)."""
    tokens = x["attention_mask"][0].bool().tolist()
    ent, own = [], []
    for layer in (0, 29):
        p = trace.record("text", layer).probs[0].double()  # [h, q, k]
        keep = [q for q, t in enumerate(tokens) if t]
        rows = p[:, keep]
        ent.append((-(rows * rows.clamp_min(1e-300).log()).sum(-1)).mean(-1).numpy())
        own.append(torch.stack([p[:, q, q] for q in keep], -1).mean(-1).numpy())
    return np.stack(ent), np.stack(own)


def test_padding_rows_are_left_out_of_the_head_metrics(padded):
    trace, streamed, x = padded
    pads = [q for q, t in enumerate(x["attention_mask"][0].tolist()) if not t]
    probs = trace.record("text", 0).probs[0]
    # what makes them no token's rows: the model spreads a padding query evenly over every key, future ones included
    assert torch.allclose(probs[:, pads], torch.full_like(probs[:, pads], 1 / probs.shape[-1]), atol=1e-6)
    ent, own = reference_metrics(trace, x)
    (view,) = data.stream_views(trace, row=0)
    (lazy_view,) = lazy.stream_views(streamed, row=0)
    assert [view.tokens.roles[q] for q in pads] == ["pad"] * len(pads) and view.queries == list(range(len(view.tokens)))
    for v in (view, lazy_view):
        np.testing.assert_allclose(v.metrics[data.ENTROPY], ent, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v.metrics["self"], own, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(view.pattern, lazy_view.pattern)
    (full,) = data.stream_views(trace, row=1)  # the longer prompt: no padding, every row counts
    p = trace.record("text", 0).probs[1].double()
    np.testing.assert_allclose(full.metrics[data.ENTROPY][0], (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean(-1),
                               rtol=1e-4, atol=1e-5)


def test_the_static_figure_says_a_padding_row_is_no_tokens_attention(padded, smollm):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, _, x = padded
    scores, tmap, info = figures.head_scores(trace, layer=0, head=2, query=0, row=0)
    assert info["pad"] and tmap.roles[0] == "pad"
    fig = figures.plot_trace(trace, layer=0, head=2, query=0, row=0)
    assert figures.PAD_ROW in fig.axes[0].get_title()
    plt.close(fig)
    fig = trace.plot(layer=0, head=2, query="last", row=0)
    assert figures.PAD_ROW not in fig.axes[0].get_title()
    plt.close(fig)

    right = smollm.encode(PROMPTS, padding_side="right")
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries=None) as t:
        smollm(**right)
    n = int(right["attention_mask"][0].sum())
    _, tmap, info = figures.head_scores(t, layer=0, query="last", row=0)  # "last": the last token's row, not padding's
    assert info["query"] == n - 1 and not info["pad"] and tmap.roles[n] == "pad"


def test_lookback_is_not_offered_without_generated_keys(smollm, minilm):
    """A single forward (smollm2) and an encoder (minilm): the lookback ratio is 1 at every row by definition, so the
    view leaves it out and says why; the other summaries stay."""
    for model, text in ((smollm, "The capital of France is"), (minilm, "Attention is all you need")):
        with torch.no_grad(), attnscope.capture(model, layers=[0], summaries="all") as s:
            model(**model.encode(text))
        (view,) = summary_view.stream_views(s)
        assert torch.all(s.lookback(view.name, 0) == 1)  # what the grid would have shown
        names = [m["name"] for m in view.meta()["metrics"]]
        assert summary_view.LOOKBACK not in names and data.ENTROPY in names
        assert view.meta()["notes"] == [summary_view.NO_GENERATED_STREAM]
        assert not view.block(*view.rows[-1]).undefined


def test_lookback_at_a_row_without_a_generated_key_is_marked(smollm):
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=3, do_sample=False)
    (view,) = summary_view.stream_views(s)
    assert view.metrics[0] == summary_view.LOOKBACK and view.meta()["notes"] == []
    for step, q in view.rows:
        block = view.block(step, q)
        generated = [p for p, r in enumerate(view.tokens.roles) if r == "generated" and p <= q]
        lookback = block.metrics[summary_view.LOOKBACK]
        for li, layer in enumerate(view.layers):  # the reader's numbers still travel, bit for bit
            np.testing.assert_array_equal(lookback[li], s.lookback("text", layer, step=step)[0, :, 0].numpy())
        if generated:
            assert block.undefined == {} and (lookback < 1).any()
        else:  # the prefill: no generated key, 1 everywhere by definition
            assert step == 0 and np.all(lookback == 1)
            assert block.undefined == {summary_view.LOOKBACK: summary_view.NO_GENERATED_ROW}
            assert block.to_json()["undefined"] == block.undefined


def test_numbers_in_paths_and_bodies_get_a_400_naming_the_range(smollm, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=3, do_sample=False)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29]) as t:
        smollm(**smollm.encode("The capital of France is"))
    app = create_app()

    @app.get("/api/probe/{n}")  # a route whose number FastAPI parses itself: the same {"error"} shape, not a 422
    def probe(n: int):
        return {"n": n}

    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    upload = lambda trace, name: client.post("/api/trace", files={  # noqa: E731
        "trace": (name, trace.save(tmp_path / name).read_bytes(), "application/octet-stream")}).json()
    rid = upload(s, "s.safetensors")["rid"]
    (meta,) = upload(s, "s2.safetensors")["doc"]["summaries"]
    last_step, last_q = meta["rows"][-1]
    assert client.get(f"/api/runs/{rid}/text/summary/{last_step}/{last_q}").status_code == 200
    for path, says in ((f"summary/1.5/{last_q}", "step must be a whole number in 0..2; got '1.5'"),
                       (f"summary/x/{last_q}", "step must be a whole number in 0..2; got 'x'"),
                       (f"summary/{last_step}/7.0", f"query must be a whole number (query rows at step 2: {last_q})"),
                       ("summary/9/abc",
                        "query must be a whole number (step 9 is not one of this stream's steps 0..2)")):
        r = client.get(f"/api/runs/{rid}/text/{path}")
        assert r.status_code == 400 and list(r.json()) == ["error"] and says in r.json()["error"], (path, r.json())
    rows = upload(t, "t.safetensors")
    rid, n = rows["rid"], rows["doc"]["streams"][0]["length"]
    for path, says in (("query/2.5", f"query must be a whole number in 0..{n - 1}; got '2.5'"),
                       ("query/%20", f"query must be a whole number in 0..{n - 1}"),
                       ("layer/last", "layer must be a whole number (captured layers: [0, 29]); got 'last'")):
        r = client.get(f"/api/runs/{rid}/text/{path}")
        assert r.status_code == 400 and list(r.json()) == ["error"] and says in r.json()["error"], (path, r.json())
    assert client.get(f"/api/runs/{rid}/text/query/3").status_code == 200
    assert client.get(f"/api/runs/{rid}/text/layer/29").status_code == 200
    for body, says in (({"method": "rollout", "stream": "text", "query": 2.5}, "query must be a whole number"),
                       ({"method": "rollout", "stream": "text", "query": True}, "query must be a whole number"),
                       ({"method": "rollout", "stream": "text", "query": 1, "target": "2.0"}, "target must be")):
        r = client.post(f"/api/runs/{rid}/explain", json=body)
        assert r.status_code == 400 and says in r.json()["error"], r.json()
    r = client.post("/api/run", data={"model": "smollm2-135m", "text": "Hi", "max_new_tokens": "2.5"})
    assert r.status_code == 400 and "max_new_tokens must be a whole number between 0 and 64" in r.json()["error"]
    r = client.get("/api/probe/1.5")
    assert r.status_code == 400 and list(r.json()) == ["error"] and "n:" in r.json()["error"]


def test_a_number_with_two_minus_signs_is_a_400_not_a_500(smollm, tmp_path):
    """"--2" passed the digits check once its minus signs were stripped, then int() raised: a 500 "internal error"
    on every numeric route (and the knockout panel's window/stride said Python's own int() message)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz import knockout
    from attnscope.viz.server import ApiError, create_app, whole_number

    for bad in ("--2", "-", "--", "2-", "-+2", "- 2"):
        with pytest.raises(ApiError) as err:
            whole_number(bad, "query", "in 0..4")
        assert err.value.status == 400 and f"query must be a whole number in 0..4; got {bad!r}" in err.value.message
        with pytest.raises(ValueError, match=f"window must be a whole number; got {re.escape(repr(bad))}"):
            knockout._int({"window": bad}, "window", 4)
    assert whole_number("-3", "q", "") == -3 and whole_number(" 2", "q", "") == 2
    assert knockout._int({"w": "-3"}, "w", 4) == -3
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=2, do_sample=False)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29]) as t:
        smollm(**smollm.encode("The capital of France is"))
    client = TestClient(create_app(), base_url="http://127.0.0.1", raise_server_exceptions=False)
    upload = lambda trace, name: client.post("/api/trace", files={  # noqa: E731
        "trace": (name, trace.save(tmp_path / name).read_bytes(), "application/octet-stream")}).json()["rid"]
    rows, sums = upload(t, "t.safetensors"), upload(s, "s.safetensors")
    for path in (f"{rows}/text/query/--2", f"{rows}/text/layer/--2", f"{sums}/text/summary/--2/4",
                 f"{sums}/text/summary/0/--2"):
        r = client.get(f"/api/runs/{path}")
        assert r.status_code == 400 and "must be a whole number" in r.json()["error"], (path, r.json())
    r = client.post(f"/api/runs/{rows}/explain", json={"method": "rollout", "stream": "text", "query": "--2"})
    assert r.status_code == 400 and "query must be a whole number" in r.json()["error"], r.json()
    r = client.post("/api/run", data={"model": "smollm2-135m", "text": "Hi", "max_new_tokens": "--2"})
    assert r.status_code == 400 and "max_new_tokens must be a whole number" in r.json()["error"], r.json()


def test_a_negative_explain_target_is_refused_naming_the_range(smollm):
    """A negative target was read from the end of a different sequence (the prompt, not the stream the viewer shows:
    -1 explained the prompt's last token, not the run's last), or failed with Python's "list index out of range"."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    app = create_app()
    app.state.viewer.slot("smollm2-135m").model = smollm
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    run = client.post("/api/run", data={"model": "smollm2-135m", "text": "The capital of France is",
                                        "max_new_tokens": "2"}).json()
    rid, n = run["rid"], run["doc"]["streams"][0]["length"]
    for body, says in (({"query": 0, "target": -1}, "target -1 is out of range 0.."),
                       ({"query": 0, "target": -7}, "target -7 is out of range 0.."),
                       ({"query": -1}, f"query -1 is out of range 0..{n - 1}"),
                       ({"query": n}, f"query {n} is out of range 0..{n - 1}")):
        r = client.post(f"/api/runs/{rid}/explain", json={"method": "gradattn", "stream": "text"} | body)
        assert r.status_code == 400 and says in r.json()["error"], (body, r.json())


def test_a_thinned_export_keeps_the_last_tokens_row_before_padding_rows(smollm):
    """A page that cannot hold every row (`export_queries`, `export_rows`) kept the last row, padding in a
    right-padded row, and spread the rest over padding rows too: the last token's row was left out, so the page opened
    on another token's row. It now keeps each step's last token row and spends its room on tokens' rows first."""
    x = smollm.encode(["one two three four five six seven", " ".join(["alpha beta gamma delta"] * 8)],
                      padding_side="right")
    n, width = int(x["attention_mask"][0].sum()), x["input_ids"].shape[1]
    assert width > 3 * n
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries=None) as trace:
        smollm(**x)
    (view,) = data.stream_views(trace, row=0)
    per = len(view.layers) * len(view.heads) * view.length
    for room in (4, n, n + 3):
        kept = view.export_queries(per * room)
        assert n - 1 in kept, (room, kept)
        tokens = [q for q in kept if view.tokens.roles[q] != "pad"]
        assert len(tokens) == min(len(kept), n), (room, kept)  # padding rows only where every token's row fits
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries=None, summaries="all") as s:
        smollm(**x)
    (sv,) = summary_view.stream_views(s, row=0)
    for room in (1, 4, n, n + 3):
        kept = sv.export_rows(sv.values_per_row() * room)
        assert (0, n - 1) in kept and len(kept) == room, (room, kept)
        tokens = [q for _, q in kept if sv.tokens.roles[q] != "pad"]
        assert len(tokens) == min(room, n), (room, kept)


def test_lookback_not_offered_on_a_generation_says_no_row_sees_a_generated_key(smollm):
    """A generate run whose query selection holds only prompt rows: the stream has generated keys, so the note may not
    say it has none ("a single forward, an encoder or a vision tower") beside a "mass on generated" grid."""
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries=[0, 1, 2], summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=3, do_sample=False)
    (view,) = summary_view.stream_views(s)
    assert "generated" in view.tokens.roles and summary_view.MASS + "generated" in view.metrics
    assert summary_view.LOOKBACK not in view.metrics and view.notes == [summary_view.NO_GENERATED_ROWS]


def test_a_batch_row_out_of_range_is_named_not_a_bare_index_error(padded, tmp_path, capsys):
    """`attnscope view t.safetensors --row 5`, `trace.to_html(row=5)` and `trace.plot(row=5)` (a parameter this change
    added) said "list index out of range"; the summaries view already named the rows there are."""
    import matplotlib

    matplotlib.use("Agg")
    from attnscope.cli import main

    trace, streamed, _ = padded
    says = re.escape("batch row 5 is out of range: the trace holds 2 batch rows (0..1)")
    for call in (lambda: data.stream_views(trace, row=5), lambda: lazy.stream_views(streamed, row=5),
                 lambda: trace.to_html(row=5), lambda: trace.plot(layer=0, query="last", row=5),
                 lambda: data.stream_views(trace, row=-1)):
        with pytest.raises(IndexError, match="batch row -?[0-9]+ is out of range: the trace holds 2 batch rows"):
            call()
    with pytest.raises(IndexError, match=says):
        figures.head_scores(trace, layer=0, query="last", row=5)
    path = trace.save(tmp_path / "t.safetensors")
    assert main(["view", str(path), "--row", "5", "--out", str(tmp_path / "t.html")]) == 2
    assert "batch row 5 is out of range: the trace holds 2 batch rows (0..1)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["smollm", "minilm"])
def test_a_click_on_a_padding_token_explains_the_default_target_and_says_why(name, request):
    """A padding position is no token of the input: a click there gets the default target with a note (an encoder's
    click explained the padding position's output embedding as if it were a word's)."""
    from attnscope.viz import clicks, runner

    model = request.getfixturevalue(name)
    side = "left" if name == "smollm" else "right"
    x = model.encode(PROMPTS, padding_side=side)
    with torch.no_grad(), attnscope.capture(model, layers=[0], queries=None) as trace:
        model(**x)
    result = runner.from_trace(trace, row=0)
    result.inputs = x
    stream = result.views[0].name
    mask = x["attention_mask"][0].tolist()
    pad, word = mask.index(0), max(i for i, m in enumerate(mask) if m)
    inputs, target, note = clicks.target_for(model, result, stream, pad)
    assert target is None and "padding" in note
    inputs, target, note = clicks.target_for(model, result, stream, word)
    assert target is not None and note is None
