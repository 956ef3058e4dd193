"""CHAIR: caption hallucination assessment with image relevance (Rohrbach et al., "Object Hallucination in
Image Captioning", EMNLP 2018), against exact ground truth, for any attnscope VLM.

Object words in a free caption are found with an `ObjectVocabulary` (class -> words and phrases; plurals
with -s/-es are matched too; the longest phrase wins, so "ankle boot" is one mention). Each mention is compared
with the image's ground-truth classes, as in the paper and its reference code (every object word counts, so a
hallucinated class named twice is two hallucinated mentions):

* CHAIR_i = hallucinated object mentions / all object mentions, summed over captions (the paper's instance
  metric; NaN when no caption names any object, since it is undefined then);
* CHAIR_s = captions with at least one hallucinated mention / captions;
* recall  = ground-truth classes mentioned / ground-truth classes (the coverage that a model which says
  nothing would drive to 0 while scoring a perfect CHAIR).

`chair_i_per_class` is a variant under its own name: each class counts once per caption (hallucinated classes /
mentioned classes). A caption naming no object adds nothing to either ratio's numerator or denominator (it is a
non-hallucinated caption for CHAIR_s). Intervals: 95% bootstrap over captions. Decoding, steering, sampling
seeds and sharding work as in `pope.Generator`."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .bootstrap import bootstrap
from . import shards
from .pope import Generator, method_name

DEFAULT_PROMPT = "Describe the image."


class ObjectVocabulary:
    """Maps object words in text to classes. `synonyms`: {class: [word or phrase, ...]}, lower case."""

    def __init__(self, synonyms: Mapping[str, Sequence[str]]):
        if not synonyms:
            raise ValueError("an object vocabulary needs at least one class")
        self.classes = list(synonyms)
        phrases: dict[str, str] = {}
        for cls, words in synonyms.items():
            for w in {cls, *words}:
                w = " ".join(w.lower().split())
                for form in (w, w + "s", w + "es"):
                    if phrases.get(form, cls) != cls:
                        raise ValueError(f"{form!r} names both {phrases[form]!r} and {cls!r}")
                    phrases[form] = cls
        self.phrases = phrases
        alternatives = sorted(phrases, key=len, reverse=True)
        body = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in alternatives)
        self._re = re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)

    @classmethod
    def scenes(cls) -> ObjectVocabulary:
        """The scene world's 10 classes with their synonyms."""
        from ..scenes import SYNONYMS

        return cls(SYNONYMS)

    def mentions(self, text: str) -> list[tuple[str, int, int]]:
        """(class, char start, char end) of each object word or phrase, in order."""
        return [(self.phrases[" ".join(m.group(0).lower().split())], m.start(), m.end()) for m in self._re.finditer(text)]

    def objects(self, text: str) -> list[str]:
        """The classes mentioned, once each, in order of first mention."""
        return list(dict.fromkeys(c for c, _, _ in self.mentions(text)))


def caption_record(caption: str, gold: Sequence[str], vocabulary: ObjectVocabulary) -> dict:
    """One caption against its ground truth: `mentions` (the class of every object mention, in order, repeats
    kept), `hallucinated_mentions` (how many of them name a class not in `gold`), and the classes once each:
    `mentioned`, `hallucinated`, `covered` (ground-truth classes mentioned), `gold`."""
    unknown = [g for g in gold if g not in vocabulary.classes]
    if unknown:
        raise ValueError(f"ground-truth classes {unknown} are not in the vocabulary {vocabulary.classes}")
    mentions = [c for c, _, _ in vocabulary.mentions(caption)]
    mentioned = list(dict.fromkeys(mentions))
    gold = list(dict.fromkeys(gold))
    return {"mentions": mentions, "hallucinated_mentions": sum(1 for c in mentions if c not in gold),
            "mentioned": mentioned, "hallucinated": [c for c in mentioned if c not in gold],
            "covered": [c for c in gold if c in mentioned], "gold": gold}


