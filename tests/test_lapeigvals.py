"""LapEigvals (evaluate/lapeigvals.py): the Laplacian of a causal attention map has its diagonal as eigenvalues
(checked against torch.linalg.eigvals), a span's features see nothing generated after it and follow the heads and
the scale of the maps, the probe recovers a planted signal, the graph captured on the real scene-vlm equals the
model's eager attention and the same block of full captured rows, and bench/detectors.py --small rewrites only its
own section of hallucination.md."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from attnscope.evaluate.lapeigvals import (compare_detectors, generate_graph, graph_from_run, laplacian,
                                           laplacian_eigvals, prefix_eigvals, span_features, top_k)
from attnscope.evaluate.lookback import generate_traced, object_spans
from attnscope.scenes import SceneWorld


def causal_maps(*shape: int, n: int, seed: int = 0) -> torch.Tensor:
    """Row-stochastic causal attention maps [*shape, n, n] in float64."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, n, n, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, -float("inf")).softmax(-1)


def test_laplacian_eigenvalues_are_its_diagonal():
    adj = causal_maps(3, 4, n=7)
    lap = laplacian(adj)
    assert torch.equal(lap.triu(1), torch.zeros_like(lap))  # lower triangular, so eigenvalues = diagonal
    ref = torch.linalg.eigvals(lap)
    assert ref.imag.abs().max() < 1e-10
    ours = laplacian_eigvals(adj)
    torch.testing.assert_close(ours.sort(-1).values, ref.real.sort(-1).values, rtol=0, atol=1e-10)
    # by hand on 3 nodes: d_i = column sum / (3 - i), lambda_i = d_i - A[i, i]
    a = torch.tensor([[1.0, 0, 0], [0.25, 0.75, 0], [0.5, 0.2, 0.3]], dtype=torch.float64)
    expected = [(1 + 0.25 + 0.5) / 3 - 1, (0.75 + 0.2) / 2 - 0.75, 0.3 / 1 - 0.3]
    torch.testing.assert_close(laplacian_eigvals(a), torch.tensor(expected, dtype=torch.float64))


def test_non_causal_maps_are_refused():
    adj = torch.softmax(torch.randn(5, 5, dtype=torch.float64), -1)  # bidirectional: the diagonal is not the spectrum
    eig = torch.linalg.eigvals(laplacian(adj)).real.sort().values
    assert not torch.allclose(eig, torch.diagonal(laplacian(adj)).sort().values)
    with pytest.raises(ValueError, match="not causal"):
        laplacian_eigvals(adj)
    with pytest.raises(ValueError, match="square"):
        laplacian_eigvals(torch.zeros(2, 3))


def test_prefix_eigenvalues_equal_those_of_the_truncated_graphs():
    adj = causal_maps(2, n=9, seed=1)
    lam = prefix_eigvals(adj)
    for e in range(9):
        torch.testing.assert_close(lam[:, e, :e + 1], laplacian_eigvals(adj[:, :e + 1, :e + 1]), rtol=0, atol=1e-12)
        assert torch.isnan(lam[:, e, e + 1:]).all()


def test_top_k_sorts_and_pads_with_isolated_nodes():
    vals = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    assert top_k(vals, 2).tolist() == [[0.3, 0.1]]
    assert top_k(vals, 5).tolist() == [[0.3, 0.1, 0.0, 0.0, -0.2]]
    with pytest.raises(ValueError, match="at least 1"):
        top_k(vals, 0)


def test_span_features_see_nothing_after_the_span():
    attn = causal_maps(3, 2, n=12, seed=2).float().numpy()  # [L, H, T, T]
    spans = [{"steps": [2, 3]}, {"steps": [8]}]
    feats = span_features(attn, spans, k=5)
    assert feats.shape == (2, 3 * 2 * 5) and np.isfinite(feats).all()
    changed = attn.copy()
    changed[..., 4:, :] = causal_maps(3, 2, n=12, seed=3).float().numpy()[..., 4:, :]  # rows after the first span
    np.testing.assert_array_equal(span_features(changed, spans[:1], k=5), feats[:1])
    np.testing.assert_array_equal(span_features(attn[..., :9, :9], spans, k=5), feats)  # a shorter caption
    with pytest.raises(ValueError, match="graph has 9 nodes"):
        span_features(attn[..., :9, :9], [{"steps": [9]}])


def test_span_features_follow_head_order_and_scale():
    attn = causal_maps(2, 3, n=10, seed=4).float().numpy()
    spans = [{"steps": [6, 7]}]
    feats = span_features(attn, spans, k=4).reshape(2, 3, 4)
    perm = [2, 0, 1]
    np.testing.assert_array_equal(span_features(attn[:, perm], spans, k=4).reshape(2, 3, 4), feats[:, perm])
    # the Laplacian is linear in A, and scaling by c > 0 keeps the order of eigenvalues
    np.testing.assert_allclose(span_features(attn * 0.5, spans, k=4).reshape(2, 3, 4), feats * 0.5, rtol=1e-5, atol=1e-7)


