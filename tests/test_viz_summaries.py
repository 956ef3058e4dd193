"""The viewer on a summaries file (`capture(..., summaries=...)`): every number the page receives (the exported page's
embedded blocks, the server's answers) equals what the `Summaries` readers return, bit for bit, on real captures of
smollm2-135m (a generation, every layer) and scene-vlm (the image ratio of both streams); the CLI (`attnscope view`),
the served app's upload, `serve --trace` and the HTML export open a summaries file, and what cannot be shown is said."""
import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope
from attnscope.capture.trace import Trace
from attnscope.cli import main
from attnscope.core.tokens import TokenMap
from attnscope.viz import data, runner, summary_view
from attnscope.viz.html import html_of
from attnscope.viz.testing import assert_self_contained

PROMPT = "The capital of France is"


def decode(b64: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype).reshape(shape)


def page_doc(page: str) -> dict:
    return json.loads(page.split('id="attnscope-data">', 1)[1].split("</script>", 1)[0])


def reader(s, metric: str, stream: str, layer: int, step: int) -> torch.Tensor:
    """[B, heads, rows] of `metric` from the public `Summaries` readers, named as the viewer names them."""
    if metric == summary_view.IMAGE_RATIO:
        return s.image_ratio(stream, layer, step=step)
    if metric == summary_view.LOOKBACK:
        return s.lookback(stream, layer, step=step)
    if metric == data.ENTROPY:
        return s.entropy(stream, layer, step=step)
    if metric == summary_view.TOP_WEIGHT:
        return s.topk(stream, layer, step=step)[1][..., 0]
    assert metric.startswith(summary_view.MASS)
    return s.role_mass(stream, layer, metric.removeprefix(summary_view.MASS), step=step)


def assert_block_is_the_readers(s, meta: dict, block: dict, stream: str) -> None:
    """Every grid value and top-k key of one (step, query) block equals the readers' number at that layer, head and
    query row; a (layer, head) the capture left out is NaN / -1."""
    step, q, k = block["step"], block["q"], block["k"]
    shape = (len(meta["layers"]), len(meta["heads"]))
    grids = {m: decode(b, np.float32, shape) for m, b in block["metrics"].items()}
    assert sorted(grids) == sorted(m["name"] for m in meta["metrics"])
    index = decode(block["topk_index"], np.int32, (*shape, k))
    value = decode(block["topk_value"], np.float32, (*shape, k))
    for li, layer in enumerate(meta["layers"]):
        rec = s.record(stream, layer, step=step)
        qi = rec.queries.index(q)
        for hi, head in enumerate(meta["heads"]):
            if head not in rec.heads:
                assert all(np.isnan(g[li, hi]) for g in grids.values()) and (index[li, hi] == -1).all()
                continue
            h = rec.heads.index(head)
            for name, grid in grids.items():
                assert grid[li, hi] == reader(s, name, stream, layer, step)[0, h, qi].item(), (name, layer, head)
            keys, probs = s.topk(stream, layer, step=step)
            n = keys.shape[-1]
            assert index[li, hi, :n].tolist() == keys[0, h, qi].tolist()
            assert np.array_equal(value[li, hi, :n], probs[0, h, qi].numpy())
            assert (index[li, hi, n:] == -1).all()


@pytest.fixture(scope="module")
def generation(smollm, tmp_path_factory):
    """smollm2-135m generating 4 tokens, every layer's last query row summarised at each step, and its file."""
    with torch.no_grad(), attnscope.capture(smollm, queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode(PROMPT), max_new_tokens=4, do_sample=False)
    return s, s.save(tmp_path_factory.mktemp("sumview") / "gen.safetensors")


def test_smollm2_generation_page_holds_the_readers_numbers(generation):
    s, path = generation
    loaded = Trace.load(path)
    doc = page_doc(html_of(loaded))
    assert doc["streams"] == [] and len(doc["summaries"]) == 1
    meta = doc["summaries"][0]
    assert meta["name"] == "text" and meta["layers"] == list(range(30)) and meta["heads"] == list(range(9))
    roles = s.tokens("text").roles
    assert roles.count("generated") == 3  # the 4th generated token was never fed back: steps 0..3
    prompt = len(roles) - 3
    assert meta["rows"] == [[step, prompt - 1 + step] for step in range(4)]  # each step's last query row
    assert [m["name"] for m in meta["metrics"]][:2] == [summary_view.LOOKBACK, data.ENTROPY]
    assert {m["name"] for m in meta["metrics"]} >= {summary_view.MASS + "text", summary_view.MASS + "generated"}
    assert summary_view.IMAGE_RATIO not in {m["name"] for m in meta["metrics"]}  # a text model: no image keys
    assert meta["k"] == 5 and len(meta["blocks"]) == 4
    for block in meta["blocks"].values():
        assert_block_is_the_readers(loaded, meta, block, "text")
        masses = sum(decode(block["metrics"][m["name"]], np.float32, (30, 9)) for m in meta["metrics"]
                     if m["name"].startswith(summary_view.MASS))
        np.testing.assert_allclose(masses, 1, atol=1e-5)  # every key has a role: the masses of a row sum to 1
    assert meta["tokens"] == [data.clean_token(t) for t in s.tokens("text").tokens]  # top-k keys' labels
    assert_self_contained(html_of(loaded))


