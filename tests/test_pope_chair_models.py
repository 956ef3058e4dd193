"""POPE and CHAIR mechanics on real models (the untrained scene-vlm: random projector, no LoRA), and bad input:
models without image tokens are refused, answers are recorded and scored with strict parsing (an untrained
model's answers are mostly unparseable, and counted so), JSON lines are written, sampling is seeded per
question, sharded runs merge to the unsharded result, steering methods plug in by name, and Lookback Lens
features have the right shapes and ranges."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnscope.evaluate import chair as chair_mod
from attnscope.evaluate import pope as pope_mod
from attnscope.evaluate.lookback import generate_traced, object_spans, span_features
from attnscope.models import scene_vlm
from attnscope.scenes import SceneWorld

WORLD = SceneWorld(seed=0)


@pytest.fixture(scope="module")
def untrained():
    return scene_vlm.build()


@pytest.fixture(scope="module")
def few():
    qs, image_of = pope_mod.scene_questions(WORLD, n=4)
    return qs, image_of


def test_models_without_image_tokens_are_refused(smollm, dinov2, few):
    qs, image_of = few
    for model in (smollm, dinov2):
        with pytest.raises(pope_mod.NotAVisionLanguageModel, match="not a vision-language model"):
            pope_mod.evaluate_pope(model, qs, image_of)
        with pytest.raises(pope_mod.NotAVisionLanguageModel):
            chair_mod.evaluate_chair(model, [("test-000000", ["bag"])], image_of)


def test_unknown_classes_are_refused(untrained):
    images, image_of = chair_mod.scene_images(WORLD, n=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chair_mod.evaluate_chair(untrained, [("test-000000", ["unicorn"])], image_of)
    with pytest.raises(ValueError, match="no POPE questions"):
        pope_mod.evaluate_pope(untrained, [], image_of)


def test_pope_records_metrics_and_jsonl(untrained, few, tmp_path):
    qs, image_of = few
    out = tmp_path / "pope.jsonl"
    result = pope_mod.evaluate_pope(untrained, qs, image_of, max_new_tokens=4, out=out, boot=50)
    assert len(result.records) == len(qs) == 12
    assert set(result.metrics) == {"random", "popular", "adversarial"}
    for r in result.records:
        assert r["parsed"] == pope_mod.parse_yes_no(r["answer"])
        assert r["seconds"] > 0 and 1 <= r["new_tokens"] <= 4
    for split, m in result.metrics.items():
        assert m["n"] == 4
        assert m["unparseable"] == pytest.approx(np.mean([r["parsed"] is None for r in result.records if r["split"] == split]))
    # shared yes-questions were answered once: identical answers and timings across splits
    yes = {}
    for r in result.records:
        if r["label"]:
            yes.setdefault((r["image_id"], r["object"]), set()).add((r["answer"], r["seconds"]))
    assert all(len(v) == 1 for v in yes.values())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["answer"] * 12 + ["summary"] * 3
    assert lines[-1]["config"]["method"] == "baseline"


def test_sampling_is_seeded_per_question(untrained, few):
    qs, image_of = few
    qs = [q for q in qs if q.split == "random"][:2]
    run = lambda seed: [r["answer"] for r in pope_mod.evaluate_pope(  # noqa: E731
        untrained, qs, image_of, sample=True, temperature=1.0, seed=seed, max_new_tokens=6, boot=10).records]
    a, b = run(0), run(0)
    assert a == b
    assert run(1) != a


def test_sharded_run_merges_to_the_unsharded_result(untrained, few, tmp_path):
    qs, image_of = few
    qs = [q for q in qs if q.split != "popular"]
    plain = pope_mod.evaluate_pope(untrained, qs, image_of, max_new_tokens=3, boot=10)
    out = tmp_path / "sharded.jsonl"
    for index in (1, 0):
        assert pope_mod.evaluate_pope(untrained, qs, image_of, max_new_tokens=3, out=out, shard=f"{index}/2", boot=10) is None
    merged = pope_mod.merge_pope(qs, out, boot=10)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(merged.records) == strip(plain.records)
    assert merged.config["processes"] == 2
    assert not list(tmp_path.glob("*.shard-*"))


def test_chair_on_captions(untrained, tmp_path):
    images, image_of = chair_mod.scene_images(WORLD, n=2)
    result = chair_mod.evaluate_chair(untrained, images, image_of, max_new_tokens=12, out=tmp_path / "c.jsonl", boot=20)
    assert len(result.records) == 2
    for r, (image_id, gold) in zip(result.records, images):
        assert r["image_id"] == image_id and r["gold"] == list(gold)
        assert set(r["hallucinated"]) <= set(r["mentioned"]) and r["hallucinated_mentions"] <= len(r["mentions"])
    named = sum(len(r["mentions"]) for r in result.records)
    chair_i = result.metrics["chair_i"]
    assert (0 <= chair_i <= 1) if named else math.isnan(chair_i)  # undefined when no object is named at all
    assert (tmp_path / "c.jsonl").read_text().count('"type": "caption"') == 2


def test_steering_methods_by_name(untrained, few):
    qs, image_of = few
    qs = [q for q in qs if q.split == "random"][:2]
    result = pope_mod.evaluate_pope(untrained, qs, image_of, steer="pai:alpha=0.5", max_new_tokens=3, boot=10)
    assert result.config["method"] == "pai"
    assert all(r["method"] == "pai" for r in result.records)
    with pytest.raises(Exception, match="unknown method"):
        pope_mod.resolve_steer("nosuchmethod")


def test_lookback_features_on_a_real_generation(untrained):
    scene = WORLD.scene("test", 1)
    traced = generate_traced(untrained, scene.image, "Describe the image.", max_new_tokens=6)
    T = len(traced.token_ids)
    assert traced.ctx_mean.shape == (T, 30, 9)
    lr = traced.lookback_ratio()
    assert np.all((lr >= 0) & (lr <= 1)) and np.allclose(lr[0], 1.0)
    assert np.all((traced.image_mass >= 0) & (traced.image_mass <= 1 + 1e-5))
    # offsets tile the decoded text
    assert traced.offsets[0][0] == 0 and traced.offsets[-1][1] == len(traced.text)
    spans = [{"class": "bag", "hallucinated": True, "steps": [0, 1]}]
    feats = span_features(traced, spans)
    assert feats.shape == (1, 270)
    np.testing.assert_allclose(feats[0], lr[[0, 1]].mean(0).reshape(-1), rtol=1e-6)
    assert isinstance(object_spans(traced, scene.classes), list)
    with torch.no_grad():
        pass
