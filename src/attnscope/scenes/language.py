"""The scene world's language: prompts, yes/no questions, caption parsing and caption accuracy.

Captions follow one grammar: `a <colour> <class> <position>` phrases in reading order, joined by ", " and a
final " and ", ending with "." ("a red bag top left and a blue sandal bottom right."). `parse_caption`
reads that grammar back leniently (missing colour or position allowed), which is what caption accuracy
scores; CHAIR (`attnscope.evaluate.chair`) needs only the object words and uses `SYNONYMS`."""
from __future__ import annotations

import re

import numpy as np

from .world import CELL_NAMES, CLASSES, COLOURS, PROBE_CONTRAST, Scene, SceneWorld, _check_class

CAPTION_PROMPT = "Describe the image."
QUESTION_TEMPLATE = "Is there a {cls} in the image?"  # POPE's template

# Words a free caption might use for each class (CHAIR maps them to the class); plurals are handled by CHAIR.
# Left out on purpose: "top" (a position word in these captions) and "shoe" (sandal, sneaker or boot).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tshirt", "t shirt", "tee"),
    "trouser": ("trouser", "trousers", "pants", "jeans"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress",),
    "coat": ("coat", "jacket"),
    "sandal": ("sandal",),
    "shirt": ("shirt",),
    "sneaker": ("sneaker", "trainer"),
    "bag": ("bag", "handbag", "purse"),
    "boot": ("boot", "ankle boot"),
}


def question(cls: str) -> str:
    """POPE's question for a class: "Is there a bag in the image?"."""
    return QUESTION_TEMPLATE.format(cls=_check_class(cls))


_COLOUR_RE = "|".join(COLOURS)
_CLASS_RE = "|".join(sorted((re.escape(c) for c in CLASSES), key=len, reverse=True))
_POS_RE = "|".join(sorted((re.escape(p) for p in CELL_NAMES.values()), key=len, reverse=True))
_PHRASE = re.compile(rf"\b(?:an?\s+)?(?:(?P<colour>{_COLOUR_RE})\s+)?(?<![\w-])(?P<cls>{_CLASS_RE})s?\b"
                     rf"(?:\s+(?P<pos>{_POS_RE})\b)?", re.IGNORECASE)


def parse_caption(text: str) -> list[dict]:
    """Object phrases of a caption in order: [{"class", "colour" or None, "position" or None}]."""
    out = []
    for m in _PHRASE.finditer(text):
        out.append({"class": m["cls"].lower(), "colour": (m["colour"] or "").lower() or None,
                    "position": (m["pos"] or "").lower() or None})
    return out


def _prf(pred: set, gold: set) -> dict:
    tp = len(pred & gold)
    p = tp / len(pred) if pred else float(not gold)
    r = tp / len(gold) if gold else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def caption_scores(text: str, scene: Scene) -> dict:
    """How well a caption describes a scene: exact match with the reference caption, and precision/recall/F1
    of the described objects at three levels: class; class+colour; class+colour+position (the full triple)."""
    found = parse_caption(text)
    gold = [(o.cls, o.colour, o.position) for o in scene.objects]
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    out = {"exact": norm(text) == norm(scene.caption()), "n_pred": len(found), "n_gold": len(gold)}
    out["class"] = _prf({f["class"] for f in found}, {g[0] for g in gold})
    out["class_colour"] = _prf({(f["class"], f["colour"]) for f in found}, {g[:2] for g in gold})
    out["triple"] = _prf({(f["class"], f["colour"], f["position"]) for f in found}, set(gold))
    return out


def probe_questions(world: SceneWorld, n: int, kind: str = "small", start: int = 0,
                    contrast: float = PROBE_CONTRAST) -> list[dict]:
    """Yes/no questions about small or faint objects: for each probe scene `world.probe(i, kind)` (i in start ..
    start+n-1), "Is there a <target class> in the image?" (truth "yes", the small/faint object) and the same question
    about a class absent from the scene (truth "no", so answering yes always scores 0.5). Each item:
    {"scene", "question", "truth", "cls", "object" (the target's index, None for the absent class), "kind"}."""
    out = []
    for i in range(start, start + n):
        scene, k = world.probe(i, kind, contrast)
        absent = [c for c in CLASSES if not scene.has(c)]
        pick = np.random.default_rng([world.seed, 6, i]).integers(len(absent))
        target = scene.objects[k].cls
        out.append({"scene": scene, "question": question(target), "truth": "yes", "cls": target, "object": k, "kind": kind})
        out.append({"scene": scene, "question": question(absent[int(pick)]), "truth": "no", "cls": absent[int(pick)],
                    "object": None, "kind": kind})
    return out
