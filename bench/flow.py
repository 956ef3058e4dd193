#!/usr/bin/env python
"""Information flow by attention knockout (`attnscope.flow.knockout_curve`): does the picture of "Cross-modal
Information Flow in Multimodal Large Language Models" (Zhang et al., CVPR 2025) hold on scene-vlm, and the factual
recall picture of Geva et al. (EMNLP 2023) on SmolLM2?

    python bench/flow.py           # the full run (about 20 min on one CPU core)
    python bench/flow.py --small   # a smoke run for CI (a few examples, 2 windows; written as flow-small.*)
    python bench/flow.py --report  # only rewrite flow.md and flow.png from flow.json

scene-vlm: yes/no questions about test scenes of the scene world ("Is there a bag in the image?"), one about an
object in the scene (answer Yes) and one about a class absent from it (answer No) per scene; only questions the
model answers right (the answer is its most likely next token) are kept. Flows: image->question, image->last,
question->last for all; for the Yes questions also image-object->question and image-rest->question, where
image-object are the image tokens whose 28 px cell the asked object covers (>= 20%, exact masks of the scene
world) and image-rest the other image tokens.
SmolLM2: "The capital of X is" -> " Y" and a few other facts with one-token answers it gets right. Flows:
subject->last (the subject's tokens), question->last (the other words) and other->last (the first word alone,
"The": also SmolLM2's attention sink).
Each number is the mean relative change of the answer's probability, (p_knockout - p) / p, over examples, with a
95% bootstrap interval over scenes (scene-vlm: a scene's two questions resample together) or prompts."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FACTS = [  # (prompt, subject, answer) - single-token answers; kept only where SmolLM2 gets them right
    *[(f"The capital of {c} is", c, f" {a}") for c, a in [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
        ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("China", "Beijing"),
        ("Canada", "Ottawa"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
        ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
        ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Iran", "Tehran"),
        ("India", "New"), ("Australia", "Canberra"), ("Argentina", "Buenos"), ("Belgium", "Brussels"),
        ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Turkey", "Ankara"), ("Scotland", "Edinburgh"),
        ("Chile", "Santiago"), ("Mexico", "Mexico"), ("Ukraine", "Kiev"), ("Syria", "Damascus"),
        ("Iraq", "Baghdad"), ("Vietnam", "Hanoi"), ("Colombia", "Bog"), ("Venezuela", "Caracas"), ("Nepal", "Kathmandu")]],
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
    ("The Colosseum is located in the city of", "Colosseum", " Rome"),
    ("The Statue of Liberty is located in the city of", "Statue of Liberty", " New"),
    ("The currency of Japan is the", "Japan", " yen"),
    ("The official language of Brazil is", "Brazil", " Portuguese"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def third(window: tuple[int, int], layers: int) -> str:
    centre = (window[0] + window[1]) / 2
    return ("early", "middle", "late")[min(int(3 * centre / layers), 2)]


def strongest(curve, flow: str) -> dict:
    """The window where the flow's knockout lowers the answer most, with its interval and third of the stack."""
    bands = curve.intervals()[flow] if len(curve) > 1 else None
    means = curve.mean(flow)
    w = int(np.argmin(means))
    ci = bands[w] if bands else {"value": float(means[w]), "low": float("nan"), "high": float("nan")}
    return {"flow": flow, "window": list(curve.windows[w]), "where": third(curve.windows[w], curve.layers),
            "mean": ci["value"], "low": ci["low"], "high": ci["high"], "significant": bool(ci["high"] < 0)}


# --- scene-vlm --------------------------------------------------------------------------------------------------
def scene_examples(n_scenes: int, seed: int = 0):
    from attnscope.scenes import CLASSES, SceneWorld, question

    world = SceneWorld(seed=0)
    rng = np.random.default_rng(seed)
    for i in range(n_scenes):
        scene = world.scene("test", i)
        k = int(rng.integers(len(scene.objects)))
        absent = [c for c in CLASSES if c not in scene.classes]
        yield scene, question(scene.objects[k].cls), "Yes", k
        yield scene, question(str(rng.choice(absent))), "No", None


def object_positions(model, scene, text: str, k: int) -> tuple[list[int], list[int]]:
    """Image token positions whose cell object k covers (>= 20%) and the other image token positions."""
    tmap = model.token_maps(model.encode(text, image=scene.image))["language"][0]
    rows, cols = tmap.grids[0]
    cover = scene.cell_cover(rows)
    grid = tmap.image_positions(0)
    obj = [grid[c] for c in range(rows * cols) if cover[c] == k]
    return obj, [p for p in grid if p not in obj]