def test_probe_recovers_a_planted_signal_and_controls_stay_apart():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 60))
    y = x[:, 7] + 0.3 * rng.normal(size=400) > 0.5
    groups = np.repeat(np.arange(100), 4)  # 4 spans per caption
    train = groups < 50
    out = compare_detectors({"planted": x, "noise": rng.normal(size=(400, 60))}, y, groups, train,
                            single={"best": "planted"}, pairs=[("planted", "noise")], boot=100)
    a = out["auroc"]
    assert a["planted"]["value"] > 0.9 and a["best"]["value"] > 0.9
    assert out["single"]["best"]["column"] == 7
    assert a["planted-noise"]["low"] > 0.2  # the paired interval sees the difference
    assert a["noise"]["value"] < 0.75 and a["planted_shuffled"]["value"] < 0.75
    assert out["groups_test"] == 50 and out["n_test"] == 200
    with pytest.raises(ValueError, match="training spans must include both"):
        compare_detectors({"planted": x}, np.where(train, False, y), groups, train, boot=10)


def test_graph_from_run_places_rows_and_refuses_missing_ones():
    from types import SimpleNamespace

    from attnscope.capture import Record

    P, T, H = 4, 3, 2  # prompt of 4 tokens, 3 generated: generating positions 3, 4, 5
    full = causal_maps(H, n=P + T - 1, seed=5).float()
    prefill = Record(full[:, :P, :P].unsqueeze(0), [0, 1], list(range(P)), None, 0)
    steps = [Record(full[:, P - 1 + t, :P + t].reshape(1, H, 1, -1), [0, 1], [P - 1 + t], None, t) for t in (1, 2)]
    run = SimpleNamespace(records={("language", 0): [prefill, *steps]})
    np.testing.assert_array_equal(graph_from_run(run, P, T, "all")[0], full.numpy())
    np.testing.assert_array_equal(graph_from_run(run, P, T)[0], full[:, P - 1:, P - 1:].numpy())
    last_only = Record(full[:, P - 1, :P].reshape(1, H, 1, -1), [0, 1], [P - 1], None, 0)
    run = SimpleNamespace(records={("language", 0): [last_only, *steps]})
    np.testing.assert_array_equal(graph_from_run(run, P, T)[0], full[:, P - 1:, P - 1:].numpy())
    with pytest.raises(ValueError, match="lacks the attention rows of 3 graph node"):
        graph_from_run(run, P, T, "all")
    with pytest.raises(ValueError, match="nodes is one of"):
        graph_from_run(run, P, T, "prompt")


@pytest.fixture(scope="module")
def trained(scene_vlm):
    return scene_vlm


def test_captured_graph_equals_eager_attention_and_full_rows(trained):
    scene = SceneWorld(seed=0).scene("test", 3)
    graph = generate_graph(trained, scene.image, "Describe the image.", max_new_tokens=12)
    traced = generate_traced(trained, scene.image, "Describe the image.", max_new_tokens=12, keep_graph=True)
    T, P = len(graph.token_ids), graph.prompt_len
    assert graph.text == traced.text and graph.attn.shape == (30, 9, T, T)
    np.testing.assert_allclose(graph.attn, traced.graph, rtol=0, atol=1e-6)  # needed keys only == full rows' block
    assert np.all(np.triu(graph.attn, 1) == 0) and np.all(graph.attn.sum(-1) <= 1 + 1e-5)
    # reference: the eager attention of one forward over prompt + generated tokens
    inputs = trained.encode(trained.prompt("Describe the image."), scene.image)
    ids = torch.cat([inputs["input_ids"], torch.tensor([graph.token_ids])], 1)
    hf, before = trained.hf, trained.hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    finally:
        hf.set_attn_implementation(before)
    block = torch.stack([a[0, :, P - 1:P - 1 + T, P - 1:P - 1 + T] for a in ref]).float().numpy()
    np.testing.assert_allclose(graph.attn, block, rtol=0, atol=1e-5)
    # every position a node (the paper's whole-sequence graph): the eager map up to the last generating query
    whole = generate_graph(trained, scene.image, "Describe the image.", max_new_tokens=12, nodes="all")
    N = P - 1 + T
    assert whole.attn.shape == (30, 9, N, N) and whole.offset == P - 1
    # 2M entries through 30 layers: SDPA's and eager's float32 rounding in earlier layers reach ~2e-5 on a few of them
    np.testing.assert_allclose(whole.attn, torch.stack([a[0, :, :N, :N] for a in ref]).float().numpy(), rtol=0, atol=5e-5)
    np.testing.assert_allclose(whole.attn.sum(-1), 1.0, atol=1e-5)  # full rows: nothing of the graph is missing
    spans = object_spans(graph, scene.classes) or [{"steps": [T - 1]}]
    feats = span_features(graph.attn, spans, k=10)
    assert feats.shape == (len(spans), 2700) and np.isfinite(feats).all()