def chair_metrics(records: Sequence[Mapping]) -> dict:
    """CHAIR_s, CHAIR_i (per mention, the paper's), `chair_i_per_class`, recall and counts over caption records
    (see `caption_record`).

    `no_object_share` is the share of captions that name no object at all: a method that stops describing
    (answers "No" to "Describe the image.") scores CHAIR_s 0 without having stopped hallucinating.
    `mentions_per_caption` counts every object mention (repeats included). Records without `mentions` (written
    before CHAIR_i was per mention) raise: recompute them from their captions with `caption_record`.
    """
    n = len(records)
    missing = [r.get("image_id", i) for i, r in enumerate(records) if "mentions" not in r]
    if missing:
        raise ValueError(f"caption records {missing[:3]} have no per-mention list ('mentions'); rebuild them with "
                         "caption_record(caption, gold, vocabulary)")
    mentions = sum(len(r["mentions"]) for r in records)
    classes = sum(len(r["mentioned"]) for r in records)
    gold = sum(len(r["gold"]) for r in records)
    nan = float("nan")
    return {"n": n, "chair_s": sum(1 for r in records if r["hallucinated"]) / n if n else nan,
            "chair_i": sum(r["hallucinated_mentions"] for r in records) / mentions if mentions else nan,
            "chair_i_per_class": sum(len(r["hallucinated"]) for r in records) / classes if classes else nan,
            "recall": sum(len(r["covered"]) for r in records) / gold if gold else nan,
            "mentions_per_caption": mentions / n if n else nan,
            "no_object_share": sum(1 for r in records if not r["mentioned"]) / n if n else nan}


def chair(captions: Sequence[str], gold: Sequence[Sequence[str]], vocabulary: ObjectVocabulary | None = None,
          boot: int = 1000, seed: int = 0) -> dict:
    """CHAIR of given captions against given ground-truth class lists, with 95% bootstrap intervals."""
    if len(captions) != len(gold):
        raise ValueError(f"{len(captions)} captions but {len(gold)} ground-truth lists")
    vocabulary = vocabulary or ObjectVocabulary.scenes()
    records = [caption_record(c, g, vocabulary) for c, g in zip(captions, gold)]
    m = chair_metrics(records)
    m["ci"] = bootstrap(records, chair_metrics, n=boot, seed=seed, unit="caption")
    return m


