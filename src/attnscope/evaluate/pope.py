"""POPE: polling-based object probing (Li et al., "Evaluating Object Hallucination in Large Vision-Language
Models", EMNLP 2023), built from exact ground truth, for any attnscope VLM.

Each image gets up to `per_image` (3) yes-questions about objects it holds and as many no-questions about
objects it does not; "Is there a {object} in the image?". The no-objects are drawn three ways, giving POPE's
three splits over the same images and the same yes-questions:
* random: uniformly among absent classes;
* popular: the most frequent absent classes (frequency from the training data's ground truth);
* adversarial: the absent classes that co-occur most with the present ones (co-occurrence counts from the
  training data): what a model that leans on a learned "bag goes with sandal" prior says yes to.

Answers are parsed strictly: the first word must be "yes" or "no" and the other word must not appear;
anything else is *unparseable* and counted separately (it is neither a yes nor a no; it counts as wrong in
accuracy and as a miss in recall). The reference POPE code instead reads the first sentence and calls any answer
without the exact word "No", "no" or "not" a yes, so an empty or off-topic answer becomes a yes
(`parse_pope_official` reproduces it exactly, for comparison; `anchor_parse_disagreements` counts the answers where
the two readings differ).

Metrics per split: accuracy, precision, recall, F1 (yes is the positive class), yes-ratio, unparseable rate,
with 95% bootstrap intervals that resample whole images. Decoding is greedy unless `sample=True` (then each
question is sampled with its own seed, derived from (seed, image, question), so results do not depend on
order or sharding). Questions asked twice (the yes-questions are shared by the three splits) are answered once.

Sharding (`evaluate/shards.py`): `evaluate_pope(..., shard=True)` under `accelerate launch` or `torchrun`, on one
machine or several, answers every K-th distinct question on each of K processes and rank 0 merges them into `out`;
`shard="i/n"` runs one shard on its own and `merge_pope` merges the n shard files. The merged result equals the
unsharded run's, whatever the number of shards."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import shards
from .bootstrap import bootstrap

SPLITS = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {object} in the image?"


# --- answers -----------------------------------------------------------------------------------------------------
def parse_yes_no(text: str) -> str | None:
    """"yes", "no", or None (unparseable): the first word decides, and the answer must not contain the other."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words or words[0] not in ("yes", "no"):
        return None
    other = "no" if words[0] == "yes" else "yes"
    return None if other in words else words[0]