def test_a_prefill_of_every_row_and_some_heads_and_a_thinned_page(smollm):
    """queries=None: one step with a row per position; heads=[1, 4]: the grids have those two columns; a small budget
    embeds each step's last row first, says how many rows it holds, and every block still equals the readers."""
    x = smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], heads=[1, 4], summaries=["entropy", "topk"],
                                            topk=3) as s:
        smollm(**x)
    (view,) = summary_view.stream_views(s)
    n = x["input_ids"].shape[1]
    assert view.layers == [0, 29] and view.heads == [1, 4] and view.rows == [(0, q) for q in range(n)]
    assert view.metrics == [data.ENTROPY, summary_view.TOP_WEIGHT] and view.k == 3
    metas, notes = summary_view.metas([view], embed=False)
    assert "blocks" not in metas[0] and metas[0]["rows"] == [[0, q] for q in range(n)] and notes == []
    assert_block_is_the_readers(s, metas[0], view.block(0, 2).to_json(), "text")
    first = view.block(0, 0)  # causal: the first position attends to itself only, its other keys get 0
    assert (first.index[..., 0] == 0).all() and np.allclose(first.value[..., 0], 1, atol=1e-6)
    assert (first.value[..., 1:] == 0).all() and (first.metrics[data.ENTROPY] < 1e-5).all()
    budget = view.values_per_row() * 2
    metas, notes = summary_view.metas([view], embed=True, max_values=budget)
    rows = metas[0]["rows"]
    assert len(rows) == 2 and [0, n - 1] in rows and sorted(metas[0]["blocks"]) == sorted(f"0:{q}" for _, q in rows)
    assert notes == [f"text: this page embeds 2 of {n} (step, query) rows (each step's last row first); "
                     "`attnscope serve --trace FILE` shows them all"]
    for block in metas[0]["blocks"].values():
        assert_block_is_the_readers(s, metas[0], block, "text")
    with pytest.raises(KeyError, match="no query row 99 at step 0"):
        view.block(0, 99)
    s.run().records[("text", 29)][0].queries = [0, 1]  # layer 29 without row 2 (e.g. a selection that differs)
    gap = view.block(0, 2)
    assert np.isnan(gap.metrics[data.ENTROPY][1]).all() and (gap.index[1] == -1).all()
    assert np.isfinite(gap.metrics[data.ENTROPY][0]).all() and (gap.index[0] >= 0).all()


def test_scene_vlm_image_ratio_on_both_streams(scene_vlm):
    """The image ratio the page holds is `Summaries.image_ratio` at every layer, head and step, on the language
    stream (64 image keys among the prompt) and the vision tower; it is the mass on image keys over the row's mass."""
    from attnscope.scenes import SceneWorld, question

    scene = SceneWorld(seed=0).scene("test", 3)
    x = scene_vlm.encode(scene_vlm.prompt(question(scene.classes[0])), scene.image)
    with torch.no_grad(), attnscope.capture(scene_vlm, streams=["vision", "language"], queries="last",
                                            layers={"vision": [11], "language": [0, 29]}, summaries="all") as s:
        scene_vlm.generate(**x, max_new_tokens=2, do_sample=False)
    result = runner.from_trace(s)
    doc = result.document(embed_rows=True)
    metas = {m["name"]: m for m in doc["summaries"]}
    assert sorted(metas) == ["language", "vision"]
    for stream, meta in metas.items():
        assert meta["metrics"][0] == {"name": summary_view.IMAGE_RATIO, "range": [0, 1]}
        for block in meta["blocks"].values():
            assert_block_is_the_readers(s, meta, block, stream)
    lang = metas["language"]
    assert [step for step, _ in lang["rows"]] == [0, 1]
    for block in lang["blocks"].values():
        ratio = decode(block["metrics"][summary_view.IMAGE_RATIO], np.float32, (2, 9))
        masses = {m: decode(b, np.float32, (2, 9)) for m, b in block["metrics"].items() if m.startswith("mass on ")}
        np.testing.assert_allclose(ratio, masses["mass on image"] / sum(masses.values()), atol=1e-6)
        assert 0 < ratio.min() and ratio.max() < 1
    assert sum(r == "image" for r in s.tokens("language").roles) == 64


