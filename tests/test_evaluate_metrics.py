"""Faithfulness curves, pointing games and saliency agreement on known answers, then on real models.

The known-answer model reads the mean of a fixed box of pixels, so the perfect map (the box's patches) must give
the lowest deletion AUC and the highest insertion AUC, the random map sits between, and the reversed map is worst."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnscope.core.tokens import TokenMap
from attnscope.evaluate import energy_pointing, pointing_game, saliency_agreement, saliency_map
from attnscope.evaluate.faithfulness import units_of
from attnscope.explain import Explanation, explain, targets

GRID, PATCH = 6, 4
BOX = (slice(4, 12), slice(8, 16))  # pixels of patches rows 1-2, cols 2-3


class BoxModel(torch.nn.Module):
    """'logit' = mean brightness of the box; pixels elsewhere do not matter."""

    def forward(self, pixel_values, **_):
        return SimpleNamespace(logits=pixel_values[:, :, BOX[0], BOX[1]].mean(dim=(1, 2, 3))[:, None])


def synthetic(scores_fn) -> Explanation:
    tmap = TokenMap.vision(GRID, GRID)
    pixels = torch.rand(1, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(0)) + 1.0
    model = SimpleNamespace(hf=BoxModel(), name="box")
    scores = torch.tensor([0.0] + [scores_fn(r, c) for _, r, c in tmap.patch[1:]])
    target = targets.ClassLogit(head=None, index=0).bind(model, {"pixel_values": pixels}, None)
    return Explanation("synthetic", {}, scores, tmap, "vision", pixel_size=(GRID * PATCH,) * 2, patch=(PATCH, PATCH),
                       _model=model, _inputs={"pixel_values": pixels}, _target=target)


def in_box(r, c):
    return 1.0 if 1 <= r <= 2 and 2 <= c <= 3 else 0.0


def test_known_answer_deletion_insertion_and_random():
    perfect = synthetic(lambda r, c: in_box(r, c) + 0.01 * (r + c))
    reverse = synthetic(lambda r, c: -in_box(r, c))
    good, bad = perfect.faithfulness(steps=9), reverse.faithfulness(steps=9)
    for res in (good, bad):
        assert res.curves["deletion"].normalised[0] == pytest.approx(1) and res.curves["deletion"].normalised[-1] == pytest.approx(0)
        assert res.curves["insertion"].normalised[0] == pytest.approx(0) and res.curves["insertion"].normalised[-1] == pytest.approx(1)
        assert res.units == GRID * GRID
    # 4 of 36 patches hold all the signal: removing them first empties the score by the first step
    assert good.curves["deletion"].normalised[1] == pytest.approx(0, abs=1e-6)
    assert good.summary()["deletion"] < good.summary()["deletion_random"] < bad.summary()["deletion"]
    assert good.summary()["insertion"] > good.summary()["insertion_random"] > bad.summary()["insertion"]
    assert good.summary()["negative"] > bad.summary()["negative"]
    assert good.summary()["deletion_random"] == bad.summary()["deletion_random"]  # same seed, same random order
    assert good.curves["deletion"].kept is not None  # class targets keep the predicted-class curve


def test_flat_maps_are_not_credited_with_raster_order():
    flat = synthetic(lambda r, c: 0.0)
    res = flat.faithfulness(steps=6, random=False)
    assert 0.05 < res.summary()["deletion"] < 0.95


def test_pointing_and_energy_known_answers():
    e = synthetic(in_box)
    mask = np.zeros((GRID * PATCH,) * 2, dtype=bool)
    mask[BOX] = True
    assert pointing_game(e, mask) and energy_pointing(e, mask) == pytest.approx(1.0)
    miss = synthetic(lambda r, c: 1.0 if (r, c) == (5, 5) else 0.1)
    assert not pointing_game(miss, mask)
    assert pointing_game(miss, mask, tolerance=4 * PATCH)
    assert energy_pointing(miss, mask) == pytest.approx(0.4 / (0.1 * 35 + 1.0))
    with pytest.raises(ValueError, match="resize the mask"):
        pointing_game(e, mask[:-1])


def test_saliency_agreement_known_answer():
    e = synthetic(in_box)
    sal = np.zeros((GRID * PATCH,) * 2)
    sal[BOX] = 1.0
    assert saliency_agreement(e, sal)["spearman"] == pytest.approx(1.0)
    assert saliency_agreement(synthetic(lambda r, c: -in_box(r, c)), sal)["spearman"] == pytest.approx(-1.0)


def test_text_units_keep_specials_and_the_predicting_position(smollm, minilm):
    x = smollm.encode("Paris is the capital of")
    e = explain(smollm, x, method="random")
    units = units_of(e)
    assert len(e.tokens) - 1 not in units and units  # the position the next token is predicted from stays
    res = e.faithfulness(steps=4)
    assert set(res.curves) == {"deletion", "insertion"} and res.baseline.startswith("deletion=remove")
    m = explain(minilm, minilm.encode("Paris is the capital of France."), method="gradattn")
    assert all(m.tokens.roles[u] == "text" for u in units_of(m))


def test_real_image_faithfulness_and_saliency(dinov2):
    x = dinov2.encode(image="coffee", size={"height": 112, "width": 140})  # small and non-square: fast, aligned
    e = explain(dinov2, x, method="gradattn")
    res = e.faithfulness(steps=5)
    assert set(res.summary()) == {"deletion", "deletion_random", "insertion", "insertion_random", "negative", "negative_random"}
    assert res.units == 8 * 10 and res.extras["forwards"] > 10
    assert res.summary()["deletion"] < res.summary()["deletion_random"]  # gradattn beats a random map here
    sal = saliency_map(dinov2, x)
    assert sal.shape == (112, 140)
    assert -1 <= saliency_agreement(e, sal)["spearman"] <= 1
