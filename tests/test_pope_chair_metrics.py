"""POPE, CHAIR, bootstrap and Lookback Lens pieces that need no model: strict parsing, the three POPE splits
built from ground truth, metric definitions, CHAIR's object matching, cluster bootstrap, AUROC."""
from __future__ import annotations

import numpy as np
import pytest

from attnscope.evaluate.bootstrap import bootstrap
from attnscope.evaluate.chair import ObjectVocabulary, caption_record, chair, chair_metrics
from attnscope.evaluate.lookback import TracedGeneration, auroc, evaluate_detector
from attnscope.evaluate.pope import (build_pope, parse_anchor, parse_pope_official, parse_yes_no, pope_metrics,
                                    scene_questions)
from attnscope.scenes import CLASSES, SceneWorld


# POPE's official rule (Li et al.'s evaluate.py): text before the first '.', commas removed, split on ' ', "no" if
# a word is exactly No / not / no. The right-hand column is what that rule gives, worked out by hand.
@pytest.mark.parametrize("text, strict, official", [
    ("Yes", "yes", "yes"), ("No.", "no", "no"), ("yes, there is a bag", "yes", "yes"),
    ("No, there is not.", "no", "no"), ("", None, "yes"), ("There is a bag.", None, "yes"),
    ("Yes and no", None, "no"), ("I cannot tell", None, "yes"), ("Yesterday", None, "yes"),
    ("NO", "no", "yes"),                      # case-sensitive: "NO" is not a no-word
    ("  NO  ", "no", "yes"),
    ("No!", "no", "yes"),                     # "No!" is not exactly "No"
    ("Not really.", None, "yes"),             # "Not" (capital) is not "not"
    ("Not sure", None, "yes"),
    ("Yes. There is no bag.", None, "yes"),   # only the first sentence is read
    ("There is no bag", None, "no"),
    ("I do not see one.", None, "no"),
    ("No,there is none", "no", "yes"),        # comma removed first: "Nothere"
    ("no\nbag", "no", "yes"),                 # split on spaces only
    ("Yes, not a bag", "yes", "no"),
    ("3.5 no", "no", "yes"),                   # the first '.' ends the "sentence"
])
def test_strict_parsing_and_pope_official_rule(text, strict, official):
    assert parse_yes_no(text) == strict
    assert parse_pope_official(text) == official
    assert parse_anchor(text) == official  # the earlier name is the same function


CLS = ["bag", "sandal", "coat", "boot", "dress", "shirt"]
FREQ = [50, 40, 30, 20, 10, 5]
COOC = np.zeros((6, 6))
COOC[0, 1] = COOC[1, 0] = 100  # bag ~ sandal
COOC[2, 3] = COOC[3, 2] = 80   # coat ~ boot
COOC[0, 5] = COOC[5, 0] = 1


def test_pope_splits_follow_their_definitions():
    images = [("a", ["bag", "dress"]), ("b", ["coat"]), ("c", ["shirt", "dress", "boot", "coat"])]
    qs = build_pope(images, CLS, FREQ, COOC, per_image=3, seed=0)
    by = lambda split, img: [(q.object, q.label) for q in qs if q.split == split and q.image_id == img]  # noqa: E731
    for split in ("random", "popular", "adversarial"):
        # yes-questions are shared, the split is balanced, and labels are true to the ground truth
        for image_id, present in images:
            got = by(split, image_id)
            assert {o for o, lab in got if lab} <= set(present)
            assert all(o not in present for o, lab in got if not lab)
            assert sum(lab for _, lab in got) == sum(not lab for _, lab in got)
        assert [q for q in qs if q.split == split and q.label] == [q for q in qs if q.split == split and q.label]
    assert [o for o, lab in by("adversarial", "a") if not lab] == ["sandal", "shirt"]  # co-occurring with bag first
    assert [o for o, lab in by("adversarial", "b") if not lab] == ["boot"]
    assert [o for o, lab in by("popular", "a") if not lab] == ["sandal", "coat"]  # most frequent absent
    assert [o for o, lab in by("popular", "c") if not lab] == ["bag", "sandal"]  # 3 present, 2 absent -> k=2
    yes = {s: sorted((q.image_id, q.object) for q in qs if q.split == s and q.label) for s in ("random", "popular", "adversarial")}
    assert yes["random"] == yes["popular"] == yes["adversarial"]
    assert all(q.question == f"Is there a {q.object} in the image?" for q in qs)
    assert build_pope(images, CLS, FREQ, COOC, seed=0) == qs  # reproducible