def test_bench_small_rewrites_only_its_section(trained, tmp_path):
    spec = importlib.util.spec_from_file_location("detectors", Path(__file__).parents[1] / "bench" / "detectors.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    md = tmp_path / "hallucination.md"
    md.write_text("# report\n\nkept above\n\n## Notes\n\n* kept below\n")
    assert bench.main(["--small", "--results", str(tmp_path)], model=trained) == 0
    first = md.read_text()
    assert first.startswith("# report\n\nkept above\n\n" + bench.BEGIN) and first.endswith(bench.END + "\n\n## Notes\n\n* kept below\n")
    assert "not for quoting" in first and (tmp_path / "hallucination-detectors.json").is_file()
    assert ("| detector | test AUROC |" in first) != ("Not evaluated" in first)  # a table, or why there is none
    assert bench.main(["--small", "--report", "--results", str(tmp_path)]) == 0  # from the cache, replaced in place
    again = md.read_text()
    assert again.count(bench.BEGIN) == 1 and again.count("kept below") == 1
    # bench/hallucination.py rewrites the whole report: the section is carried over, not lost
    import hallucination

    kept = hallucination.kept_sections(md)
    assert len(kept) == 1 and kept[0].startswith(bench.BEGIN) and kept[0].endswith(bench.END)
    md.write_text("# rewritten report\n\n## Notes\n\n* new notes\n")
    for section in kept:
        hallucination.write_section(md, section)
    assert md.read_text() == "# rewritten report\n\n" + kept[0] + "\n\n## Notes\n\n* new notes\n"


def test_span_features_refuse_maps_whose_diagonal_is_not_the_spectrum():
    """span_features/prefix_eigvals read eigenvalues off the diagonal, which holds only for causal maps: a
    bidirectional map (or a transposed one) must be refused as laplacian_eigvals refuses it, not turned into numbers
    that are not the Laplacian's eigenvalues."""
    bi = torch.softmax(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    # the truncated graph's true spectrum differs from what the diagonal rule gives
    e = 3
    true = torch.linalg.eigvals(laplacian(bi[..., :e + 1, :e + 1])).real.sort(-1).values
    diag_rule = torch.diagonal(laplacian(bi[..., :e + 1, :e + 1]), dim1=-2, dim2=-1)  # what the fast path reads
    assert not torch.allclose(true, diag_rule.sort(-1).values)
    with pytest.raises(ValueError, match="not causal"):
        prefix_eigvals(bi)
    with pytest.raises(ValueError, match="not causal"):
        span_features(bi.float().numpy(), [{"steps": [e]}], k=3)
    causal = causal_maps(2, 3, n=6).float().numpy()
    with pytest.raises(ValueError, match="not causal"):
        span_features(np.ascontiguousarray(np.swapaxes(causal, -1, -2)), [{"steps": [e]}], k=3)


def test_span_features_refuse_bad_shapes_and_steps():
    attn = causal_maps(2, 3, n=6).float().numpy()
    with pytest.raises(ValueError, match=r"\[layers, heads, nodes, nodes\]"):
        span_features(attn[0], [{"steps": [3]}])
    with pytest.raises(ValueError, match="square"):
        span_features(attn[..., :5], [{"steps": [3]}])
    with pytest.raises(ValueError, match="no generated tokens"):
        span_features(attn, [{"steps": []}])
    with pytest.raises(ValueError, match="before node 0"):
        span_features(attn, [{"steps": [-1]}])  # would silently read the empty graph
    with pytest.raises(ValueError, match="before node 0"):
        span_features(attn, [{"steps": [0]}], offset=-2)


def test_compare_detectors_refuses_a_group_on_both_sides_of_the_split():
    """A caption (image) with spans in both halves leaks: the probe trains on spans that share the test spans' image
    and attention graph, and the cluster bootstrap then resamples a unit that was also trained on."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = np.arange(40) % 3 == 0
    groups = np.repeat(np.arange(10), 4)
    with pytest.raises(ValueError, match="both the training and the test spans"):
        compare_detectors({"a": x}, y, groups, np.arange(40) % 2 == 0, boot=5)
    with pytest.raises(ValueError, match="40 spans"):
        compare_detectors({"a": x[:30]}, y, groups, groups < 5, boot=5)
    with pytest.raises(ValueError, match="40 spans"):
        compare_detectors({"a": x}, y, groups, np.arange(20), boot=5)  # indices, not a mask


def test_bench_section_names_the_command_that_made_its_numbers():
    """A run with other options (fewer captions, other scenes, fewer resamples) says so in its "Generated by" line,
    so the section's numbers follow from the command it shows."""
    spec = importlib.util.spec_from_file_location("detectors", Path(__file__).parents[1] / "bench" / "detectors.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = {"config": {"captions": 10, "start": 60, "max_new_tokens": 56}, "boot": 200, "captions": 10, "spans": 0,
         "hallucinated": 0, "layers": 30, "heads": 9, "k": 10, "graph_mb": 0.1, "mean_tokens": 20, "error": "x"}
    assert "Generated by `python bench/detectors.py --captions 10 --boot 200` (" in bench.section(s, small=False)
    s["config"]["captions"], s["boot"] = 150, 1000
    assert "Generated by `python bench/detectors.py` (" in bench.section(s, small=False)
    assert "Generated by `python bench/detectors.py --small` (" in bench.section(s, small=True)
