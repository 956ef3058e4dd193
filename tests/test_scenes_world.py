"""The scene world: reproducible, splits disjoint, ground truth exact, the co-occurrence knob works, bad settings
are refused with errors that name the fix, and captions parse back to their ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from attnscope.scenes import CELL_NAMES, CLASSES, COLOURS, SceneWorld, caption_scores, parse_caption, question
from attnscope.scenes import items
from conftest import needs_train_images

WORLD = SceneWorld(seed=0)


@needs_train_images
def test_same_seed_same_scene_other_seed_other_scene():
    a, b = WORLD.scene("train", 3), SceneWorld(seed=0).scene("train", 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.to_dict() == b.to_dict()
    c = SceneWorld(seed=1).scene("train", 3)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@needs_train_images
def test_splits_disjoint_in_items_and_streams():
    """No item image is shared between splits (the pools are disjoint index ranges), and scene i of one split
    is not scene i of another."""
    used = {s: {(o.cls, o.item) for i in range(60) for o in WORLD.scene(s, i).objects} for s in ("train", "val", "test")}
    ranges = {s: items.SPLIT_SOURCES[s] for s in used}
    assert ranges["train"][0] == "train" and ranges["val"][0] == ranges["test"][0] == "t10k"
    assert ranges["val"][1].stop <= ranges["test"][1].start
    digests = {s: {items.pool(s)[0][i].tobytes() for _, i in used[s]} for s in used}
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    assert WORLD.scene("val", 5).to_dict()["objects"] != WORLD.scene("test", 5).to_dict()["objects"]


@pytest.mark.parametrize("index", range(12))
def test_ground_truth_is_exact(index):
    scene = WORLD.scene("test", index)
    img = np.asarray(scene.image).astype(int)
    assert scene.image.size == (224, 224) and scene.image.mode == "RGB"
    assert 1 <= len(scene.objects) <= 5
    assert len(set(scene.classes)) == len(scene.classes)
    cells = [o.cell for o in scene.objects]
    assert cells == sorted(cells) and len(set(cells)) == len(cells)  # reading order, one object per cell
    labels = scene.label_map()
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        ys, xs = np.nonzero(obj.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)  # tight box of the mask
        cell = WORLD.cell
        r, c = obj.cell
        assert c * cell <= x0 and x1 <= (c + 1) * cell and r * cell <= y0 and y1 <= (r + 1) * cell
        assert (labels == k).sum() == obj.mask.sum()
        # the mask's pixels carry the object's colour: the dominant channel(s) of COLOURS[colour]
        mean = img[obj.mask].mean(0)
        target = np.array(COLOURS[obj.colour])
        assert np.argmax(mean) == np.argmax(target)
        for other, rgb in COLOURS.items():
            if other != obj.colour:
                # closer in direction to its own colour than to any other
                cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
                assert cos(mean - 24, target) > cos(mean - 24, np.array(rgb))
    assert (labels == -1).sum() == 224 * 224 - sum(o.mask.sum() for o in scene.objects)
    # background stays dark away from objects
    assert img[labels == -1].mean() < 40


def test_cooccurrence_knob():
    stats = WORLD.statistics("train", 3000)
    freq, cooc = np.array(stats["frequency"]), np.array(stats["cooccurrence"])
    for a, b in WORLD.pairs:
        i, j = CLASSES.index(a), CLASSES.index(b)
        assert cooc[i, j] / freq[i] > 0.85  # partner present almost always in training scenes
    test = WORLD.statistics("test", 3000)
    tf, tc = np.array(test["frequency"]), np.array(test["cooccurrence"])
    i, j = CLASSES.index("bag"), CLASSES.index("sandal")
    assert tc[i, j] / tf[i] < 0.5  # no built-in prior in evaluation scenes: many bags without a sandal
    flat = SceneWorld(seed=0, cooccur_p=0.0, eval_cooccur_p=0.0).statistics("train", 3000)
    ff, fc = np.array(flat["frequency"]), np.array(flat["cooccurrence"])
    assert fc[i, j] / ff[i] < 0.5
    # popular != uniform: the long tail makes some classes clearly more frequent
    assert freq.max() > 1.5 * freq.min()


@needs_train_images
def test_faint_partner_knob():
    """Faint objects appear only in training scenes, only as knob-added partners of a present member of their pair,
    are smaller and dimmer than normal objects, and stay in the ground truth and the caption. With the knob at 0
    the training scenes are the same scenes with every object drawn normally."""
    faint, normal = [], []
    for i in range(300):
        scene = WORLD.scene("train", i)
        img = np.asarray(scene.image).astype(float)
        for obj in scene.objects:
            contrast = float(np.abs(img[obj.mask] - 24).max(1).mean())
            (faint if obj.faint else normal).append((obj.size, contrast))
            if obj.faint:
                assert WORLD.partner[obj.cls] in scene.classes and obj.cls in scene.caption()
    # about half the pair members in a scene were added by the knob, and 60% of those are faint
    assert 0.2 < len(faint) / sum(1 for i in range(300) for c in WORLD.classes_of("train", i) if c in WORLD.partner) < 0.5
    assert max(s for s, _ in faint) < min(s for s, _ in normal)
    assert np.mean([c for _, c in faint]) < 0.5 * np.mean([c for _, c in normal])
    assert not any(o.faint for split in ("val", "test") for i in range(200) for o in WORLD.scene(split, i).objects)
    plain = SceneWorld(seed=0, faint_partner_p=0.0)
    for i in range(40):
        a, b = WORLD.scene("train", i), plain.scene("train", i)
        assert [(o.cls, o.colour, o.cell, o.item) for o in a.objects] == [(o.cls, o.colour, o.cell, o.item) for o in b.objects]
        assert not any(o.faint for o in b.objects)
        assert all(o.size == q.size for o, q in zip(a.objects, b.objects) if not o.faint)
    assert WORLD.scene("test", 3).to_dict() == plain.scene("test", 3).to_dict()


def test_cell_cover_matches_masks():
    scene = WORLD.scene("test", 4)
    cover = scene.cell_cover(8, min_share=0.2)
    labels = scene.label_map()
    for cell, k in enumerate(cover):
        r, c = divmod(cell, 8)
        block = labels[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
        shares = [(block == j).mean() for j in range(len(scene.objects))]
        if k >= 0:
            assert shares[k] == max(shares) and shares[k] >= 0.2
        else:
            assert max(shares, default=0) < 0.2
    assert (cover >= 0).any() and (cover < 0).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"max_objects": 12}, "does not fit.*9"),
    ({"min_objects": 0}, "min_objects"),
    ({"min_objects": 4, "max_objects": 2}, "min_objects"),
    ({"image_size": 60}, "too small"),
    ({"max_size": 200}, "cell size"),
    ({"pairs": (("bag", "cat"),)}, "unknown class 'cat'"),
    ({"pairs": (("bag", "sandal"), ("bag", "boot"))}, "two co-occurrence pairs"),
    ({"cooccur_p": 1.5}, r"\[0, 1\]"),
    ({"faint_partner_p": -0.1}, r"faint-partner.*\[0, 1\]"),
    ({"class_weights": {"unicorn": 1.0}}, "unknown class 'unicorn'"),
])
def test_impossible_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneWorld(**kwargs)


def test_bad_scene_requests():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        WORLD.scene("dev", 0)
    with pytest.raises(ValueError, match=">= 0"):
        WORLD.scene("train", -1)
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        WORLD.compose([("cat", "red", "top left")])
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        WORLD.compose([("bag", "pink", "top left")])
    with pytest.raises(ValueError, match="unknown position"):
        WORLD.compose([("bag", "red", "upstairs")])
    with pytest.raises(ValueError, match="share a cell"):
        WORLD.compose([("bag", "red", "top left"), ("boot", "blue", (0, 0))])
    with pytest.raises(ValueError, match="do not fit"):
        WORLD.compose([(c, "red", p) for c, p in zip(CLASSES, list(CELL_NAMES.values()) * 2)])
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        question("cat")


def test_compose_and_captions_round_trip():
    scene = WORLD.compose([("sandal", "blue", "bottom right"), ("bag", "red", "top left")])
    assert scene.caption() == "a red bag top left and a blue sandal bottom right."
    assert [o.position for o in scene.objects] == ["top left", "bottom right"]
    assert parse_caption(scene.caption()) == [{"class": "bag", "colour": "red", "position": "top left"},
                                              {"class": "sandal", "colour": "blue", "position": "bottom right"}]
    assert caption_scores(scene.caption(), scene)["exact"]
    for i in range(30):
        s = WORLD.scene("val", i)
        sc = caption_scores(s.caption(), s)
        assert sc["exact"] and sc["triple"]["f1"] == 1.0
    wrong = caption_scores("a red bag top left and a green boot center.", scene)
    assert wrong["class"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert wrong["triple"]["precision"] == 0.5
    assert "t-shirt" not in [p["class"] for p in parse_caption("a red shirt top left")]
    assert [p["class"] for p in parse_caption("a red t-shirt top left")] == ["t-shirt"]


def test_bundled_test_split_serves_eval_scenes_and_missing_train_images_name_the_fix(monkeypatch, tmp_path):
    """Without the full set (an empty folder first, no Debian package): val/test scenes render from the bundled
    test split, training layouts need only the bundled labels, and rendering a training scene names the fix."""
    from attnscope.data import fashion_mnist

    with_full = WORLD.scene("val", 3)
    monkeypatch.setenv(items.FASHION_MNIST_ENV, str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    items.clear()
    try:
        bundled = SceneWorld(seed=0).scene("val", 3)
        assert np.array_equal(np.asarray(bundled.image), np.asarray(with_full.image))
        assert SceneWorld(seed=0).classes_of("train", 5) == WORLD.classes_of("train", 5)
        with pytest.raises(FileNotFoundError, match="apt-get .*dataset-fashion-mnist"):
            SceneWorld(seed=0).scene("train", 0)
    finally:
        monkeypatch.undo()
        items.clear()
