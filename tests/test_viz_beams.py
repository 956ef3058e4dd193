"""The rows viewer under beam search: a batch row changes hypothesis between steps, so every row the page shows must be
one sequence's, labelled with the tokens it held at that step (`Trace.tokens(stream, b, step=s)`)."""
import base64
import json
import zlib

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.trace import Trace
from attnscope.viz import data, figures, lazy, runner
from attnscope.viz.html import html_of

PROMPT = "The capital of France is"
BEAMS = 3


def generate(smollm, **kwargs):
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", **kwargs) as t:
        smollm.generate(**smollm.encode(PROMPT), num_beams=BEAMS, num_return_sequences=BEAMS, max_new_tokens=4,
                        do_sample=False)
    return t


@pytest.fixture(scope="module")
def beams(smollm):
    t = generate(smollm)
    assert t.run().eras and t.run().steps >= 2  # beam search reordered the rows between steps
    return t


def page_doc(page: str) -> dict:
    return json.loads(page.split('id="attnscope-data">', 1)[1].split("</script>", 1)[0])


def page_rows(meta: dict) -> np.ndarray:
    """The rows a page embeds, as floats [queries, layers, heads, keys]."""
    n = (len(meta["queries"]), len(meta["layers"]), len(meta["heads"]), meta["length"])
    u8 = np.frombuffer(zlib.decompress(base64.b64decode(meta["rows"]["b64"])), np.uint8).reshape(n)
    scale = np.frombuffer(base64.b64decode(meta["rows"]["scale"]), np.float32).reshape(n[:3])
    return u8.astype(np.float32) / 255 * scale[..., None]


def holders(trace, step: int, labels: list[str]) -> list[int]:
    """The batch rows whose tokens at `step` are `labels` (as the page writes them)."""
    return [b for b in range(BEAMS)
            if [data.clean_token(x) for x in trace.tokens("text", b, step=step).tokens[:len(labels)]] == labels]


def check_rows(trace, rows: np.ndarray, queries: list[int], labels: list[str]) -> set[tuple[int, int]]:
    """Each step's row shown is the attention of a batch row that held the labels the page gives it at that step (to
    half a uint8 step); returns the (step, batch row) pairs it matched."""
    matched = set()
    for rec in trace.run().records[("text", 0)]:
        for qi, q in enumerate(rec.queries):
            assert q in queries, f"step {rec.step}'s row {q} is missing"
            shown = rows[queries.index(q), 0][:, : q + 1]
            who = holders(trace, rec.step, labels[: q + 1])
            assert who, f"at step {rec.step} no batch row held the tokens the page labels row {q} with"
            ref = rec.probs[:, :, qi].float().numpy()[:, :, : q + 1]  # [batch, heads, keys]
            same = [b for b in who if np.abs(shown - ref[b]).max() <= ref[b].max() / 255]
            assert same, f"step {rec.step}: the row shown is no row that held its labels ({who})"
            matched |= {(rec.step, b) for b in same}
    return matched


def test_each_page_row_is_its_sequence_and_labelled_with_its_tokens(beams):
    """html_of(t, row=r): the embedded rows are those of the sequence batch row r holds at the end, each read from the
    batch row that held that sequence at its step; the page's labels are that sequence's tokens; a note says so."""
    moved = 0
    for row in range(BEAMS):
        doc = page_doc(html_of(beams, row=row))
        (meta,) = doc["streams"]
        assert meta["tokens"] == [data.clean_token(x) for x in beams.tokens("text", row).tokens]
        matched = check_rows(beams, page_rows(meta), meta["queries"], meta["tokens"])
        elsewhere = {s for s, _ in matched} - {s for s, b in matched if b == row}  # steps batch row `row` can't show
        if elsewhere:
            moved += 1
            said = [n for n in doc["notes"] if "beam search" in n and f"batch row {row} holds at the end" in n]
            assert said and all(f"step {s} read from batch row" in said[0] for s in elsewhere), doc["notes"]
    assert moved  # this generation does switch hypotheses: reading row r at every step would mix sequences