def test_pope_n_and_errors():
    images = [(f"i{k}", ["bag", "coat"]) for k in range(10)]
    qs = build_pope(images, CLS, FREQ, COOC, n=7)
    assert all(sum(q.split == s for q in qs) == 7 for s in ("random", "popular", "adversarial"))
    with pytest.raises(ValueError, match="only"):
        build_pope(images[:1], CLS, FREQ, COOC, n=50)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_pope([("x", ["unicorn"])], CLS, FREQ, COOC)
    with pytest.raises(ValueError, match="unknown POPE splits"):
        build_pope(images, CLS, FREQ, COOC, splits=("hard",))


def test_scene_questions_probe_the_cooccurrence_prior():
    qs, image_of = scene_questions(SceneWorld(seed=0), n=120)
    assert len(qs) == 360
    world = SceneWorld(seed=0)
    partner = world.partner
    adv = [q for q in qs if q.split == "adversarial" and not q.label]
    rnd = [q for q in qs if q.split == "random" and not q.label]
    present = lambda q: world.classes_of("test", int(q.image_id.split("-")[1]))  # noqa: E731
    partner_rate = lambda group: np.mean([any(partner.get(p) == q.object for p in present(q)) for q in group])  # noqa: E731
    # adversarial negatives are mostly the absent partners of present classes; random ones much less often
    assert partner_rate(adv) > 0.5 and partner_rate(adv) > partner_rate(rnd) + 0.2
    assert image_of(qs[0].image_id).size == (224, 224)


def test_pope_metrics_definitions():
    recs = [{"label": True, "parsed": "yes"}, {"label": True, "parsed": None}, {"label": False, "parsed": "yes"},
            {"label": False, "parsed": "no"}, {"label": True, "parsed": "no"}, {"label": False, "parsed": None}]
    m = pope_metrics(recs)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["yes_ratio"] == pytest.approx(2 / 6) and m["unparseable"] == pytest.approx(2 / 6)


def test_chair_vocabulary_and_metrics():
    vocab = ObjectVocabulary.scenes()
    assert vocab.objects("a red t-shirt top left and two shirts and an ankle boot") == ["t-shirt", "shirt", "boot"]
    assert vocab.objects("Trousers, SANDALS, dresses; a T shirt") == ["trouser", "sandal", "dress", "t-shirt"]
    assert vocab.objects("a red bag top left") == ["bag"]  # "top" is a position here, not a t-shirt
    r = caption_record("a red bag top left, a blue sandal and another bag and a coat", ["bag", "boot"], vocab)
    assert r == {"mentions": ["bag", "sandal", "bag", "coat"], "hallucinated_mentions": 2,
                 "mentioned": ["bag", "sandal", "coat"], "hallucinated": ["sandal", "coat"], "covered": ["bag"],
                 "gold": ["bag", "boot"]}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        caption_record("a cat", ["cat"], vocab)
    with pytest.raises(ValueError, match="names both"):
        ObjectVocabulary({"a": ["shoe"], "b": ["shoe"]})
    with pytest.raises(ValueError, match="per-mention"):
        chair_metrics([{"mentioned": ["bag"], "hallucinated": [], "covered": ["bag"], "gold": ["bag"]}])