@dataclass
class ChairResult:
    records: list[dict]
    metrics: dict
    config: dict

    def save(self, path: str | Path) -> Path:
        """JSON lines: one "caption" line per image, then a "summary" line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for r in self.records:
                fh.write(json.dumps({"type": "caption", **r}) + "\n")
            fh.write(json.dumps({"type": "summary", **self.metrics, "config": self.config}) + "\n")
        return path

    def table(self) -> str:
        from .bootstrap import fmt

        ci = self.metrics["ci"]
        na = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
        return ("| CHAIR_s | CHAIR_i (per mention) | recall | mentions/caption | captions naming no object | n |\n"
                "|---|---|---|---|---|---|\n"
                f"| {fmt(ci['chair_s'])} | {fmt(ci.get('chair_i', na))} | {fmt(ci['recall'])} | "
                f"{self.metrics['mentions_per_caption']:.2f} | {self.metrics['no_object_share']:.2f} | {self.metrics['n']} |")


def scene_images(world=None, n: int = 200, split: str = "test") -> tuple[list[tuple[str, list[str]]], Callable]:
    """(image id, ground-truth classes) for the first `n` scenes of `split`, and image_of(image id)."""
    from ..scenes import SceneWorld
    from .pope import _scene_image

    world = world or SceneWorld(seed=0)
    return ([(f"{split}-{i:06d}", list(world.classes_of(split, i))) for i in range(n)],
            lambda image_id: _scene_image(world, image_id))


def evaluate_chair(model, images: Sequence[tuple[str, Sequence[str]]], image_of: Callable[[str], object], *,
                   vocabulary: ObjectVocabulary | None = None, prompt: str = DEFAULT_PROMPT, steer=None,
                   max_new_tokens: int = 64, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0, out: str | Path | None = None, shard=None, boot: int = 1000,
                   progress: Callable[[int, int], None] | None = None) -> ChairResult | None:
    """Caption each image (`prompt`) and score CHAIR_s, CHAIR_i and recall against its ground-truth classes.
    `shard` as in `pope.evaluate_pope` (`merge_chair` merges "i/n" shard files)."""
    if not images:
        raise ValueError("no images to caption")
    vocabulary = vocabulary or ObjectVocabulary.scenes()
    for image_id, gold in images:
        unknown = [g for g in gold if g not in vocabulary.classes]
        if unknown:
            raise ValueError(f"image {image_id!r} has classes {unknown} outside the vocabulary {vocabulary.classes}")
    gen = Generator(model, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                    seed=seed, steer=steer)
    plan = shards.resolve(shard)
    if plan is not None and out is None:
        raise ValueError("a sharded evaluation writes its shard next to `out`; pass out=...")
    mine = plan.take(images) if plan is not None else list(images)
    rows = []
    for i, (image_id, gold) in enumerate(mine):
        caption, seconds, tokens = gen(image_of(image_id), prompt, key=image_id)
        rows.append({"image_id": image_id, "caption": caption, "seconds": seconds, "new_tokens": tokens,
                     **caption_record(caption, gold, vocabulary)})
        if progress:
            progress(i + 1, len(mine))
    settings = {"model": getattr(model, "name", ""), "weights": getattr(model, "fingerprint", None),
                "method": method_name(gen.steer), "steer": repr(gen.steer),
                "prompt": prompt, "max_new_tokens": max_new_tokens, "sample": sample, "temperature": temperature,
                "top_p": top_p, "seed": seed, "vocabulary": shards.fingerprint(vocabulary.phrases),
                "ground_truth": shards.fingerprint([[i, list(g)] for i, g in images])}
    merged = shards.exchange(plan, out, "chair", _items(images), settings, rows, _key)
    if merged is None:
        return None
    return _score(images, *merged, shards=plan.count if plan is not None else 1, out=out, boot=boot)


def merge_chair(images: Sequence[tuple[str, Sequence[str]]], out: str | Path, boot: int = 1000,
                expect: dict | None = None) -> ChairResult:
    """Merge the shard files of one CHAIR run over `images` into `out` (see `pope.merge_pope`)."""
    settings, rows, paths = shards.merge(out, "chair", _items(images), _key, expect)
    if settings.get("ground_truth") != shards.fingerprint([[i, list(g)] for i, g in images]):
        raise shards.ShardError("the shards scored other ground-truth classes for these images; merge with the images "
                                "they were run on")
    result = _score(images, settings, rows, shards=len(paths), out=out, boot=boot)
    for path in paths:
        path.unlink()
    return result


def _items(images) -> list[str]:
    return [image_id for image_id, _ in images]


def _key(row: dict) -> str:
    return row["image_id"]


def _score(images, settings: dict, rows: list[dict], shards: int, out, boot: int) -> ChairResult:
    config = settings | {"images": len(images), "processes": shards}
    for r in rows:
        r["method"] = config["method"]
    metrics = chair_metrics(rows)
    metrics["ci"] = bootstrap(rows, chair_metrics, n=boot, seed=settings["seed"], unit="caption")
    metrics["seconds_per_caption"] = sum(r["seconds"] for r in rows) / len(rows)
    metrics["seconds_per_token"] = sum(r["seconds"] for r in rows) / max(1, sum(r["new_tokens"] for r in rows))
    result = ChairResult(rows, metrics, config)
    if out is not None:
        result.save(out)
    return result