def parse_pope_official(text: str) -> str:
    """POPE's own reading of an answer (the reference `evaluate.py` of Li et al., 2023), reproduced exactly: keep
    the text before the first '.', remove commas, split on single spaces, and answer "no" if one of the words is
    exactly `No`, `not` or `no` (case-sensitive: "NO" and "No!" read as yes), otherwise "yes" (so an empty,
    garbled or off-topic answer counts as yes). attnscope scores with `parse_yes_no`; this is for comparison."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


parse_anchor = parse_pope_official  # its earlier name, kept for code that imports it


# --- questions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PopeQuestion:
    split: str
    image_id: str
    object: str
    label: bool  # True: the object is in the image
    question: str


def _check_vocab(objects, classes: Sequence[str], image_id: str) -> None:
    unknown = [o for o in objects if o not in classes]
    if unknown:
        raise ValueError(f"image {image_id!r} has objects {unknown} outside the vocabulary {list(classes)}; "
                         "POPE asks about vocabulary classes only")


def build_pope(images: Sequence[tuple[str, Sequence[str]]], classes: Sequence[str], frequency: Sequence[float],
               cooccurrence: Sequence[Sequence[float]], per_image: int = 3, n: int | None = None, seed: int = 0,
               splits: Sequence[str] = SPLITS, template: str = TEMPLATE) -> list[PopeQuestion]:
    """POPE questions from ground truth: `images` is [(image id, present classes)], `classes` the vocabulary,
    `frequency[k]` and `cooccurrence[k][j]` training-set counts (class k; classes k and j in one image).

    Per image: min(per_image, #present, #absent) yes-questions (the same in every split) and as many
    no-questions per split. Images are used in order until each split holds `n` questions (if given; the
    last image's pairs may be cut to hit `n` exactly, keeping yes/no balanced to within one)."""
    classes = list(classes)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown POPE splits {bad}; splits are {SPLITS}")
    freq = np.asarray(frequency, float)
    cooc = np.asarray(cooccurrence, float)
    if freq.shape != (len(classes),) or cooc.shape != (len(classes), len(classes)):
        raise ValueError(f"frequency must have {len(classes)} entries and cooccurrence be {len(classes)}x{len(classes)}")
    out: list[PopeQuestion] = []
    counts = dict.fromkeys(splits, 0)
    for image_id, present in images:
        if n is not None and all(c >= n for c in counts.values()):
            break
        present = list(dict.fromkeys(present))
        _check_vocab(present, classes, image_id)
        absent = [c for c in classes if c not in present]
        k = min(per_image, len(present), len(absent))
        if k == 0:
            continue
        rng = np.random.default_rng([seed, int(hashlib.blake2b(image_id.encode(), digest_size=4).hexdigest(), 16)])
        yes = [present[i] for i in sorted(rng.choice(len(present), k, replace=False))]
        # ties broken by a fixed random order per image, so equal counts do not always favour the same class
        tiebreak = {c: r for c, r in zip(absent, rng.permutation(len(absent)))}
        idx = {c: classes.index(c) for c in classes}
        negatives = {
            "random": [absent[i] for i in rng.choice(len(absent), k, replace=False)],
            "popular": sorted(absent, key=lambda c: (-freq[idx[c]], tiebreak[c]))[:k],
            "adversarial": sorted(absent, key=lambda c: (-sum(cooc[idx[p], idx[c]] for p in present), tiebreak[c]))[:k],
        }
        for split in splits:
            pairs = [(o, True) for o in yes] + [(o, False) for o in negatives[split]]
            order = [val for pair in zip(pairs[:k], pairs[k:]) for val in pair]  # yes, no, yes, no ...
            if n is not None:
                order = order[:max(0, n - counts[split])]
            for obj, label in order:
                out.append(PopeQuestion(split, image_id, obj, label, template.format(object=obj)))
            counts[split] += len(order)
    if n is not None and any(c < n for c in counts.values()):
        raise ValueError(f"the images give only {counts} questions; pass more images or a smaller n")
    return out


def scene_questions(world=None, n: int = 500, scene_split: str = "test", seed: int = 0, per_image: int = 3,
                    stats_scenes: int = 4000, splits: Sequence[str] = SPLITS) -> tuple[list[PopeQuestion], Callable]:
    """POPE over the scene world: `n` questions per split from `scene_split` scenes, ranked by the training
    scenes' class frequency and co-occurrence. Returns (questions, image_of) where image_of(image_id) renders
    the scene."""
    from ..scenes import CLASSES, SceneWorld, question

    world = world or SceneWorld(seed=0)
    stats = world.statistics("train", stats_scenes)

    def images():
        i = 0
        while True:
            yield f"{scene_split}-{i:06d}", world.classes_of(scene_split, i)
            i += 1

    # the scene's own question wording (it also refuses unknown classes)
    qs = build_pope(_Until(images(), n, per_image), CLASSES, stats["frequency"], stats["cooccurrence"], per_image,
                    n, seed, splits, template=TEMPLATE)
    assert all(q.question == question(q.object) for q in qs)
    return qs, lambda image_id: _scene_image(world, image_id)


class _Until:
    """Images from a generator, enough for n questions per split (each image gives at most per_image each)."""

    def __init__(self, gen, n, per_image):
        self.gen, self.limit = gen, 4 * n // max(1, per_image) + 64

    def __iter__(self):
        for i, item in enumerate(self.gen):
            if i >= self.limit:
                return
            yield item


def _scene_image(world, image_id: str):
    from ..scenes import Scene

    return world.scene(*Scene.parse_id(image_id)).image


# --- generation --------------------------------------------------------------------------------------------------
class NotAVisionLanguageModel(TypeError):
    """The model cannot take an image in its prompt."""


def resolve_steer(spec):
    """A steering method from a spec string "NAME[:k=v,...]" (built by `attnscope.steer.parse`), an already-built
    method object (or a list of them), or None."""
    if spec is None or not isinstance(spec, str):
        return spec
    try:
        from ..steer import parse
    except ImportError as err:
        raise ImportError(f"steering {spec!r} needs attnscope.steer, which this installation lacks ({err})") from err
    return parse(spec)


def method_name(method) -> str:
    if method is None:
        return "baseline"
    if isinstance(method, (list, tuple)):
        return "+".join(method_name(m) for m in method)
    return getattr(method, "name", None) or type(method).__name__


def _stable_seed(*parts) -> int:
    return int(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).hexdigest(), 16) % (2**63)


@dataclass
class Generator:
    """Answers one text prompt about one image with `model` (an attnscope Model of a VLM): the chat prompt,
    greedy or seeded sampling, the steering method applied around each call, and the wall time per answer."""

    model: object
    max_new_tokens: int = 8
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    steer: object = None
    _checked: bool = field(default=False, repr=False)

    def __post_init__(self):
        self.steer = resolve_steer(self.steer)
        m = self.model
        config = getattr(getattr(m, "hf", None), "config", None)
        image_token = getattr(config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(config, "image_token_index", None)
        has_images = getattr(m, "image_processor", None) is not None and getattr(m, "tokenizer", None) is not None
        if config is None or image_token is None or not has_images:
            raise NotAVisionLanguageModel(
                f"{getattr(m, 'name', type(m).__name__)} is not a vision-language model with image tokens (it needs "
                "a config image_token_id, a tokenizer and an image processor); POPE and CHAIR ask about images: "
                "load a VLM such as attnscope.load('scene-vlm')")
        self.image_token_id = int(image_token)

    def prompt(self, text: str) -> str:
        m = self.model
        if hasattr(m, "prompt"):
            return m.prompt(text)
        proc = getattr(m, "processor", None)
        if proc is not None and getattr(proc, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return proc.apply_chat_template(msgs, add_generation_prompt=True)
        token = getattr(proc, "image_token", None) or "<image>"
        return f"{token}\n{text}"

    def _steer_context(self):
        if self.steer is None:
            return contextlib.nullcontext()
        from ..steer import steer

        items = self.steer if isinstance(self.steer, (list, tuple)) else [self.steer]
        return steer(self.model, *items)

    def __call__(self, image, text: str, key: str = "") -> tuple[str, float, int]:
        """(answer text, seconds, new tokens) for one image and prompt text; `key` seeds sampling."""
        inputs = self.model.encode(self.prompt(text), image)
        if not self._checked:
            if not bool((inputs["input_ids"] == self.image_token_id).any()):
                raise NotAVisionLanguageModel(f"{self.model.name}'s prompt holds no image tokens after encoding; its "
                                              "processor did not insert the image")
            self._checked = True
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample}
        if self.steer is not None:  # e.g. FastVRerank decodes without a KV cache
            from ..steer import generate_kwargs

            kwargs |= generate_kwargs(self.steer if isinstance(self.steer, (list, tuple)) else [self.steer])
        if self.sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
            torch.manual_seed(_stable_seed(self.seed, key, text))
        start = time.perf_counter()
        with torch.no_grad(), self._steer_context():
            out = self.model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.model.tokenizer.decode(new, skip_special_tokens=True).strip(), seconds, int(new.numel())


# --- evaluation --------------------------------------------------------------------------------------------------
def pope_metrics(records: Sequence[Mapping]) -> dict:
    """accuracy, precision, recall, f1, yes_ratio, unparseable and n over records with "label" (bool) and
    "parsed" ("yes" | "no" | None)."""
    n = len(records)
    if not n:
        return {"n": 0}
    tp = sum(1 for r in records if r["label"] and r["parsed"] == "yes")
    fp = sum(1 for r in records if not r["label"] and r["parsed"] == "yes")
    tn = sum(1 for r in records if not r["label"] and r["parsed"] == "no")
    fn = sum(1 for r in records if r["label"] and r["parsed"] != "yes")
    yes = tp + fp
    precision = tp / yes if yes else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if yes and precision + recall else 0.0
    return {"n": n, "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes / n, "unparseable": sum(1 for r in records if r["parsed"] is None) / n}


@dataclass
class PopeResult:
    """Per-question records and per-split metrics with 95% intervals (cluster bootstrap over images)."""

    records: list[dict]
    metrics: dict
    config: dict

    def save(self, path: str | Path) -> Path:
        """JSON lines: one "answer" line per question, then one "summary" line per split."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for r in self.records:
                fh.write(json.dumps({"type": "answer", **r}) + "\n")
            for split, m in self.metrics.items():
                fh.write(json.dumps({"type": "summary", "split": split, **m, "config": self.config}) + "\n")
        return path

    def table(self) -> str:
        from .bootstrap import fmt

        rows = ["| split | accuracy | precision | recall | F1 | yes-ratio | unparseable | n |", "|---|---|---|---|---|---|---|---|"]
        for split, m in self.metrics.items():
            ci = m["ci"]
            rows.append(f"| {split} | {fmt(ci['accuracy'])} | {fmt(ci['precision'])} | {fmt(ci['recall'])} | "
                        f"{fmt(ci['f1'])} | {m['yes_ratio']:.3f} | {m['unparseable']:.3f} | {m['n']} |")
        return "\n".join(rows)


def summarize(records: Sequence[dict], boot: int = 1000, seed: int = 0) -> dict:
    out = {}
    for split in dict.fromkeys(r["split"] for r in records):
        rs = [r for r in records if r["split"] == split]
        m = pope_metrics(rs)
        m["ci"] = bootstrap(rs, pope_metrics, groups=[r["image_id"] for r in rs], n=boot, seed=seed, unit="image")
        m["ci"].pop("n", None)
        m["seconds_per_answer"] = float(np.mean([r["seconds"] for r in rs]))
        m["anchor_parse_disagreements"] = sum(1 for r in rs if (r["parsed"] or "none") != parse_pope_official(r["answer"]))
        out[split] = m
    return out


def evaluate_pope(model, questions: Sequence[PopeQuestion], image_of: Callable[[str], object], *, steer=None,
                  max_new_tokens: int = 8, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, out: str | Path | None = None, shard=None, boot: int = 1000,
                  progress: Callable[[int, int], None] | None = None) -> PopeResult | None:
    """Ask every question, parse strictly, and score per split. `image_of(image_id)` gives the image.

    `shard` (`evaluate/shards.py`): True under a launcher (`accelerate launch`, `torchrun`; one machine or several):
    each process answers its share and rank 0 returns the merged result (the others None); "i/n" answers shard i of
    n, writes it next to `out` and returns None (`merge_pope` merges the n files). Either way `out` is required,
    and the merged result equals the unsharded one."""
    if not questions:
        raise ValueError("no POPE questions to ask")
    gen = Generator(model, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                    seed=seed, steer=steer)
    plan = shards.resolve(shard)
    if plan is not None and out is None:
        raise ValueError("a sharded evaluation writes its shard next to `out`; pass out=...")
    unique = list(dict.fromkeys((q.image_id, q.question) for q in questions))
    mine = plan.take(unique) if plan is not None else unique
    rows = []
    last_image, image = None, None
    for i, (image_id, text) in enumerate(mine):
        if image_id != last_image:
            image, last_image = image_of(image_id), image_id
        answer, seconds, tokens = gen(image, text, key=image_id)
        rows.append({"image_id": image_id, "question": text, "answer": answer, "seconds": seconds, "new_tokens": tokens})
        if progress:
            progress(i + 1, len(mine))
    settings = {"model": getattr(model, "name", ""), "weights": getattr(model, "fingerprint", None),
                "method": method_name(gen.steer), "steer": repr(gen.steer),
                "max_new_tokens": max_new_tokens, "sample": sample, "temperature": temperature, "top_p": top_p,
                "seed": seed}
    merged = shards.exchange(plan, out, "pope", unique, settings, rows, _key)
    if merged is None:
        return None
    return _score(questions, *merged, shards=plan.count if plan is not None else 1, out=out, boot=boot)


def merge_pope(questions: Sequence[PopeQuestion], out: str | Path, boot: int = 1000,
               expect: dict | None = None) -> PopeResult:
    """Merge the shard files `out.shard-i-of-n.jsonl` of one POPE run over `questions` (written with `shard="i/n"`)
    into `out`, checked (every shard present and complete, one item list, one set of settings): the result equals
    the unsharded run's. The shard files are removed after `out` is written. `expect`: settings the shards must have
    run with (`shards.merge`)."""
    unique = list(dict.fromkeys((q.image_id, q.question) for q in questions))
    settings, rows, paths = shards.merge(out, "pope", unique, _key, expect)
    result = _score(questions, settings, rows, shards=len(paths), out=out, boot=boot)
    for path in paths:
        path.unlink()
    return result


def _key(row: dict) -> tuple[str, str]:
    return row["image_id"], row["question"]


def _score(questions, settings: dict, rows: list[dict], shards: int, out, boot: int) -> PopeResult:
    answers = {_key(r): r for r in rows}
    config = settings | {"questions": len(questions), "processes": shards}
    records = []
    for q in questions:
        a = {k: v for k, v in answers[(q.image_id, q.question)].items() if k not in ("image_id", "question")}
        records.append(asdict(q) | a | {"parsed": parse_yes_no(a["answer"]), "method": config["method"]})
    result = PopeResult(records, summarize(records, boot, settings["seed"]), config)
    if out is not None:
        result.save(out)
    return result