def test_every_surface_opens_a_summaries_file(generation, tmp_path, capsys):
    """The upload answers the summaries view and serves each block; `serve --trace FILE` opens it; the export and
    `attnscope view` write a self-contained page of it; what is not there is a clear error."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    s, path = generation
    app = create_app()
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.post("/api/trace", files={"trace": ("gen.safetensors", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    rid, doc = r.json()["rid"], r.json()["doc"]
    (meta,) = doc["summaries"]
    assert "blocks" not in meta and doc["streams"] == []
    for step, q in meta["rows"]:
        got = client.get(f"/api/runs/{rid}/text/summary/{step}/{q}")
        assert got.status_code == 200
        assert_block_is_the_readers(s, meta, got.json(), "text")
    missing = client.get(f"/api/runs/{rid}/text/summary/1/0")
    assert missing.status_code == 404 and "no query row 0 at step 1" in missing.json()["error"]
    assert "no summaries of stream 'vision'" in client.get(f"/api/runs/{rid}/vision/summary/0/0").json()["error"]
    rows = client.get(f"/api/runs/{rid}/text/query/0")  # the rows viewer's endpoints: no rows here, said so
    assert rows.status_code == 404 and "no stream 'text'" in rows.json()["error"]
    exported = client.get(f"/api/runs/{rid}/export").text
    assert_self_contained(exported) and len(page_doc(exported)["summaries"][0]["blocks"]) == 4
    pinned = app.state.viewer.open_trace(path)  # attnscope serve --trace FILE
    assert app.state.viewer.entry(pinned).result.summaries[0].rows == [tuple(r) for r in meta["rows"]]

    out = tmp_path / "gen.html"
    assert main(["view", str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    assert_self_contained(page) and page_doc(page)["summaries"][0]["rows"] == meta["rows"]
    assert main(["view", str(path), "--out", str(path)]) == 2
    assert main(["view", str(tmp_path / "nothing.safetensors")]) == 2
    assert main(["view", str(path), "--row", "3", "--out", str(out)]) == 2  # batch of 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "is the trace itself" in err[0] and "batch row 3 is out of range" in err[2]


def test_a_file_of_several_runs_shows_the_one_asked_for_and_says_so(smollm):
    short, long = smollm.encode("Hi"), smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", summaries="entropy") as s:
        smollm(**short)
        smollm(**long)
    for run, x in ((0, short), (-1, long)):
        doc = page_doc(html_of(s, run=run))
        assert doc["summaries"][0]["rows"] == [[0, x["input_ids"].shape[1] - 1]]
        assert doc["notes"] == [f"this file holds 2 runs; shown: run {run % 2} (the viewer shows one run: "
                                "attnscope view FILE --run i for another)"]
        block = doc["summaries"][0]["blocks"][f"0:{x['input_ids'].shape[1] - 1}"]
        grid = decode(block["metrics"][data.ENTROPY], np.float32, (1, 9))
        assert grid[0, 4] == s.entropy("text", 0, run=run)[0, 4, 0]


def test_attnscope_view_writes_a_trace_file_of_rows_too(smollm, tmp_path, capsys):
    with torch.no_grad(), attnscope.capture(smollm, layers=[0]) as trace:
        smollm(**smollm.encode(PROMPT))
    path = trace.save(tmp_path / "rows.safetensors")
    assert main(["view", str(path), "--out", str(tmp_path / "rows.html")]) == 0
    doc = page_doc((tmp_path / "rows.html").read_text())
    assert [s["name"] for s in doc["streams"]] == ["text"] and "summaries" not in doc


def test_what_the_summaries_view_cannot_draw_is_said(generation):
    from attnscope.capture.summaries import Summaries
    from attnscope.capture.trace import Run

    with pytest.raises(ValueError, match="hold no attention call"):
        runner.from_trace(Summaries(runs=[Run()]))
    s, _ = generation
    with pytest.raises(TypeError, match="no rows: draw it with viz.summary_view"):
        data.stream_views(s)
    with pytest.raises(ValueError, match="draws no explanation maps"):
        html_of(s, explanations=[object()])
    with pytest.raises(ValueError, match="draws no image overlay"):
        html_of(s, image=Image.new("RGB", (8, 8)))


def tokens_at(meta: dict, step: int) -> list[str]:
    """The tokens the page labels `step` with (frontend/src/summaries.ts `tokensAt`)."""
    return next((meta["tokens"][:first] + tail for last, first, tail in meta["token_eras"] if step <= last),
                meta["tokens"])


def test_beam_search_labels_each_step_with_the_tokens_its_row_held(smollm):
    """Under beam search batch row b changes hypothesis between steps: the page labels each step's query row and top-k
    keys with the tokens that row held at that step (`Trace.tokens(..., step=)`), not the last hypothesis's."""
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode(PROMPT), max_new_tokens=4, do_sample=False, num_beams=3,
                        num_return_sequences=3)
    assert s.run().eras
    relabelled = 0
    for row in range(3):
        doc = page_doc(html_of(s, row=row))
        meta = doc["summaries"][0]
        for step, q in meta["rows"]:
            held = [data.clean_token(t) for t in s.tokens("text", row, step=step).tokens]
            assert tokens_at(meta, step)[:len(held)] == held, (row, step)
            relabelled += tokens_at(meta, step)[q] != meta["tokens"][q]
            keys, _ = s.topk("text", 0, step=step)
            assert all(k < len(held) for k in keys[row, :, 0].flatten().tolist())  # every top key has its label
        assert any("beam search" in note and "held at that step" in note for note in doc["notes"])
        prompt = s.tokens("text").roles.count("text")
        assert all(first >= prompt for _, first, _ in meta["token_eras"])  # the prompt is not repeated per step
    assert relabelled  # this generation does switch hypotheses: the final tokens would mislabel some step


