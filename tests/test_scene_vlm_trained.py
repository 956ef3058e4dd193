"""The committed scene-vlm really sees: on held-out test scenes its yes/no answers and captions beat what a model
blind to the image can do. Greedy decoding on fixed scenes, so the numbers are deterministic for a torch build;
the thresholds are chance plus a wide margin, not the measured values (bench/results/hallucination.md has those)."""
from __future__ import annotations

import random

import pytest

from attnscope.evaluate.pope import Generator, parse_yes_no
from attnscope.scenes import CAPTION_PROMPT, CLASSES, SceneWorld, caption_scores, question


@pytest.fixture(scope="module")
def trained():
    from attnscope.models import scene_vlm

    try:
        return scene_vlm.load()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_yes_no_answers_are_far_above_chance(trained):
    """24 scenes x (one present class, one absent class): 48 balanced questions. Answering at chance (or always
    yes / always no) scores 0.5; P(>= 0.65 | chance) < 0.03."""
    world, ask, rng = SceneWorld(seed=0), Generator(trained, max_new_tokens=3), random.Random(0)
    right = 0
    for i in range(24):
        scene = world.scene("test", i)
        absent = [c for c in CLASSES if not scene.has(c)]
        for cls, truth in ((rng.choice(scene.classes), "yes"), (rng.choice(absent), "no")):
            right += parse_yes_no(ask(scene.image, question(cls))[0]) == truth
    print(f"yes/no accuracy {right / 48:.3f}")
    assert right / 48 >= 0.65


def test_captions_name_the_objects_better_than_the_class_prior(trained):
    """Class-level F1 of free captions against exact ground truth, beside the same captions scored against another
    scene's objects (what a caption that ignores the image would score)."""
    world, ask = SceneWorld(seed=0), Generator(trained, max_new_tokens=48)
    own, other = [], []
    for i in range(8):
        scene, shifted = world.scene("test", i), world.scene("test", 100 + i)
        caption = ask(scene.image, CAPTION_PROMPT)[0]
        own.append(caption_scores(caption, scene)["class"]["f1"])
        other.append(caption_scores(caption, shifted)["class"]["f1"])
    print(f"class F1 {sum(own) / 8:.3f} vs {sum(other) / 8:.3f} against other scenes")
    assert sum(own) / 8 > sum(other) / 8 + 0.15
