#!/usr/bin/env python
"""Benchmark of `attnscope.ground` on scene-vlm with exact ground truth, written to bench/results/grounding.md/.json.

    python bench/grounding.py            # full run (about 20-30 min on 2 CPU cores)
    python bench/grounding.py --small    # a smoke run on one object and one probe scene (what CI runs; results marked as small)

(1) Localisation: for every object of the first `--scenes` test scenes, "Is there a <class> in the image?" is
grounded by each method, with the query rows at the answer position (the papers' form) or at the class word
(`target=`); pointing accuracy, box IoU and energy inside the object's exact mask, each beside the random map
(the same box and point rules on U(0,1) values), with 95% cluster-bootstrap intervals over scenes.
(2) Crop and re-ask: on probe scenes (`SceneWorld.probe`, one object drawn small or faint) the yes/no question about
the small/faint object and about an absent class, answered plainly, with the crop alone, and with both views
(original + crop, as in ViCrop); accuracy with intervals, and the cost: model passes and prompt tokens per answer,
and wall time per answer relative to the plain answer (medians, interleaved in one process)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "src"))

import attnscope  # noqa: E402
from attnscope.evaluate import grounding as metrics  # noqa: E402
from attnscope.evaluate.bootstrap import FewUnitsWarning, bootstrap, fmt  # noqa: E402
from attnscope.evaluate.pope import parse_yes_no  # noqa: E402
from attnscope.ground import Grounding, reask  # noqa: E402
from attnscope.scenes import SceneWorld, probe_questions, question  # noqa: E402

RUNS = [("relative", None), ("relative", "word"), ("gradattn", None), ("gradattn", "word"), ("flow", "word"),
        ("tag", None), ("tag", "word")]


def name(method, target):
    return f"{method} ({'class word' if target else 'answer position'})"


def localisation(model, world, n_scenes, per_scene=None):
    rows = {name(*r): [] for r in RUNS} | {"random": []}
    groups, seconds = [], {name(*r): [] for r in RUNS}
    for i in range(n_scenes):
        scene = world.scene("test", i)
        for obj in scene.objects[:per_scene]:
            groups.append(scene.id)
            q = question(obj.cls)
            for method, target in RUNS:
                start = time.perf_counter()
                g = attnscope.ground(model, scene.image, q, method=method, target=obj.cls if target else None)
                seconds[name(method, target)].append(time.perf_counter() - start)
                rows[name(method, target)].append(metrics.score(g, obj.mask, obj.box))
            rows["random"].append(metrics.score(Grounding.random(g, seed=len(groups)), obj.mask, obj.box))
    summary = {k: metrics.summarise(v, groups) for k, v in rows.items()}
    return summary, {k: statistics.median(v) for k, v in seconds.items()}, len(groups)


def crop_vs_plain(model, world, n_probe, kinds):
    out, res_diffs = {}, {}
    for kind in kinds:
        items = probe_questions(world, n_probe, kind)
        answers = {m: [] for m in ("none", "crop", "both")}
        seconds = {m: [] for m in answers}
        costs = {m: None for m in answers}
        for item in items:
            for mode in answers:  # interleaved, so CPU contention hits every mode alike
                start = time.perf_counter()
                r = reask(model, item["scene"].image, item["question"], mode=mode, target=item["cls"])
                seconds[mode].append(time.perf_counter() - start)
                answers[mode].append(float(parse_yes_no(r.answer) == item["truth"]))
                costs[mode] = r.cost
        groups = [it["scene"].id for it in items]
        truths = [it["truth"] for it in items]
        res = {}
        for mode in ("crop", "both"):  # paired: the same questions, resampled together by scene
            pairs = list(zip(answers[mode], answers["none"]))
            diff = bootstrap(pairs, lambda rs: float(np.mean([a - b for a, b in rs])), groups, unit="scene")
            res_diff = res_diffs.setdefault(kind, {})
            res_diff[mode] = diff["value"]
        for mode, right in answers.items():
            rows = list(zip(right, truths))
            res[mode] = bootstrap(rows, lambda rs: {
                "accuracy": float(np.mean([r for r, _ in rs])),
                "accuracy_yes": float(np.mean([r for r, t in rs if t == "yes"])) if any(t == "yes" for _, t in rs) else float("nan"),
                "accuracy_no": float(np.mean([r for r, t in rs if t == "no"])) if any(t == "no" for _, t in rs) else float("nan")},
                groups, unit="scene")
            res[mode]["cost"] = costs[mode]
            res[mode]["seconds_ratio"] = statistics.median(seconds[mode]) / statistics.median(seconds["none"])
        out[kind] = {"questions": len(items), "modes": res, "minus_none": res_diffs[kind],
                     "answers": {m: a for m, a in answers.items()}, "truths": truths, "scenes": groups}
    return out


def reading(result) -> str:
    """Plain statements computed from the numbers (no hand-written claims)."""
    loc = result["localisation"]
    rnd = loc["random"]
    lines = []
    for metric in ("pointing", "iou", "energy"):
        beat = [k for k, v in loc.items() if k != "random" and v[metric]["low"] > rnd[metric]["high"]]
        best = max((k for k in loc if k != "random"), key=lambda k: loc[k][metric]["value"])
        lines.append(f"- {metric}: best {best} ({fmt(loc[best][metric])} vs random {fmt(rnd[metric])}); intervals "
                     f"clear of random's: {', '.join(beat) if beat else 'none'}.")
    for kind, r in result["crop"].items():
        m = r["modes"]
        for mode in ("crop", "both"):
            d = m[mode]["accuracy"]["value"] - m["none"]["accuracy"]["value"]
            paired = r.get("minus_none", {}).get(mode)
            lines.append(f"- {kind} objects, {mode} vs none: accuracy {d:+.3f}"
                         f"{f' (paired difference {fmt(paired)})' if paired else ''} ({fmt(m[mode]['accuracy'])} vs "
                         f"{fmt(m['none']['accuracy'])}; on the present object {fmt(m[mode]['accuracy_yes'])} vs "
                         f"{fmt(m['none']['accuracy_yes'])}), at {m[mode]['seconds_ratio']:.2f}x the time.")
    return "\n".join(lines)


def write(result, small, out=RESULTS):
    tag = "-small" if small else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grounding{tag}.json").write_text(json.dumps(result, indent=1))
    L = [f"# Grounding on scene-vlm{' (small run: not for quoting)' if small else ''}", "",
         f"`python bench/grounding.py{' --small' if small else ''} --scenes {result['scenes']} --probe "
         f"{result['probe_scenes']}` · {result['machine']} · {result['date']}", "",
         "## Where the attention points", "",
         f"{result['localisation_n']} objects of the first {result['scenes']} test scenes, each asked \"Is there a "
         "<class> in the image?\". Queries at the answer position (the last prompt position, the papers' form) or at "
         "the class word's tokens (`target=`). Pointing: the map's top cell (28x28 px) overlaps the exact mask; IoU: "
         "the box rule (cells >= 0.5 x max, the connected component with the most mass) against the tight box; "
         "energy: share of map mass inside the exact mask. Random: U(0,1) map, same rules. 95% intervals: bootstrap "
         "over scenes. Time: median seconds per grounding (2 CPU cores, shared).", "",
         "| method | pointing | box IoU | energy in mask | s |", "|---|---|---|---|---|"]
    for k, v in result["localisation"].items():
        s = result["seconds"].get(k)
        L.append(f"| {k} | {fmt(v['pointing'])} | {fmt(v['iou'])} | {fmt(v['energy'])} | {'' if s is None else f'{s:.2f}'} |")
    L += ["", "## Crop and re-ask on small and faint objects", "",
          "Probe scenes (`SceneWorld.probe`): test scene i's content with one object drawn small (side 25-36% of the "
          "75 px cell, under one 28 px image token) or faint (opacity 0.2). Two questions per scene: the small/faint "
          "object's class (truth yes) and an absent class (truth no). Modes: none (plain answer), crop (the grounded "
          "crop alone in place of the image), both (original + crop: two images in one prompt, ViCrop's form; "
          "scene-vlm was trained on one image per prompt). Grounding for the crop: `tag` at the class word; crop: box "
          "+ 50% margin per side, square, at least 56 px. Accuracy with 95% bootstrap intervals over scenes.", "",
          "| kind | mode | accuracy | on yes (small/faint present) | on no (absent) | passes per answer | prompt tokens | time vs none |",
          "|---|---|---|---|---|---|---|---|"]
    for kind, r in result["crop"].items():
        for mode, v in r["modes"].items():
            c = v["cost"]
            passes = (f"{c['grounding_forwards']} grounding fwd + {c['grounding_backwards']} bwd + "
                      f"{c['answer_forwards']} answer fwd")
            L.append(f"| {kind} ({r['questions']} q) | {mode} | {fmt(v['accuracy'])} | {fmt(v['accuracy_yes'])} | "
                     f"{fmt(v['accuracy_no'])} | {passes} | {c['prompt_tokens']} | {v['seconds_ratio']:.2f}x |")
    L += ["", "## Reading", "", reading(result), ""]
    (out / f"grounding{tag}.md").write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="one scene's first object, one small-object probe scene (CI)")
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--probe", type=int, default=20, help="probe scenes per kind (2 questions each)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for grounding.md/.json (default bench/results)")
    ap.add_argument("--render", type=Path, help="only rewrite the .md from an existing result .json (no model run)")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        write(result, result["small"], args.out)
        return result
    scenes, probe = (1, 1) if args.small else (args.scenes, args.probe)
    model = attnscope.load("scene-vlm")
    world = SceneWorld(seed=0)
    with warnings.catch_warnings():
        if args.small:
            warnings.simplefilter("ignore", FewUnitsWarning)
        loc, seconds, n = localisation(model, world, scenes, 1 if args.small else None)
        crop = crop_vs_plain(model, world, probe, ("small",) if args.small else ("small", "faint"))
    result = {"scenes": scenes, "probe_scenes": probe, "localisation_n": n, "localisation": loc, "seconds": seconds,
              "crop": crop, "machine": f"{platform.machine()} {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "small": args.small}
    write(result, args.small, args.out)
    return result


if __name__ == "__main__":
    main()