def test_a_run_out_of_range_is_one_clear_error(generation, tmp_path, capsys):
    _, path = generation
    assert main(["view", str(path), "--run", "3", "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: run 3 is out of range: the trace holds 1 run (0, or -1 for the last)"], err


@pytest.mark.parametrize("room", [1, 2, 3, 4, 9, 12, 13, 14])
def test_an_exported_page_embeds_as_many_rows_as_fit_and_no_more(room):
    """The budget holds `room` rows: the page embeds exactly that many (at most 10^6 numbers, as the README says), the
    last step's last row among them, spread evenly; each step's last row goes before other rows."""
    view = summary_view.SummaryStreamView.__new__(summary_view.SummaryStreamView)
    view.layers, view.heads, view.metrics, view.k = [0], [0], [data.ENTROPY], 0
    view.rows = [(0, q) for q in range(5)] + [(step, 4 + step) for step in range(1, 10)]  # a prefill of 5, 9 steps
    view.tokens = TokenMap(["text"] * 5 + ["generated"] * 9, [str(i) for i in range(14)])  # no padding
    rows = view.export_rows(room * view.values_per_row())
    assert len(rows) == min(room, 14) and rows == sorted(set(rows)) and (9, 13) in rows
    last = [(0, 4)] + [(step, 4 + step) for step in range(1, 10)]
    assert set(rows) >= set(last) if room >= len(last) else set(rows) <= set(last)
    if 2 <= room <= len(last):  # even: the gaps between the steps it keeps differ by one at most
        gaps = {b[0] - a[0] for a, b in zip(rows, rows[1:])}
        assert max(gaps) - min(gaps) <= 1 and rows[0] == (0, 4)


def test_summaries_of_top_k_alone_have_a_grid_whose_heads_open_their_keys(smollm):
    """summaries="topk" only: the grid shows each head's top key weight (not a grid of "not captured" dashes with no
    head to click for the keys that were captured)."""
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 5], queries="last", summaries="topk", topk=3) as s:
        smollm.generate(**smollm.encode(PROMPT), max_new_tokens=2, do_sample=False)
    meta = page_doc(html_of(s))["summaries"][0]
    assert meta["metrics"] == [{"name": summary_view.TOP_WEIGHT, "range": [0, 1]}] and meta["k"] == 3
    for block in meta["blocks"].values():
        assert_block_is_the_readers(s, meta, block, "text")
        top = decode(block["metrics"][summary_view.TOP_WEIGHT], np.float32, (2, 9))
        assert np.isfinite(top).all() and (top == decode(block["topk_value"], np.float32, (2, 9, 3))[..., 0]).all()


def test_attnscope_view_of_an_explanation_file_names_what_reads_it(smollm, tmp_path, capsys):
    e = attnscope.explain(smollm, smollm.encode(PROMPT))
    path = tmp_path / "e.safetensors"
    e.save(path)
    assert main(["view", str(path), "--out", str(tmp_path / "e.html")]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert "is an explanation file (attnscope.explanation/1), not a trace or summaries" in err, err
    assert "attnscope.Explanation.load" in err