def run_scene_vlm(args) -> dict:
    import torch

    import attnscope
    from attnscope.flow import KnockoutCurve, knockout_curve

    model = attnscope.load("scene-vlm")
    yes, no, seen, skipped = [], [], 0, []
    t0 = time.time()
    for scene, text, answer, k in scene_examples(args.scenes):
        seen += 1
        x = model.encode(text, image=scene.image)
        with torch.no_grad():
            top = int(model.hf(**x).logits[0, -1].argmax())
        if model.tokenizer.decode([top]) != answer:
            skipped.append({"scene": scene.id, "question": text, "answer": answer, "said": model.tokenizer.decode([top])})
            continue
        extra, flows = None, ["image->question", "image->last", "question->last"]
        if k is not None:
            obj, rest = object_positions(model, scene, text, k)
            if obj:
                extra = {"image-object": obj, "image-rest": rest}
                flows += ["image-object->question", "image-rest->question"]
        curve = knockout_curve(model, text, image=scene.image, answer=answer, window=args.window, stride=args.stride,
                               flows=flows, extra_sets=extra, group=scene.id)
        (yes if extra else no).append(curve)
        log(f"scene-vlm {seen}/{2 * args.scenes} {scene.id} {text!r} -> {answer}: p={curve.base[0]:.3f}")
    seconds = time.time() - t0
    shared = ["image->question", "image->last", "question->last"]
    all_curve = KnockoutCurve.combine([c.select(shared) for c in yes + no])
    obj_curve = KnockoutCurve.combine(yes) if yes else None
    return {"model": "scene-vlm", "curve": all_curve, "object_curve": obj_curve, "questions": seen,
            "kept": len(yes) + len(no), "kept_yes": len(yes), "skipped": skipped, "seconds": seconds,
            "forwards": sum(len(c.windows) * len(c.flows) + 1 for c in yes + no) + seen}


# --- SmolLM2 ----------------------------------------------------------------------------------------------------
def run_smollm2(args) -> dict:
    import torch

    import attnscope
    from attnscope.flow import KnockoutCurve, knockout_curve

    model = attnscope.load("smollm2-135m")
    curves, skipped, sink, single = [], [], [], []
    t0 = time.time()
    facts = FACTS[: args.facts] if args.facts else FACTS
    for prompt, subject, answer in facts:
        x = model.encode(prompt, chat=False)
        tid = model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            top = int(model.hf(**x).logits[0, -1].argmax())
        if top != tid:
            skipped.append({"prompt": prompt, "answer": answer, "said": model.tokenizer.decode([top])})
            continue
        first, rest = prompt.split(" ", 1)
        with torch.no_grad(), attnscope.capture(model, queries="last") as trace:
            model.hf(**x)
        sink.append([float(trace.attention("text", layer)[0, :, 0, 0].mean()) for layer in range(model.streams["text"])])
        curves.append(knockout_curve(model, prompt, question=rest, subject=subject, answer=tid, chat=False,
                                     window=args.window, stride=args.text_stride,
                                     flows=["subject->last", "question->last", "other->last"]))
        single.append(knockout_curve(model, prompt, question=rest, subject=subject, answer=tid, chat=False,
                                     window=1, stride=args.text_stride, flows=["subject->last"]))
    log(f"smollm2: {len(curves)}/{len(facts)} facts right")
    sink = np.array(sink)  # [prompts, layers]: the last row's attention on the first word, mean over heads
    return {"model": "smollm2-135m", "curve": KnockoutCurve.combine(curves), "prompts": len(facts),
            "kept": len(curves), "skipped": skipped, "seconds": time.time() - t0,
            "single_layer": KnockoutCurve.combine(single),
            "first_word_attention": {"mean": float(sink.mean()), "per_layer": sink.mean(0).round(4).tolist()}}


# --- report -----------------------------------------------------------------------------------------------------
def pct(c: dict) -> str:
    if np.isnan(c["low"]):
        return f"{100 * c['mean']:+.1f}%"
    return f"{100 * c['mean']:+.1f}% [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"


def object_timing(oc, iq: dict, ob: dict) -> str:
    """Does the asked object's flow come after the whole image's? Compared at the whole image's strongest window."""
    w = oc.windows.index(tuple(iq["window"]))
    at = oc.intervals()["image-object->question"][w]
    same = at["low"] <= ob["high"] and ob["low"] <= at["high"]
    return (f" At the whole image's strongest window (layers {iq['window'][0]}-{iq['window'][1]}) blocking the object "
            f"alone already gives {pct({'mean': at['value'], 'low': at['low'], 'high': at['high']})}, "
            + ("as much as at its own peak (intervals overlap): object-specific and general image information enter the "
               "question in the same early layers on this model, not one after the other." if same else
               "clearly less than at its own peak: the object's information enters the question after the whole "
               "image's."))


