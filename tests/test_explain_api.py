"""The Explanation type and `explain()` on real models: scores over tokens, pixel-aligned maps at any input size
(non-square, not a multiple of the patch), files, HTML, and the bad-input errors."""
import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.core.tokens import TokenMap
from attnscope.explain import METHODS, Explanation, MethodError, TargetError, explain, targets
from attnscope.explain.engine import run


def test_in_graph_attention_matches_backend_and_capture(dinov2):
    """The attention the explainers differentiate is the attention the model runs: same output as SDPA, same
    probabilities as attnscope.capture (which equals eager, tested elsewhere)."""
    x = dinov2.encode(image="astronaut")
    with torch.no_grad():
        plain = dinov2(**x).last_hidden_state
        with attnscope.capture(dinov2, layers=[0, 11]) as trace:
            dinov2(**x)
    p = run(dinov2, x, targets.EmbeddingSimilarity(), grad=False)
    torch.testing.assert_close(p.output.last_hidden_state, plain, atol=2e-4, rtol=1e-4)
    for layer in (0, 11):
        torch.testing.assert_close(p.attention("vision", layer), trace.attention("vision", layer), atol=1e-5, rtol=0)


def test_explanation_records_method_params_target_and_maps(dinov2):
    e = explain(dinov2, image="chelsea", method="rollout", head_fusion="max", discard_ratio=0.5)
    assert e.method == "rollout" and e.params["head_fusion"] == "max" and e.params["discard_ratio"] == 0.5
    assert e.target["name"] == "embedding_similarity" and e.target_value > 0
    assert e.scores.shape == (257,) and e.tokens.roles[0] == "cls"
    assert e.pixel_size == (224, 224) and e.patch == (14, 14)
    assert e.grid().shape == (16, 16)
    assert e.image_map().shape == (224, 224)
    assert e.image_map(size="photo").shape == (300, 451)  # chelsea is 451 x 300: maps resize to the photo
    assert "rollout" in repr(e)


@pytest.mark.parametrize("size", [(230, 300), (168, 322)])
def test_odd_and_non_square_sizes_align_to_pixels(dinov2, size):
    h, w = size
    x = dinov2.encode(image="coffee", size={"height": h, "width": w})
    e = explain(dinov2, x, method="raw")
    rows, cols = h // 14, w // 14
    assert e.pixel_size == (h, w) and e.tokens.grids == [(rows, cols)]
    nearest = e.image_map(mode="nearest")
    assert nearest.shape == (h, w)
    grid = e.grid()
    for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 3)]:
        block = nearest[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
        assert np.allclose(block, grid[r, c])
    covered = e.covered()
    assert covered[: rows * 14, : cols * 14].all() and not covered[rows * 14 :, :].any() and not covered[:, cols * 14 :].any()
    assert np.allclose(nearest[~covered], grid.min())
    # a one-hot patch peaks inside its own pixel block in the smooth map as well
    one = Explanation("synthetic", {}, torch.zeros(len(e.tokens)), e.tokens, "vision", pixel_size=(h, w), patch=(14, 14))
    r, c = rows - 2, cols - 3
    one.scores[e.tokens.image_positions(0)[r * cols + c]] = 1.0
    y, xx = np.unravel_index(np.argmax(one.image_map()), (h, w))
    assert r * 14 <= y < (r + 1) * 14 and c * 14 <= xx < (c + 1) * 14


def test_save_load_html_png(dinov2, tmp_path):
    e = explain(dinov2, image="rocket", method="gradattn")
    for suffix in (".json", ".safetensors"):
        back = Explanation.load(e.save(tmp_path / f"e{suffix}"))
        assert torch.equal(back.scores, e.scores) and back.method == "gradattn" and back.params == e.params
        assert back.tokens.to_dict() == e.tokens.to_dict() and back.pixel_size == e.pixel_size
        assert np.allclose(back.image_map(), e.image_map())
    assert json.loads((tmp_path / "e.json").read_text())["format"] == "attnscope.explanation/1"
    page = e.to_html()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "http" not in page
    png = e.save(tmp_path / "e.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="suffix|use .json"):
        e.save(tmp_path / "e.txt")


def test_text_explanation_has_no_image_map(minilm):
    e = explain(minilm, text="Attention is all you need.", method="raw")
    assert e.tokens.tokens[0] == "[CLS]" and len(e.scores) == len(e.tokens)
    with pytest.raises(ValueError, match="no pixel input"):
        e.image_map()
    assert "<span" in e.to_html()


def test_bad_inputs_are_refused_with_the_fix(minilm, dinov2):
    x = minilm.encode("A short sentence.")
    with pytest.raises(MethodError, match="unknown method 'rolout'; methods: raw, rollout, flow, gradattn"):
        explain(minilm, x, method="rolout")
    with pytest.raises(MethodError, match="takes no parameter"):
        explain(minilm, x, method="rollout", layer=3)
    with pytest.raises(MethodError, match="one input at a time"):
        explain(minilm, minilm.encode(["one sentence", "and another"]), method="raw")
    constant = lambda out, inputs: torch.ones(1)  # noqa: E731 - does not depend on the inputs
    for method in ("gradattn", "lrp", "gradinput", "gradcam"):
        with pytest.raises(TargetError, match="does not depend on the inputs"):
            explain(minilm, x, method=method, target=constant)
    detached = lambda out, inputs: out.last_hidden_state[:, 0, 0].detach()  # noqa: E731
    with pytest.raises(TargetError, match="does not depend on the inputs"):
        explain(minilm, x, method="gradattn", target=detached)
    with pytest.raises(TargetError, match="unknown target"):
        explain(minilm, x, method="raw", target="logits")
    with pytest.raises(MethodError, match="out of range"):
        explain(minilm, x, method="raw", layer=6)
    with pytest.raises(ValueError, match="nothing to explain"):
        explain(dinov2, method="raw")


def test_tokenmap_sinks_backward_compatible():
    old = {"roles": ["cls", "image"], "tokens": ["CLS", "p"], "patch": [None, [0, 0, 0]], "grids": [[1, 1]]}
    tmap = TokenMap.from_dict(old)
    assert tmap.sinks == []
    tmap.sinks = [1]
    assert TokenMap.from_dict(tmap.to_dict()).sinks == [1]
    with pytest.raises(ValueError, match="outside the sequence"):
        TokenMap(["cls"], ["CLS"], sinks=[3])


def test_every_method_is_listed_and_documented():
    for name, mod in METHODS.items():
        doc = mod.__doc__ or ""
        assert "Paper" in doc or "paper" in doc, name
        assert "Default" in doc or "default" in doc, name


def test_demo_figures_write_pngs(dinov2, tmp_path):
    from attnscope.explain.figures import comparison_figure, sinks_figure

    path = comparison_figure(tmp_path, photos=("coffee",), methods=(("raw", {}),), model=dinov2, saliency=False)
    assert path.read_bytes()[:4] == b"\x89PNG"
    path, facts = sinks_figure(tmp_path / "sinks.png", photos=("coffee",), model=dinov2)
    assert path.exists() and facts["coffee"]["sinks"]
    assert facts["coffee"]["top_rollout_keep"] in facts["coffee"]["sinks"]
    assert facts["coffee"]["top_rollout_discount"] not in facts["coffee"]["sinks"]