def test_a_streamed_trace_reads_the_same_rows(smollm, tmp_path):
    """`serve --trace DIR` (viz/lazy.py) reads each step from the same batch row as the in-memory views."""
    t = generate(smollm, out=tmp_path / "trace")
    trace = Trace.load(tmp_path / "trace")
    assert lazy.is_streamed(trace.run())
    for row in range(BEAMS):
        (view,) = runner.from_trace(trace, row=row).views
        (ref,) = data.stream_views(trace, row=row)
        assert isinstance(view, lazy.LazyStreamView)
        whole = view.subset(view.queries)
        labels = [data.clean_token(x) for x in view.tokens.tokens]
        check_rows(trace, data.dequantize(whole.u8, whole.scale), view.queries, labels)
        assert view.queries == ref.queries and view.notes == ref.notes
        assert np.array_equal(whole.u8, ref.u8) and np.array_equal(whole.scale, ref.scale)
        doc = runner.from_trace(trace, row=row).document(embed_rows=False)
        assert doc["notes"] == view.notes


def test_the_served_app_shows_the_sequence_and_says_so(smollm, tmp_path):
    """`attnscope serve --trace DIR`: the run's document carries the note, and a query's block is the shown row."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    generate(smollm, out=tmp_path / "trace")
    app = create_app()
    rid = app.state.viewer.open_trace(tmp_path / "trace")
    client = TestClient(app, base_url="http://127.0.0.1")
    doc = client.get(f"/api/runs/{rid}").json()["doc"]
    (ref,) = data.stream_views(Trace.load(tmp_path / "trace"))
    assert doc["streams"][0]["tokens"] == [data.clean_token(x) for x in ref.tokens.tokens]
    assert ref.notes and all(n in doc["notes"] for n in ref.notes)
    q = ref.queries[-1]
    block = client.get(f"/api/runs/{rid}/text/query/{q}").json()
    u8 = np.frombuffer(base64.b64decode(block["b64"]), np.uint8)
    assert block["q"] == q and np.array_equal(u8, ref.block(q)[1].reshape(-1))


def test_a_step_no_row_held_is_left_out_and_said(beams):
    """A step where no batch row held the shown sequence's tokens (here: that step's labels edited in memory) is not
    drawn with another sequence's rows: it is left out, the other steps stay, and a note names it."""
    run = beams.run()
    step = 2
    last, maps = next((last, m) for last, m in run.eras if step <= last)
    assert last == step  # a reorder after every step: this era labels step 2 alone
    q = run.lengths[step] - 1
    saved = [m.tokens[q] for m in maps["text"]]
    try:
        for m in maps["text"]:
            m.tokens[q] = "<edited>"
        (view,) = data.stream_views(beams, row=0)
        steps = {rec.step: rec.queries[-1] for rec in run.records[("text", 0)]}
        assert view.queries == sorted(p for s, p in steps.items() if s != step)
        assert any(f"step {step} left out" in n for n in view.notes), view.notes
        assert any(f"step {step} left out" in n for n in page_doc(html_of(beams, row=0))["notes"])
    finally:
        for m, token in zip(maps["text"], saved):
            m.tokens[q] = token


def test_a_plotted_step_is_labelled_with_its_rows_tokens(beams):
    """`trace.plot(step=s)` (`figures.head_scores`): the row of batch row b at step s, labelled with the tokens b held
    then, not with the ones it holds at the end."""
    relabelled = 0
    for row in range(BEAMS):
        for rec in beams.run().records[("text", 0)]:
            scores, tmap, info = figures.head_scores(beams, "text", 0, head=2, query="last", step=rec.step, row=row)
            held = beams.tokens("text", row, step=rec.step)
            assert tmap.tokens == held.tokens and info["query"] == rec.queries[-1] == len(held) - 1
            np.testing.assert_array_equal(scores[: len(held)], rec.probs[row, rec.heads.index(2), -1].float().numpy())
            relabelled += held.tokens != beams.tokens("text", row).tokens[: len(held)]
    assert relabelled  # some step's row held other tokens than the row's final ones
