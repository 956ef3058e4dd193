"""VLM token maps on tiny random LLaVA models (mechanics only; no real VLM exists here): the image map of a generated
token and of an answer span, the bi-modal rule through the vision tower, and the refusal for Qwen2-VL's merged
patches."""
import pytest
import torch
from test_capture_architectures import Llava, LlavaDinov2, Qwen2VL, get

from attnscope.explain import MethodError, explain, vlm


@pytest.fixture(params=[Llava, LlavaDinov2], ids=lambda c: c.name)
def arch(request):
    return get(request.param)


def test_generated_tokens_and_answer_span(arch):
    g = vlm.generate_and_explain(arch.m, arch.inputs, max_new_tokens=3)
    assert len(g.tokens) == g.ids.shape[1] - g.prompt_length == 3
    for e in g.tokens + [g.span]:
        assert e.extras["bimodal"] is True and e.stream == "language"
        assert e.image_map().shape == (32, 32) and e.grid().shape == (4, 4)
    # the span's target is the answer's log-likelihood: the sum of its tokens' log-probabilities
    assert g.span.target_value == pytest.approx(sum(e.target_value for e in g.tokens), abs=1e-4)
    assert g.span.target["positions"] == list(range(g.prompt_length, g.ids.shape[1]))
    first = g.tokens[0]
    assert first.target["positions"] == [g.prompt_length]
    # the token being explained and everything after it get nothing (causal LM)
    assert torch.all(first.scores[g.prompt_length + 1 :] == 0)


def test_bimodal_rule_uses_the_tower_and_keeps_the_image_total(arch):
    lm_only = explain(arch.m, arch.inputs, method="gradattn", vision=False)
    both = explain(arch.m, arch.inputs, method="gradattn")
    image = lm_only.tokens.image_positions(0)
    text = [i for i in range(len(lm_only.tokens)) if i not in image]
    assert not torch.allclose(lm_only.scores[image], both.scores[image])
    assert float(both.scores[image].sum()) == pytest.approx(float(lm_only.scores[image].sum()), rel=1e-4)
    torch.testing.assert_close(lm_only.scores[text], both.scores[text])


def test_other_methods_give_vlm_image_maps(arch):
    for method in ("raw", "rollout", "lrp", "gradinput"):
        e = explain(arch.m, arch.inputs, method=method)
        assert e.image_map().shape == (32, 32), method
    res = explain(arch.m, arch.inputs, method="gradattn").faithfulness(steps=4)
    assert res.units == 16


def test_qwen2_vl_bimodal_refused_with_reason():
    q = get(Qwen2VL)
    with pytest.raises(MethodError, match="merges patches"):
        explain(q.m, q.inputs, method="gradattn", vision=True)
    e = explain(q.m, q.inputs, method="gradattn")
    assert "merges patches" in e.extras["bimodal_skipped"]
    with pytest.raises(MethodError, match="not a vision-language model|batch"):
        vlm.token_map(get(Llava).m, {"input_ids": torch.ones(2, 3, dtype=torch.long)}, 1)


def test_scene_vlm_image_map_covers_the_whole_image_one_pooled_cell_per_token():
    """scene-vlm's LM image tokens each pool 2x2 tower patches: the pixel map puts token (r, c) over the 28 px cell
    (r, c) of the 224 px input, never over a 14 px patch in one corner."""
    import attnscope
    import numpy as np

    vlm = attnscope.load("scene-vlm")
    e = attnscope.explain(vlm, vlm.encode("Is there a bag in the image?", image="chelsea"))
    grid = np.asarray(e.grid(0))
    assert grid.shape == (8, 8)
    full = e.image_map(mode="nearest")
    assert full.shape == (224, 224)
    assert np.allclose(full[14::28, 14::28], grid)  # every cell's centre carries its own token's score
    assert np.ptp(full[112:, 112:]) > 0  # the bottom-right quarter is drawn too