def verdicts(vlm: dict, text: dict) -> list[str]:
    """The paper's claims, each checked against the numbers of this run."""
    c = vlm["curve"]
    iq, il, ql = (strongest(c, f) for f in ("image->question", "image->last", "question->last"))
    out = [
        f"* **General image information flows into the question early** (Zhang et al.: blocking image->question in "
        f"shallow layers lowers the answer most): image->question is strongest at layers {iq['window'][0]}-"
        f"{iq['window'][1]} ({iq['where']} third), {pct(iq)}. "
        + ("**Holds.**" if iq["where"] == "early" and iq["significant"] else "**Does not hold as stated.**"),
        f"* **The question carries the image to the last position later** (question->last strongest after "
        f"image->question): question->last is strongest at layers {ql['window'][0]}-{ql['window'][1]} "
        f"({ql['where']} third), {pct(ql)}. "
        + ("**Holds.**" if ql["window"][0] > iq["window"][0] and ql["significant"] else "**Does not hold as stated.**"),
        f"* **Little flows from the image straight into the last position** (image->last is the weakest flow): its "
        f"strongest window, layers {il['window'][0]}-{il['window'][1]}, {pct(il)}, against {pct(iq)} and {pct(ql)}. "
        + ("**Holds.**" if abs(il["mean"]) < min(abs(iq["mean"]), abs(ql["mean"])) else "**Does not hold.**"),
    ]
    oc = vlm.get("object_curve")
    if oc is not None:
        ob, rs = strongest(oc, "image-object->question"), strongest(oc, "image-rest->question")
        sizes = [len(e["sets"]["image-object"]) for e in oc.examples]
        out.append(
            f"* **Object-specific information flows into the question in the middle layers** (Yes questions only, "
            f"{len(oc)} of them; the asked object's image tokens, {np.mean(sizes):.1f} of 64 on average, against the "
            f"other image tokens): image-object->question is strongest at layers {ob['window'][0]}-{ob['window'][1]} "
            f"({ob['where']} third), {pct(ob)}; image-rest->question at layers {rs['window'][0]}-{rs['window'][1]} "
            f"({rs['where']} third), {pct(rs)}. "
            + ("**Holds.**" if ob["where"] == "middle" and ob["significant"] else "**Does not hold as stated.**")
            + object_timing(oc, iq, ob))
    t = text["curve"]
    sl, qt, ot = (strongest(t, f) for f in ("subject->last", "question->last", "other->last"))
    out.append(
        f"* **SmolLM2, factual recall** (Geva et al.: the subject's attribute is read into the last position in "
        f"middle-upper layers, the other words earlier): subject->last is strongest at layers {sl['window'][0]}-"
        f"{sl['window'][1]} ({sl['where']} third), {pct(sl)}; question->last (the other words) at "
        f"{qt['window'][0]}-{qt['window'][1]} ({qt['where']} third), {pct(qt)}. "
        + ("**Holds.**" if sl["window"][0] > qt["window"][0] and sl["where"] != "early" and sl["significant"]
           else "**Does not hold as stated.**")
        + f" other->last (the first word alone) at {ot['window'][0]}-{ot['window'][1]}, {pct(ot)}: "
        + (f"that word is SmolLM2's attention sink (it takes {sink['mean']:.0%} of the last row's attention, mean "
           f"over heads, layers and prompts, {min(sink['per_layer']):.0%}-{max(sink['per_layer']):.0%} per layer), so "
           "blocking it changes the normalisation of every row rather than one flow of information."
           if (sink := text.get("first_word_attention")) else "the first word is a typical attention sink."))
    one = text.get("single_layer")
    if one is not None:
        means = one.mean("subject->last")
        top = strongest(one, "subject->last")
        rest = np.delete(means, int(np.argmin(means)))
        out.append(f"* **SmolLM2, one layer at a time** (subject->last, window 1): layer {top['window'][0]} alone gives "
                   f"{pct(top)}; no other layer moves the answer by more than {100 * np.abs(rest).max():.0f}% on average."
                   + (" The subject's information reaches the last position through that one layer's attention."
                      if top["significant"] and abs(top["mean"]) > 3 * np.abs(rest).max() else ""))
    return out