# A hand-made table scored by Rohrbach et al.'s rules (their chair.py): every object word is one mention;
# CHAIR_i = hallucinated mentions / mentions over all captions; CHAIR_s = captions with a hallucinated mention /
# captions. Counts per caption (mentions, hallucinated mentions, hallucinated?) are worked out by hand.
CHAIR_TABLE = [
    # caption                                                     gold               mentions  halluc.  class-level
    ("a bag, a sandal and another sandal",                        ["bag"],            3,        2,       (2, 1)),
    ("two coats: a red coat and a blue coat",                     ["coat", "boot"],   3,        0,       (1, 0)),
    ("a dress",                                                   ["bag"],            1,        1,       (1, 1)),
    ("Describe the image? No.",                                   ["bag"],            0,        0,       (0, 0)),
    ("an ankle boot beside a boot and a bag",                     ["boot"],           3,        1,       (2, 1)),
]


def test_chair_per_mention_on_a_hand_made_table():
    vocab = ObjectVocabulary.scenes()
    records = [caption_record(c, g, vocab) for c, g, *_ in CHAIR_TABLE]
    for r, (caption, _, mentions, halluc, (classes, halluc_classes)) in zip(records, CHAIR_TABLE):
        assert (len(r["mentions"]), r["hallucinated_mentions"]) == (mentions, halluc), caption
        assert (len(r["mentioned"]), len(r["hallucinated"])) == (classes, halluc_classes), caption
    m = chair_metrics(records)
    assert m["chair_i"] == pytest.approx(4 / 10)          # (2 + 0 + 1 + 0 + 1) / (3 + 3 + 1 + 0 + 3)
    assert m["chair_i_per_class"] == pytest.approx(3 / 6)  # the class-once variant differs on the same captions
    assert m["chair_s"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 6)            # gold classes mentioned: bag, coat, boot of 6
    assert m["no_object_share"] == pytest.approx(1 / 5) and m["mentions_per_caption"] == pytest.approx(10 / 5)
    # a caption naming nothing divides nothing by zero; when every caption names nothing, CHAIR_i is undefined
    silent = chair_metrics([caption_record("No", ["bag"], vocab)])
    assert silent["chair_s"] == 0.0 and np.isnan(silent["chair_i"]) and silent["no_object_share"] == 1.0
    out = chair(["a bag", "a coat", "a coat and a coat"], [["bag"], ["bag"], ["bag"]], boot=200)
    assert out["chair_i"] == pytest.approx(3 / 4) and out["chair_i_per_class"] == pytest.approx(2 / 3)
    assert out["ci"]["chair_s"]["low"] <= out["chair_s"] <= out["ci"]["chair_s"]["high"]


def test_cluster_bootstrap():
    items = [1.0] * 50 + [0.0] * 50
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    iid = bootstrap(items, mean, n=500)["value"]
    assert iid["low"] < 0.5 < iid["high"] and iid["high"] - iid["low"] < 0.25
    clustered = bootstrap(items, mean, groups=[0] * 50 + [1] * 50, n=500)["value"]  # two clusters: huge interval
    assert clustered["high"] - clustered["low"] > 0.9
    with pytest.raises(ValueError, match="one per item"):
        bootstrap(items, mean, groups=[0, 1])


def test_auroc_and_detector_on_synthetic_features():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    x = rng.normal(size=(400, 20))
    x[:, 7] -= 1.5 * y  # one informative "head": hallucinated spans look back less
    out = evaluate_detector(x[:200], y[:200], x[200:], y[200:], boot=200)
    assert out["best_head"]["index"] == 7 and out["best_head"]["sign"] == -1.0
    assert out["lookback_lens"]["value"] > 0.8 and out["best_single_head"]["value"] > 0.8
    assert 0.35 < out["random_scores"]["value"] < 0.65


def test_lookback_ratio_definition():
    ctx = np.array([[[0.02]], [[0.01]]])
    new = np.array([[[0.0]], [[0.03]]])
    t = TracedGeneration("ab", [1, 2], [(0, 1), (1, 2)], ctx, ctx, new, ctx)
    np.testing.assert_allclose(t.lookback_ratio()[:, 0, 0], [1.0, 0.25])
    assert t.span_steps(1, 2) == [1]
    with pytest.raises(ValueError, match="context"):
        t.lookback_ratio("everything")


def test_classes_cover_the_scene_vocabulary():
    assert set(ObjectVocabulary.scenes().classes) == set(CLASSES)
