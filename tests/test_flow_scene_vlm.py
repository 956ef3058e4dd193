"""Attention knockout on scene-vlm: image, question and last sets come from roles and the question's words, and
knocking image keys out of the question rows / the last row equals the model's own eager attention with a
hand-built mask blocking exactly those pairs (image keys are the 64 pooled tokens of the language stream)."""
from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope.flow import knockout_curve, token_sets
from attnscope.scenes import SceneWorld, question
from attnscope.steer import Knockout, steer

MIN = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def vlm():
    model = attnscope.load("scene-vlm")
    scene = SceneWorld(seed=0).scene("test", 0)
    q = question(scene.classes[0])
    return model, scene, q, model.encode(q, image=scene.image)


def eager_logits(model, inputs, layers, rows, cols):
    hf = model.hf
    L = inputs["input_ids"].shape[1]
    mask = torch.zeros(1, 1, L, L).masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), MIN)
    mask[0, 0, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = MIN
    fired = []

    def replace(module, args, kwargs):
        assert "attention_mask" in kwargs
        fired.append(1)
        return args, {**kwargs, "attention_mask": mask}

    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    handles = [hf.get_submodule(s.path).register_forward_pre_hook(replace, with_kwargs=True)
               for s in model.sites.values() if s.stream == "language" and s.layer in layers]
    try:
        with torch.no_grad():
            return hf(**inputs).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
        hf.set_attn_implementation(before)
        assert len(fired) == len(layers)


def test_sets_are_the_image_the_question_words_and_the_last_row(vlm):
    model, scene, q, x = vlm
    sets = token_sets(model, x, question=q)
    tmap = model.token_maps(x)["language"][0]
    assert len(sets["image"]) == 64 and all(tmap.roles[i] == "image" for i in sets["image"])
    words = model.tokenizer.convert_tokens_to_string([tmap.tokens[i] for i in sets["question"]])
    assert words.strip() == q
    assert sets["last"] == [len(tmap) - 1] and sets["last"][0] not in sets["question"]


@pytest.mark.parametrize("target", ["question", "last"])
def test_image_knockout_equals_eager_with_a_hand_built_mask(vlm, target):
    model, scene, q, x = vlm
    sets = token_sets(model, x, question=q)
    layers = [8, 9, 10, 11]
    spec = "last" if target == "last" else sets[target]
    with torch.no_grad(), steer(model, Knockout("image", spec, layers)):
        got = model.hf(**x).logits[0, -1]
    want = eager_logits(model, x, layers, sets[target], sets["image"])
    with torch.no_grad():
        plain = model.hf(**x).logits[0, -1]
    assert (want - plain).abs().max() > 1e-3
    assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 1e-5
    assert (got - want).abs().max() < 1e-4


def test_a_curve_over_one_window_per_flow(vlm):
    model, scene, q, x = vlm
    curve = knockout_curve(model, q, image=scene.image, window=30, answer="Yes")
    assert curve.windows == [(0, 29)] and curve.flows == ["image->question", "image->last", "question->last"]
    assert curve.examples[0]["top1"]
    assert all(-1 <= float(v[0, 0]) for v in curve.changes.values())  # a probability cannot fall below zero
    # the curve reuses the encoded image in its windows: the same number as a forward from the pixels
    sets, tid = curve.examples[0]["sets"], curve.examples[0]["answer_id"]
    with torch.no_grad():
        p0 = float(model.hf(**x).logits[0, -1].softmax(-1)[tid])
        with steer(model, Knockout("image", "last", range(30))):
            p = float(model.hf(**x).logits[0, -1].softmax(-1)[tid])
    assert curve.base[0] == pytest.approx(p0, abs=1e-6)
    assert curve.changes["image->last"][0, 0] == pytest.approx((p - p0) / p0, abs=1e-5)
