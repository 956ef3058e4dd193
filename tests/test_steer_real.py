"""Proof on real weights (SmolLM2-135M, DINOv2-S/14): steering does what it says, measurably.

- SmolLM2: amplifying attention (PAI's a + alpha|a|, layers 20-29, the generating row) to a context span raises the
  probability of the answer copied from that span, and more than amplifying a control span does;
- SmolLM2: masking the 10 heads of highest ablation importance on a target hurts it far more than masking random
  sets of 10 heads ("Are Sixteen Heads Really Better than One?");
- DINOv2: zeroing the heads the importance table ranks highest moves the CLS embedding more than zeroing the
  lowest or random ones, and sampled Shapley values rank the heads of a layer like single-head ablation."""
from __future__ import annotations

import random

import pytest
import torch

from attnscope import heads
from attnscope.heads.importance import _gated
from attnscope.heads.target import make_target
from attnscope.steer import PAI, steer

# (prompt, answer copied from the first fact, the competing answer copied from the second fact)
FACTS = [
    ("Alice lives in Paris. Bob lives in Rome. Bob lives in", " Paris", " Rome"),
    ("The cat is called Max. The dog is called Rex. The dog is called", " Max", " Rex"),
    ("Mary bought apples. John bought bread. John bought", " apples", " bread"),
]


@pytest.mark.parametrize("prompt, answer, competitor", FACTS, ids=["city", "pet", "shopping"])
def test_amplifying_a_span_raises_the_answer_copied_from_it(smollm, prompt, answer, competitor):
    """P(answer) with its span amplified is > 2x the plain model's and > 2x that with the competing span amplified
    instead (the control: same edit, other keys)."""
    x = smollm.encode(prompt)
    ids = x["input_ids"][0].tolist()
    token, other = (smollm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (answer, competitor))
    span, control = [i for i, t in enumerate(ids) if t == token], [i for i, t in enumerate(ids) if t == other]
    assert len(span) == len(control) == 1

    def p(items):
        with torch.no_grad(), steer(smollm, *items):
            return float(smollm.hf(**x).logits[0, -1].softmax(-1)[token])

    layers = range(20, 30)
    plain, amplified = p([]), p([PAI(alpha=1.0, keys=span, layers=layers)])
    control_amplified = p([PAI(alpha=1.0, keys=control, layers=layers)])
    assert amplified > 2 * plain
    assert amplified > 2 * control_amplified


def test_sixteen_heads_masking_top_heads_hurts_more_than_random(smollm):
    x = smollm.encode("Alice lives in Paris. Bob lives in Rome. Alice lives in")
    layers = list(range(20, 30))
    table = heads.table(smollm, x, metrics=["ablation"], layers=layers, target=" Paris")
    assert table.meta["target"].startswith("log p(' Paris'")
    top = table.top("ablation", 10)
    target = make_target(smollm, x, " Paris")
    base = float(_gated(smollm, target, [{}])[0])
    rng = random.Random(0)
    draws = [rng.sample(table.rows, 10) for _ in range(5)]
    drops = base - _gated(smollm, target, [{h: 0.0 for h in hs} for hs in [top, *draws]])
    assert drops[0] > 0.5
    assert drops[0] > 2 * drops[1:].max()


@pytest.fixture(scope="module")
def small_photo(dinov2):
    return dinov2.encode(image="chelsea", size={"height": 112, "width": 112})


def test_dinov2_zeroing_heads_moves_cls_as_the_table_predicts(dinov2, small_photo):
    table = heads.table(dinov2, small_photo, metrics=["ablation"])
    assert len(table) == 72 and table.meta["target"].startswith("cosine similarity")
    order = table.top("ablation", 72)
    target = make_target(dinov2, small_photo, None)
    rng = random.Random(0)
    sets = [order[:6], order[-6:], *[rng.sample(order, 6) for _ in range(4)]]
    moved = 1 - _gated(dinov2, target, [{h: 0.0 for h in hs} for hs in sets])  # 1 - cos(CLS, unablated CLS)
    assert moved[0] > 2 * moved[2:].max()
    assert moved[1] < moved[2:].min()


def test_dinov2_shapley_ranks_heads_like_ablation(dinov2, small_photo):
    table = heads.table(dinov2, small_photo, metrics=["ablation", "shapley"], layers=[11], samples=8)
    phi, se, abl = (torch.tensor(table.column(c)) for c in ("shapley", "shapley_se", "ablation"))
    assert (se > 0).all() and (se < phi.abs().max()).all()
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(phi), rank(abl)]))[0, 1] > 0.8