def plot(vlm: dict, text: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(vlm["curve"], "scene-vlm: role flows (all kept questions)")]
    if vlm.get("object_curve") is not None:
        panels.append((vlm["object_curve"].select(["image-object->question", "image-rest->question"]),
                       "scene-vlm: asked object vs rest of the image (Yes)"))
    panels.append((text["curve"], "SmolLM2: factual recall"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6))
    for ax, (curve, title) in zip(np.atleast_1d(axes), panels):
        curve.plot(ax=ax, title=f"{title}, n={len(curve)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict, vlm: dict, text: dict, small: bool) -> str:
    L = ["# Information flow by attention knockout", ""]
    if small:
        L += ["**Small smoke run (`--small`): a few examples and windows; not for quoting.**", ""]
    L += [f"Command: `{res['command']}` ({res['platform']}, torch {res['torch']}, transformers {res['transformers']}).",
          "",
          "Attention knockout (`steer.Knockout`: a `MaskKeys` edit, SDPA kept) blocks the target set's query rows from "
          "the source set's keys in a window of consecutive language layers; the number is the answer token's "
          "relative probability change (p_knockout - p) / p, mean over examples, 95% bootstrap interval "
          "(`evaluate/bootstrap.py`; scene-vlm resamples scenes). Method and sets: `src/attnscope/flow/`. "
          "The knockout equals the model's own eager attention with a hand-built mask to 1e-5 in probability "
          "(`tests/test_flow_knockout.py`, `tests/test_flow_scene_vlm.py`).", "",
          f"![knockout curves](flow{'-small' if small else ''}.png)", "",
          "## What holds of the papers' picture", "", *verdicts(vlm, text), ""]
    for part, label in ((vlm, "scene-vlm"), (text, "SmolLM2-135M")):
        c = part["curve"]
        L += [f"## {label}", "",
              f"{part['kept']} of {part.get('questions', part.get('prompts'))} examples answered right and kept; window "
              f"{c.window} layers of {c.layers}, stride {c.params.get('stride')}; {part['seconds']:.0f} s.", "",
              c.to_markdown(), ""]
        if part is text and text.get("single_layer") is not None:
            L += ["subject->last one layer at a time (window 1):", "", text["single_layer"].to_markdown(), ""]
        if part is vlm and vlm.get("object_curve") is not None:
            oc = vlm["object_curve"].select(["image-object->question", "image-rest->question"])
            L += [f"Yes questions only ({len(oc)}): the asked object's image tokens against the rest.", "", oc.to_markdown(), ""]
    if vlm.get("forwards"):
        L += [f"Cost: one forward per window and flow plus one, {vlm['forwards']} scene-vlm forwards in "
              f"{vlm['seconds']:.0f} s ({vlm['seconds'] / max(vlm['forwards'], 1):.2f} s each, one CPU thread).", ""]
    return "\n".join(L)


def rewrite_report(args) -> int:
    from attnscope.flow import KnockoutCurve

    stem = "flow-small" if args.small else "flow"
    doc = json.loads((args.out / f"{stem}.json").read_text())
    parts = []
    for key in ("scene_vlm", "smollm2"):
        part = dict(doc[key])
        part["curve"] = KnockoutCurve.from_dict(part["curve"])
        for extra in ("object_curve", "single_layer"):
            if part.get(extra) is not None:
                part[extra] = KnockoutCurve.from_dict(part[extra])
        parts.append(part)
    vlm, text = parts
    plot(vlm, text, args.out / f"{stem}.png")
    doc["verdicts"] = verdicts(vlm, text)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (args.out / f"{stem}.md").write_text(report(doc, vlm, text, doc.get("small", False)))
    log(f"rewrote {args.out / stem}.md/.png from {stem}.json")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a smoke run for CI (written as flow-small.*)")
    ap.add_argument("--scenes", type=int, default=20, help="test scenes (two questions each)")
    ap.add_argument("--facts", type=int, default=0, help="first N factual prompts (0: all)")
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--stride", type=int, default=3, help="scene-vlm window stride")
    ap.add_argument("--text-stride", type=int, default=1, help="SmolLM2 window stride")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md and .png from the .json of a run")
    args = ap.parse_args(argv)
    if args.report:
        return rewrite_report(args)
    if args.small:
        args.scenes, args.facts, args.window, args.stride, args.text_stride = 2, 3, 15, 15, 15
    import torch
    import transformers

    torch.set_num_threads(1)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    res = {"command": f"python bench/flow.py {argv_text}".strip(), "platform": platform.platform(),
           "torch": torch.__version__, "transformers": transformers.__version__, "small": args.small}
    vlm = run_scene_vlm(args)
    text = run_smollm2(args)
    stem = "flow-small" if args.small else "flow"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(vlm, text, args.out / f"{stem}.png")
    doc = dict(res)
    for key, part in (("scene_vlm", vlm), ("smollm2", text)):
        doc[key] = {k: v for k, v in part.items() if k not in ("curve", "object_curve", "single_layer")}
        doc[key]["curve"] = part["curve"].to_dict()
        for extra in ("object_curve", "single_layer"):
            if part.get(extra) is not None:
                doc[key][extra] = part[extra].to_dict()
    doc["verdicts"] = verdicts(vlm, text)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (args.out / f"{stem}.md").write_text(report(res, vlm, text, args.small))
    log(f"wrote {args.out / stem}.md/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
