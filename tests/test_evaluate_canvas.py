"""The Fashion-MNIST canvas classifier: deterministic canvases whose mask is the item, committed weights that
classify held-out canvases, and localisation that beats a random map on them."""
import numpy as np
import torch

from attnscope.evaluate import energy_pointing, pointing_game
from attnscope.evaluate.canvas import CANVAS, CLASSES, WEIGHTS, canvas_dataset, load_canvas_classifier, make_canvas
from attnscope.explain import ClassLogit, explain



def test_canvases_are_deterministic_and_masks_are_the_item():
    a, b = canvas_dataset("test", 2, seed=0), canvas_dataset("test", 2, seed=0)
    assert [x.index for x in a] == [x.index for x in b] and sorted(x.label for x in a) == sorted(list(range(10)) * 2)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image)) and np.array_equal(x.mask, y.mask)
        top, left, h, w = x.box
        assert x.image.size == (CANVAS, CANVAS) and 56 <= h <= 84
        assert x.mask[top : top + h, left : left + w].sum() == x.mask.sum() > 0.2 * h * w
        grey = np.asarray(x.image)[..., 0]
        assert grey[x.mask].mean() > grey[~x.mask].mean() + 40  # the item stands out of the background
    first = canvas_dataset("test", 1, seed=0)
    assert [x.index for x in first] == [x.index for x in a[:10]]  # smaller sets are prefixes of larger ones
    img, mask, box = make_canvas(np.full((28, 28), 200, np.uint8), np.random.default_rng(1))
    assert mask.sum() == box[2] * box[3]


def test_committed_classifier_classifies_held_out_canvases(dinov2):
    assert WEIGHTS.stat().st_size < 5_000_000
    model, head, info = load_canvas_classifier(dinov2)
    assert info["test_accuracy"] >= 0.75 and info["classes"] == list(CLASSES)
    items = canvas_dataset("test", 2, seed=0)
    x = model.encode(image=[it.image for it in items])
    with torch.no_grad():
        pred = head(model(**x).last_hidden_state).argmax(-1)
    accuracy = float((pred == torch.tensor([it.label for it in items])).float().mean())
    assert accuracy >= 0.6, accuracy


def test_gradattn_localises_the_item_better_than_random(dinov2):
    model, head, _ = load_canvas_classifier(dinov2)
    energy = {"gradattn": [], "random": []}
    hits = 0
    for it in canvas_dataset("test", 1, seed=0)[:4]:
        x = model.encode(image=it.image)
        for method in energy:
            e = explain(model, x, method=method, target=ClassLogit(head, index=it.label))
            assert e.target["index"] == it.label
            energy[method].append(energy_pointing(e, it.mask))
            hits += method == "gradattn" and pointing_game(e, it.mask)
    assert np.mean(energy["gradattn"]) > 2 * np.mean(energy["random"])
    assert hits >= 2
