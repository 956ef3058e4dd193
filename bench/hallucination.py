#!/usr/bin/env python
"""Object hallucination on scene-vlm: baseline against every steering and pruning method in `attnscope.steer`,
and three observations of the seed papers, on the same scenes with the same seeds.

    python bench/hallucination.py                       # everything (hours on a shared 2-core CPU; resumable)
    python bench/hallucination.py --methods pai,fastv   # some methods
    python bench/hallucination.py --report              # only rewrite results/hallucination.md from what exists

Measured (all greedy; 95% intervals by bootstrap over images):
* caption accuracy of the baseline (class / class+colour / full triple F1 against exact ground truth);
* POPE random / popular / adversarial (Li et al., 2023; evaluate/pope.py, strict parsing) and the bias gap
  (random F1 - adversarial F1), per method, with paired differences against the baseline (same questions);
* CHAIR_s, CHAIR_i, recall (Rohrbach et al., 2018; evaluate/chair.py) on free captions, per method;
* seconds per answer (POPE) and per caption token, and their ratio to the baseline measured in the same run;
* observations, baseline model: image attention across generation steps (M3ID's premise), visual sink tokens
  (VAR's), lower image attention at hallucinated object words (Lookback Lens' premise), and the Lookback Lens
  detector (evaluate/lookback.py) against random and single-head baselines.

Raw records go to results/hallucination/*.jsonl (one file per method and task; a finished file is reused
unless --force), the summary to results/hallucination.json and the report to results/hallucination.md."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RAW = RESULTS / "hallucination"
SKIP = {"heads": "needs an explicit head list (a primitive, not a paper method)",
        "keep": "a keep-ratio schedule for the pruning methods, not a method by itself"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --- runs ------------------------------------------------------------------------------------------------------
def run_pope(model, name, steer, args, world):
    from attnscope.evaluate.pope import evaluate_pope, scene_questions

    path = RAW / f"pope-{name}.jsonl"
    if path.is_file() and not args.force:
        return
    qs, image_of = scene_questions(world, n=args.n)
    t = time.time()
    evaluate_pope(model, qs, image_of, steer=steer, max_new_tokens=3, out=path, boot=args.boot,
                  progress=lambda i, n: i % 100 == 0 and log(f"  pope {name}: {i}/{n}"))
    log(f"pope {name}: {time.time() - t:.0f}s")


def run_chair(model, name, steer, args, world):
    from attnscope.evaluate.chair import evaluate_chair, scene_images

    path = RAW / f"chair-{name}.jsonl"
    if path.is_file() and not args.force:
        return
    images, image_of = scene_images(world, n=args.chair)
    t = time.time()
    evaluate_chair(model, images, image_of, steer=steer, max_new_tokens=56, out=path, boot=args.boot,
                   progress=lambda i, n: i % 25 == 0 and log(f"  chair {name}: {i}/{n}"))
    log(f"chair {name}: {time.time() - t:.0f}s")


def run_traces(model, args, world):
    """Baseline captions with per-step attention summaries, for the three observations and Lookback Lens."""
    from attnscope.evaluate.lookback import generate_traced

    path = RAW / "traces.npz"
    if path.is_file() and not args.force:
        return
    rows, arrays = [], {}
    t = time.time()
    for i in range(args.lookback):
        scene = world.scene("test", args.chair + i)  # scenes not used for CHAIR above
        tr = generate_traced(model, scene.image, "Describe the image.", max_new_tokens=56, keep_image_share=True)
        rows.append({"image_id": scene.id, "text": tr.text, "offsets": tr.offsets, "gold": scene.classes,
                     "object_cells": object_cells(scene)})
        arrays[f"ctx{i}"], arrays[f"img{i}"], arrays[f"new{i}"] = tr.ctx_mean, tr.image_mean, tr.new_mean
        arrays[f"mass{i}"] = tr.image_mass
        arrays[f"share{i}"] = tr.image_share.mean(axis=(1, 2)).astype(np.float32)  # [T, 64]: over layers and heads
        arrays[f"sharel{i}"] = tr.image_share[0].astype(np.float32)  # [L, H, 64] at the first generated token
        if (i + 1) % 20 == 0:
            log(f"  traces {i + 1}/{args.lookback}, {time.time() - t:.0f}s")
    np.savez_compressed(path, **arrays)
    (RAW / "traces.json").write_text(json.dumps(rows))
    log(f"traces: {time.time() - t:.0f}s")


def visual_heads(model, world, k: int = 10, scenes: int = 4) -> list[tuple[int, int]]:
    """DeCoRe's heads for a VLM: the k language-model heads that put the most attention on the image (image ratio
    of the answer position, averaged over `scenes` training scenes and POPE questions). Masking them in DeCoRe's
    branch removes what the answer retrieves from the image, as masking retrieval heads does for text."""
    from attnscope import heads
    from attnscope.evaluate.pope import Generator
    from attnscope.scenes import question

    ask, total = Generator(model), None
    for i in range(scenes):
        scene = world.scene("train", i)
        x = model.encode(ask.prompt(question(scene.objects[0].cls)), scene.image)
        t = heads.table(model, x, metrics=["role_mass"], streams="language", queries="last")
        ratio = torch.tensor(t.column("image_ratio"))
        total = ratio if total is None else total + ratio
    order = torch.argsort(total, descending=True)[:k].tolist()
    return [(t.rows[i][1], t.rows[i][2]) for i in order]


def object_cells(scene, grid: int = 8, min_cover: float = 0.1) -> list[int]:
    """Indices (row-major on the 8x8 token grid) of image tokens whose 28x28 block an object covers >= min_cover of."""
    return [int(k) for k in np.flatnonzero(scene.cell_cover(grid, min_cover) >= 0)]


# --- analysis --------------------------------------------------------------------------------------------------
def pope_summary(records: list[dict], base: list[dict] | None, boot: int) -> dict:
    from attnscope.evaluate.bootstrap import bootstrap
    from attnscope.evaluate.pope import pope_metrics, summarize

    out = {"splits": summarize(records, boot)}
    for s in out["splits"].values():
        s["ci"].pop("n", None)

    def gap(rs):
        r = pope_metrics([x for x in rs if x["split"] == "random"])
        a = pope_metrics([x for x in rs if x["split"] == "adversarial"])
        return {"f1_gap": r["f1"] - a["f1"], "acc_gap": r["accuracy"] - a["accuracy"]}

    out["gap"] = bootstrap(records, gap, groups=[r["image_id"] for r in records], n=boot)
    if base is not None:
        key = lambda r: (r["split"], r["image_id"], r["object"])  # noqa: E731
        b = {key(r): r for r in base}
        pairs = [(r, b[key(r)]) for r in records if key(r) in b]

        def delta(ps):
            res = {}
            for split in ("random", "popular", "adversarial"):
                mine = pope_metrics([p[0] for p in ps if p[0]["split"] == split])
                ref = pope_metrics([p[1] for p in ps if p[1]["split"] == split])
                if mine.get("n"):
                    res[f"{split}_f1"] = mine["f1"] - ref["f1"]
                    res[f"{split}_acc"] = mine["accuracy"] - ref["accuracy"]
            g, gb = gap([p[0] for p in ps]), gap([p[1] for p in ps])
            res["f1_gap"] = g["f1_gap"] - gb["f1_gap"]
            return res

        out["delta"] = bootstrap(pairs, delta, groups=[p[0]["image_id"] for p in pairs], n=boot)
    out["seconds_per_answer"] = float(np.mean([r["seconds"] for r in records]))
    return out


def chair_summary(records: list[dict], boot: int) -> dict:
    """CHAIR from the stored captions, re-read with the current rule (CHAIR_i per object mention, as Rohrbach et
    al.; records written before it counted classes once per caption)."""
    from attnscope.evaluate.bootstrap import bootstrap
    from attnscope.evaluate.chair import ObjectVocabulary, caption_record, chair_metrics

    vocab = ObjectVocabulary.scenes()
    records = [r | caption_record(r["caption"], r["gold"], vocab) for r in records]
    m = chair_metrics(records)
    m["ci"] = bootstrap(records, chair_metrics, n=boot)
    m["seconds_per_caption"] = float(np.mean([r["seconds"] for r in records]))
    m["seconds_per_token"] = float(sum(r["seconds"] for r in records) / max(1, sum(r["new_tokens"] for r in records)))
    return m


def caption_accuracy(records: list[dict], world, boot: int) -> dict:
    from attnscope.evaluate.bootstrap import bootstrap
    from attnscope.scenes import Scene, caption_scores

    scores = [caption_scores(r["caption"], world.scene(*Scene.parse_id(r["image_id"]))) for r in records]
    metric = lambda ss: {"exact": float(np.mean([s["exact"] for s in ss])),  # noqa: E731
                         **{f"{lvl}_f1": float(np.mean([s[lvl]["f1"] for s in ss])) for lvl in ("class", "class_colour", "triple")},
                         "count_correct": float(np.mean([s["n_pred"] == s["n_gold"] for s in ss]))}
    return bootstrap(scores, metric, n=boot)


def observations(boot: int) -> dict:
    """M3ID decay, VAR sinks, Lookback Lens image attention and detector, from the saved traces."""
    from attnscope.evaluate.bootstrap import bootstrap
    from attnscope.evaluate.chair import ObjectVocabulary
    from attnscope.evaluate.lookback import TracedGeneration, auroc, evaluate_detector, object_spans, span_features

    rows = json.loads((RAW / "traces.json").read_text())
    z = np.load(RAW / "traces.npz")
    vocab = ObjectVocabulary.scenes()
    out: dict = {"captions": len(rows)}

    # M3ID: image attention mass (mean over layers and heads) at each generated step
    mass = [z[f"mass{i}"].mean(axis=(1, 2)) for i in range(len(rows))]
    bins = [(0, 1), (1, 5), (5, 10), (10, 20), (20, 30), (30, 60)]
    per_bin = {}
    for lo, hi in bins:
        vals = [m[lo:hi].mean() for m in mass if len(m) > lo]
        if vals:
            per_bin[f"{lo}-{hi - 1}"] = bootstrap(vals, lambda v: float(np.mean(v)), n=boot)["value"] | {"captions": len(vals)}
    rhos = []
    for m in mass:
        if len(m) >= 5:
            r = np.argsort(np.argsort(m))
            rhos.append(float(np.corrcoef(np.arange(len(m)), r)[0, 1]))
    out["m3id"] = {"image_mass_by_step": per_bin,
                   "spearman_step_vs_mass": bootstrap(rhos, lambda v: float(np.mean(v)), n=boot)["value"],
                   "share_negative_rho": float(np.mean([r < 0 for r in rhos]))}

    # VAR: concentration of image attention, positional consistency, and whether the top tokens lie on objects
    top1, top4, on_obj_top, obj_frac, top_pos = [], [], [], [], []
    for i, row in enumerate(rows):
        share = z[f"share{i}"]  # [T, 64], each row sums to 1
        s = share.mean(0)
        order = np.argsort(-s)
        top1.append(float(s[order[0]]))
        top4.append(float(s[order[:4]].sum()))
        cells = set(row["object_cells"])
        obj_frac.append(len(cells) / 64)
        on_obj_top.append(float(np.mean([int(k) in cells for k in order[:4]])))
        top_pos.append(int(order[0]))
    counts = np.bincount(top_pos, minlength=64)
    per_layer = []
    for li in range(z["sharel0"].shape[0]):
        per_layer.append(float(np.mean([np.sort(z[f"sharel{i}"][li], -1)[:, -1].mean() for i in range(len(rows))])))
    out["var"] = {"top1_share": bootstrap(top1, lambda v: float(np.mean(v)), n=boot)["value"],
                  "top4_share": bootstrap(top4, lambda v: float(np.mean(v)), n=boot)["value"],
                  "uniform_top1": 1 / 64, "uniform_top4": 4 / 64,
                  "top4_on_objects": float(np.mean(on_obj_top)), "tokens_on_objects": float(np.mean(obj_frac)),
                  "most_common_top1_cells": [(int(k), int(counts[k])) for k in np.argsort(-counts)[:5]],
                  "top1_share_by_layer_first_token": per_layer}

    # Lookback Lens: spans of object words, labels exact
    feats, feats_img, labels, groups, img_attn = [], [], [], [], []
    for i, row in enumerate(rows):
        T = len(row["offsets"])
        tr = TracedGeneration(row["text"], [0] * T, [tuple(o) for o in row["offsets"]], z[f"ctx{i}"], z[f"img{i}"],
                              z[f"new{i}"], z[f"mass{i}"])
        spans = object_spans(tr, row["gold"], vocab)
        if not spans:
            continue
        feats.append(span_features(tr, spans))
        feats_img.append(span_features(tr, spans, context="image"))
        labels += [s["hallucinated"] for s in spans]
        groups += [row["image_id"]] * len(spans)
        img_attn += [float(tr.image_mass[s["steps"]].mean()) for s in spans]
    x, xi, y = np.concatenate(feats), np.concatenate(feats_img), np.array(labels)
    g = np.array(groups)
    ids = list(dict.fromkeys(groups))
    train_ids = set(ids[: len(ids) // 2])
    tr_mask = np.array([k in train_ids for k in g])
    lb = {"spans": int(len(y)), "hallucinated": int(y.sum())}
    items = list(range(len(y)))
    diff = lambda idx: (float(np.mean([img_attn[k] for k in idx if y[k]] or [np.nan])) -  # noqa: E731
                        float(np.mean([img_attn[k] for k in idx if not y[k]] or [np.nan])))
    lb["image_mass_hallucinated"] = float(np.mean([a for a, l in zip(img_attn, y) if l])) if y.any() else None
    lb["image_mass_grounded"] = float(np.mean([a for a, l in zip(img_attn, y) if not l]))
    lb["image_mass_difference"] = bootstrap(items, diff, groups=groups, n=boot)["value"]
    lb["auroc_low_image_attention"] = auroc([-a for a in img_attn], y)
    if y[tr_mask].any() and (~y[tr_mask]).any() and y[~tr_mask].any() and (~y[~tr_mask]).any():
        lb["detector_prompt_context"] = evaluate_detector(x[tr_mask], y[tr_mask], x[~tr_mask], y[~tr_mask], g[~tr_mask], boot=boot)
        lb["detector_image_context"] = evaluate_detector(xi[tr_mask], y[tr_mask], xi[~tr_mask], y[~tr_mask], g[~tr_mask], boot=boot)
        heads = z["ctx0"].shape[2]
        for key in ("detector_prompt_context", "detector_image_context"):
            idx = lb[key]["best_head"]["index"]
            lb[key]["best_head"] |= {"layer": idx // heads, "head": idx % heads}
    out["lookback"] = lb
    return out


# --- report ----------------------------------------------------------------------------------------------------
def f(ci, d=3):
    if ci is None or ci["value"] != ci["value"]:  # missing, or NaN (undefined: e.g. CHAIR_i with no object named)
        return "n/a"
    return f"{ci['value']:.{d}f} [{ci['low']:.{d}f}, {ci['high']:.{d}f}]"


def gap_verdict(methods: dict) -> list[str]:
    """Report lines: which methods' paired Δ gap interval excludes 0, and whether a closed gap comes from
    saying "No" to everything (adversarial yes-ratio under 0.2) rather than from seeing."""
    closes, widens = [], []
    for name, m in methods.items():
        d = m.get("pope", {}).get("delta", {}).get("f1_gap")
        if not d:
            continue
        yes = m["pope"]["splits"]["adversarial"]["yes_ratio"]
        tag = f"{name} ({d['value']:+.3f}{', by answering No: yes-ratio %.2f' % yes if yes < 0.2 else ''})"
        if d["high"] < 0:
            closes.append(tag)
        elif d["low"] > 0:
            widens.append(tag)
    return ["", "Δ gap intervals that exclude 0: narrower gap: " + (", ".join(closes) or "none") + "; wider gap: "
            + (", ".join(widens) or "none") + ". Every other method leaves the gap within the baseline's noise.", ""]


def chair_order_note(methods: dict) -> list[str]:
    """Report lines: the pairs of methods whose order by CHAIR_i (per mention) and by CHAIR_i per class differ."""
    rows = {n: m["chair"] for n, m in methods.items() if "chair" in m and m["chair"]["chair_i"] == m["chair"]["chair_i"]}
    flips = [f"{a}/{b}" for i, a in enumerate(rows) for b in list(rows)[i + 1:]
             if (rows[a]["chair_i"] - rows[b]["chair_i"]) * (rows[a]["chair_i_per_class"] - rows[b]["chair_i_per_class"]) < 0]
    return ["", f"Pairs of methods ordered differently by CHAIR_i and by CHAIR_i per class: {', '.join(flips) or 'none'}."]


def kept_sections(md: Path) -> list[str]:
    """Sections of `md` written by other commands, between "<!-- begin: X -->" and "<!-- end: X -->" markers."""
    text, out = (md.read_text() if md.is_file() else ""), []
    while "<!-- begin: " in text:
        start = text.index("<!-- begin: ")
        name = text[start + len("<!-- begin: "):text.index(" -->", start)]
        end = text.find(f"<!-- end: {name} -->", start)
        if end < 0:
            break
        end += len(f"<!-- end: {name} -->")
        out.append(text[start:end])
        text = text[end:]
    return out


def write_section(md: Path, section: str) -> None:
    """Put a marked section back where it was (replacing its old copy) or before "## Notes", else at the end."""
    begin = section[:section.index(" -->") + len(" -->")]
    end = begin.replace("<!-- begin: ", "<!-- end: ")
    old = md.read_text() if md.is_file() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    elif "\n## Notes" in old:
        i = old.index("\n## Notes") + 1
        new = old[:i] + section + "\n\n" + old[i:]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + section + "\n"
    md.write_text(new)


def stored_sizes(raw: Path) -> dict:
    """The sizes the stored run used, counted in its raw files: `--report` and the reuse of finished files both
    ignore this invocation's --n/--chair/--lookback, so the report must not quote them. n: POPE questions per
    split (an int, or {split: count} where the splits differ), chair: captions, lookback: traced captions, each
    from the baseline's files (else the first method's); None where nothing is stored. `differ`: {method: its
    sizes} for methods whose files hold other sizes than that."""
    def pope_n(path):
        counts: dict[str, int] = {}
        for r in load_jsonl(path):
            if r.get("type") == "answer":
                counts[r["split"]] = counts.get(r["split"], 0) + 1
        return next(iter(counts.values())) if len(set(counts.values())) == 1 else (counts or None)

    def chair_n(path):
        return sum(r.get("type") == "caption" for r in load_jsonl(path)) or None

    per_method: dict[str, dict] = {}
    for path in sorted(raw.glob("*.jsonl")):
        task, name = path.stem.split("-", 1)
        if task in ("pope", "chair"):
            per_method.setdefault(name, {})["n" if task == "pope" else "chair"] = (pope_n if task == "pope" else chair_n)(path)
    sizes = {"n": None, "chair": None}
    for key in sizes:
        found = [m[key] for name, m in sorted(per_method.items(), key=lambda kv: kv[0] != "baseline") if m.get(key)]
        sizes[key] = found[0] if found else None
    traces = raw / "traces.json"
    sizes["lookback"] = len(json.loads(traces.read_text())) if traces.is_file() else None
    differ = {name: {k: v for k, v in m.items() if v is not None and v != sizes[k]} for name, m in per_method.items()}
    sizes["differ"] = {name: d for name, d in differ.items() if d}
    return sizes


def setup_lines(cfg: dict) -> list[str]:
    """The report's Setup section, from the sizes the stored run used (`stored_sizes`)."""
    n = cfg["n"]
    pope = ("not run" if n is None else f"{n} questions per split" if isinstance(n, int) else
            "questions per split: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    L = ["## Setup", "",
         f"* Model: `scene-vlm` ({cfg['model']}).",
         f"* Scenes: `SceneWorld(seed=0)` test split (co-occurrence knob 0 at test; 0.9 in training for the pairs "
         f"{', '.join('-'.join(p) for p in cfg['pairs'])}, with 60% of the added partners drawn small and so faint that they are barely distinguishable from the background noise, "
         "so that the prior pays off in training where the image leaves doubt). Every test object is drawn normally.",
         f"* POPE: {pope} (3 yes + 3 no per image where possible; adversarial negatives ranked "
         "by training co-occurrence with the present classes, popular by training frequency); strict parsing.",
         f"* CHAIR: {'not run' if cfg['chair'] is None else str(cfg['chair']) + ' captions'} (\"Describe the image.\", up to 56 new tokens).",
         f"* Observations and Lookback Lens: {'not run' if cfg['lookback'] is None else str(cfg['lookback']) + ' further captions'} "
         "with attention recorded."]
    for name, m in cfg.get("differ", {}).items():
        L.append(f"* `{name}` was run with other sizes: " + ", ".join(
            f"{'POPE questions per split' if k == 'n' else 'CHAIR captions'} {v}" for k, v in m.items()) + ".")
    return L + [""]


def write_report(summary: dict) -> None:
    kept = kept_sections(RESULTS / "hallucination.md")
    L = ["# Object hallucination on scene-vlm: baseline, steering and pruning methods, seed-paper observations", "",
         f"Generated by `python bench/hallucination.py` ({summary['when']}; {summary['platform']}; torch "
         f"{summary['torch']}; {summary['threads']} thread on a 2-core CPU shared with other jobs, so absolute times "
         "are noisy; ratios are to the baseline of the same run). Greedy decoding throughout. Intervals: 95% "
         "bootstrap, resampling images. Raw answers: `bench/results/hallucination/*.jsonl`.", ""]
    L += setup_lines(summary["config"])
    base = summary["methods"].get("baseline")
    if base and "caption" in base:
        c = base["caption"]
        L += ["## Does the model see?", "",
              "Baseline captions against exact ground truth (mean over captions):", "",
              "| exact caption | class F1 | class+colour F1 | class+colour+position F1 | object count right |",
              "|---|---|---|---|---|",
              f"| {f(c['exact'])} | {f(c['class_f1'])} | {f(c['class_colour_f1'])} | {f(c['triple_f1'])} | {f(c['count_correct'])} |", ""]
        if "pope" in base:
            L += [f"POPE-random accuracy: {f(base['pope']['splits']['random']['ci']['accuracy'])} (chance 0.5).", ""]
    L += ["## POPE", "", "F1 per split; gap = random F1 - adversarial F1 (the learned co-occurrence prior); "
          "Δ = paired difference to the baseline on the same questions.", "",
          "| method | random F1 | popular F1 | adversarial F1 | adv. accuracy | adv. yes-ratio | gap | Δ adv. F1 | Δ gap | unparseable | s/answer (× base) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_s = base["pope"]["seconds_per_answer"] if base and "pope" in base else None
    for name, m in summary["methods"].items():
        if "error" in m:
            L.append(f"| {name} | failed: {m['error']} |||||||||")
            continue
        if "pope" not in m:
            continue
        p = m["pope"]
        sp = p["splits"]
        d = p.get("delta", {})
        un = max(s["unparseable"] for s in sp.values())
        ratio = f" ({p['seconds_per_answer'] / base_s:.2f})" if base_s else ""
        L.append(f"| {name} | {f(sp['random']['ci']['f1'])} | {f(sp['popular']['ci']['f1'])} | "
                 f"{f(sp['adversarial']['ci']['f1'])} | {sp['adversarial']['accuracy']:.3f} | "
                 f"{sp['adversarial']['yes_ratio']:.3f} | {f(p['gap']['f1_gap'])} | "
                 f"{f(d.get('adversarial_f1')) if d else '—'} | {f(d.get('f1_gap')) if d else '—'} | {un:.3f} | "
                 f"{p['seconds_per_answer']:.3f}{ratio} |")
    L += gap_verdict(summary["methods"])
    prior = summary.get("prior")
    if prior:
        fy, ch = prior["false_yes"], prior["caption_hallucinations"]
        L += ["", "### Is the co-occurrence prior visible in the baseline?", "",
              "False-yes rate on absent objects: " + ", ".join(f"{k} {v['rate']:.3f} (n={v['n']})" for k, v in fy.items())
              + ". A model leaning on the training pairs would say yes more often to the adversarial ones.", ""]
        bp = prior.get("false_yes_by_partner", {})
        if len(bp) == 2:
            L += ["Pooled over the splits: false-yes rate when the absent object's training partner is in the scene "
                  f"{bp['partner_present']['rate']:.3f} (n={bp['partner_present']['n']}), when it is not "
                  f"{bp['partner_absent']['rate']:.3f} (n={bp['partner_absent']['n']}).", ""]
        if ch["n"]:
            L += [f"Caption hallucinations that are the training partner of an object in the scene: {ch['partner_share']:.2f} of "
                  f"{ch['n']}, against {ch['uniform_share']:.2f} if hallucinated classes were drawn uniformly from the absent ones.", ""]
    L += ["", "## CHAIR", "", "CHAIR_i is the paper's (Rohrbach et al., 2018): hallucinated object mentions / all object "
          "mentions, every mention counted (a class named twice is two mentions); CHAIR_i per class counts each class "
          "once per caption (the variant this table reported before under the name CHAIR_i). Recomputed from the "
          "stored captions (`bench/results/hallucination/chair-*.jsonl`).", "",
          "| method | CHAIR_s | CHAIR_i | CHAIR_i per class | recall | mentions/caption | naming no object | "
          "s/caption token (× base) |", "|---|---|---|---|---|---|---|---|"]
    base_t = base["chair"]["seconds_per_token"] if base and "chair" in base else None
    for name, m in summary["methods"].items():
        if "chair" not in m:
            continue
        c = m["chair"]
        ratio = f" ({c['seconds_per_token'] / base_t:.2f})" if base_t else ""
        L.append(f"| {name} | {f(c['ci']['chair_s'])} | {f(c['ci']['chair_i'])} | {f(c['ci']['chair_i_per_class'])} | "
                 f"{f(c['ci']['recall'])} | "
                 f"{c['mentions_per_caption']:.2f} | {c['no_object_share']:.2f} | {c['seconds_per_token']:.3f}{ratio} |")
    L += chair_order_note(summary["methods"])
    silent = [n for n, m in summary["methods"].items() if m.get("chair", {}).get("no_object_share", 0) > 0.5]
    if silent:
        L += ["", f"{', '.join(silent)}: most captions name no object (for example \"Yes\" or \"No\" in reply to "
              "\"Describe the image.\"), so a low CHAIR there means it stopped describing, not that it stopped hallucinating."]
    obs = summary.get("observations")
    if obs:
        m3, var, lb = obs["m3id"], obs["var"], obs["lookback"]
        L += ["", "## Do the seed papers' observations hold here?", "",
              f"### Image attention across generation (M3ID's premise) — {obs['captions']} baseline captions", "",
              "Attention mass on the 64 image tokens from the generating position, mean over all 30 layers x 9 heads:", "",
              "| generated tokens | image attention mass | captions |", "|---|---|---|"]
        for k, v in m3["image_mass_by_step"].items():
            L.append(f"| {k} | {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}] | {v['captions']} |")
        L += ["", f"Spearman correlation of step index and image mass within a caption: {f(m3['spearman_step_vs_mass'])}; "
              f"negative in {m3['share_negative_rho']:.0%} of captions.", "",
              "### Visual sink tokens (VAR's premise)", "",
              f"* Share of the image attention on the single most-attended image token: {f(var['top1_share'])} "
              f"(uniform: {var['uniform_top1']:.3f}); on the top 4: {f(var['top4_share'])} (uniform: {var['uniform_top4']:.3f}).",
              f"* Of those top-4 tokens, {var['top4_on_objects']:.0%} cover an object, while {var['tokens_on_objects']:.0%} "
              "of all image tokens do.",
              f"* Most frequent top-1 cells (index r*8+c, count over captions): {var['most_common_top1_cells']}.",
              "* Top-1 share per layer at the first generated token (mean over heads and captions): " +
              ", ".join(f"L{i}: {v:.2f}" for i, v in enumerate(var["top1_share_by_layer_first_token"])), "",
              "### Hallucinated object words and the image (Lookback Lens' premise)", "",
              f"{lb['spans']} object words in the captions, {lb['hallucinated']} hallucinated (class not in the scene).", "",
              f"* Image attention mass at the word's tokens: hallucinated {lb['image_mass_hallucinated']:.4f}, grounded "
              f"{lb['image_mass_grounded']:.4f}; difference {f(lb['image_mass_difference'], 4)}; AUROC of low image "
              f"attention as a hallucination score: {lb['auroc_low_image_attention']:.3f}.", ""]
        for key, title in (("detector_prompt_context", "context = prompt (image + text)"),
                           ("detector_image_context", "context = image tokens")):
            if key in lb:
                d = lb[key]
                bh = d["best_head"]
                L += [f"Lookback Lens detector, {title}: trained on {d['n_train']} spans ({d['hallucinated_train']} "
                      f"hallucinated) of half the images, tested on {d['n_test']} ({d['hallucinated_test']}) of the others.", "",
                      "| scorer | test AUROC |", "|---|---|",
                      f"| Lookback Lens (logistic regression, 270 lookback ratios) | {f(d['lookback_lens'])} |",
                      f"| best single head (L{bh['layer']} H{bh['head']}, chosen on training spans) | {f(d['best_single_head'])} |",
                      f"| detector trained on shuffled labels | {f(d['shuffled_labels'])} |",
                      f"| random scores | {f(d['random_scores'])} |", ""]
    if summary.get("notes"):
        L += ["## Notes", ""] + [f"* {n}" for n in summary["notes"]]
    md = RESULTS / "hallucination.md"
    md.write_text("\n".join(L) + "\n")
    for section in kept:  # sections other commands own (bench/detectors.py) survive a rewrite
        write_section(md, section)


def summarize_all(args, world) -> dict:
    import attnscope

    summary = {"when": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "attnscope": attnscope.__version__,
               "config": {"model": "DINOv2-S/14 + SmolLM2-135M, 64 image tokens, projector + LoRA r=8 on q/k/v/o trained on 3000 scenes with "
                                         "captions, yes/no questions and the grounding loss (scripts/train_scene_vlm.py)",
                          **stored_sizes(RAW), "pairs": [list(p) for p in world.pairs]},
               "methods": {}, "notes": list(SKIP_NOTES)}
    base_pope = load_jsonl(RAW / "pope-baseline.jsonl")
    base_pope = [r for r in base_pope if r.get("type") == "answer"]
    for path in sorted(RAW.glob("*.jsonl")):
        task, name = path.stem.split("-", 1)
        recs = load_jsonl(path)
        entry = summary["methods"].setdefault(name, {})
        if task == "pope":
            answers = [r for r in recs if r.get("type") == "answer"]
            entry["pope"] = pope_summary(answers, None if name == "baseline" else base_pope, args.boot)
        elif task == "chair":
            caps = [r for r in recs if r.get("type") == "caption"]
            entry["chair"] = chair_summary(caps, args.boot)
            if name == "baseline":
                entry["caption"] = caption_accuracy(caps, world, args.boot)
        elif task == "error":
            entry["error"] = recs[0]["error"] if recs else "unknown"
    order = ["baseline"] + sorted(k for k in summary["methods"] if k != "baseline")
    summary["methods"] = {k: summary["methods"][k] for k in order if k in summary["methods"]}
    if (RAW / "pope-baseline.jsonl").is_file() and (RAW / "chair-baseline.jsonl").is_file():
        summary["prior"] = prior_probe(world)
    if (RAW / "traces.npz").is_file():
        summary["observations"] = observations(args.boot)
    elif (RESULTS / "hallucination.json").is_file():  # traces.npz is not committed: keep the last run's observations
        before = json.loads((RESULTS / "hallucination.json").read_text())
        if "observations" in before:
            summary["observations"] = before["observations"]
            summary["notes"].append(f"The observations section is the run of {before.get('observations_when', before['when'])} "
                                    "(its traces.npz is not committed), carried over unchanged.")
            summary["observations_when"] = before.get("observations_when", before["when"])
    if summary["config"]["lookback"] is None and "observations" in summary:
        summary["config"]["lookback"] = summary["observations"]["captions"]
    return summary


def prior_probe(world) -> dict:
    """Is the learned co-occurrence prior visible in the baseline's answers? False-yes rate on each split's absent
    objects, and the share of caption hallucinations that are the training partner of an object in the scene,
    against that share if hallucinations were uniform over the absent classes."""
    from attnscope.scenes import CLASSES, Scene

    partner = world.partner  # class -> its training partner (each class is in at most one pair)
    out: dict = {"false_yes": {}}
    negatives = [r for r in load_jsonl(RAW / "pope-baseline.jsonl") if r.get("type") == "answer" and not r["label"]]
    for split in ("random", "popular", "adversarial"):
        rs = [r for r in negatives if r["split"] == split]
        if rs:
            out["false_yes"][split] = {"rate": float(np.mean([r["parsed"] == "yes" for r in rs])), "n": len(rs)}
    # the same answers pooled over splits, split by whether the absent object's training partner is in the scene
    by_case: dict[bool, list[bool]] = {True: [], False: []}
    for r in negatives:
        present = world.classes_of(*Scene.parse_id(r["image_id"]))
        by_case[partner.get(r["object"]) in present].append(r["parsed"] == "yes")
    out["false_yes_by_partner"] = {("partner_present" if k else "partner_absent"): {"rate": float(np.mean(v)), "n": len(v)}
                                   for k, v in by_case.items() if v}
    hal = part = 0
    expected = 0.0
    for r in load_jsonl(RAW / "chair-baseline.jsonl"):
        if r.get("type") != "caption":
            continue
        gold = set(r["gold"])
        partners = {partner[g] for g in gold if g in partner} - gold
        absent = len([c for c in CLASSES if c not in gold])
        for h in r["hallucinated"]:
            hal, part = hal + 1, part + (h in partners)
            expected += len(partners) / max(1, absent)
    out["caption_hallucinations"] = {"n": hal, "partner_share": part / hal if hal else None,
                                     "uniform_share": expected / hal if hal else None}
    return out


SKIP_NOTES: list[str] = []


def main(argv=None) -> int:
    global RESULTS, RAW
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="POPE questions per split")
    ap.add_argument("--chair", type=int, default=100, help="captions for CHAIR")
    ap.add_argument("--lookback", type=int, default=240, help="captions traced for the observations and Lookback Lens")
    ap.add_argument("--methods", default="all", help="comma-separated steer method names, 'all', or 'none'")
    ap.add_argument("--weights", default=None, help="scene-vlm weights folder (default: the package's)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--report", action="store_true",
                    help="only summarize existing raw files (the report states the sizes they hold, not --n/--chair/--lookback)")
    ap.add_argument("--skip-traces", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="leave the baseline to another process (run several with disjoint --methods to use more cores)")
    ap.add_argument("--results", default=str(RESULTS), help="results folder (raw files go to <results>/hallucination/)")
    args = ap.parse_args(argv)
    RESULTS = Path(args.results)
    RAW = RESULTS / "hallucination"
    torch.set_num_threads(args.threads)
    from attnscope.models import scene_vlm
    from attnscope.scenes import SceneWorld
    from attnscope.steer import METHODS

    world = SceneWorld(seed=0)
    RAW.mkdir(parents=True, exist_ok=True)
    SKIP_NOTES.extend(f"`{k}` not run: {v}." for k, v in SKIP.items())
    SKIP_NOTES.extend([
        "Every method runs with its paper's defaults (`METHODS[name]()`); DeCoRe masks the 10 language-model heads "
        "with the highest image ratio at the answer position on 4 training scenes (`visual_heads`).",
        "M3ID equals the baseline on POPE by construction: its contrast weight starts at 0 on the first generated "
        "token, and the yes/no answer is that token.",
        "FastV has two generation forms: `fastv` ranks the image tokens once at the prompt and keeps that set in "
        "the KV cache for every generated token (`FastV`, the fast form); `fastv_rerank` re-ranks at every new "
        "token, recomputing the sequence without a cache (`FastVRerank`, the FastV paper's own evaluation). On POPE "
        "(answers of up to 3 tokens) they differ only after the first answer token.",
        "`fastv_rerank` was added on 2026-11-30 with the same seeds and sizes (200 POPE questions per split, 60 "
        "captions) on the same shared CPU; the other methods' raw answers are from the 2026-11-23 run. CHAIR for every "
        "method is recomputed from the stored captions with the paper's per-mention CHAIR_i (the report of 2026-11-23 "
        "gave the per-class variant under that name).",
        "The pruning defaults (FastV K=2 keep 50%, PyramidDrop's stages, VTC-CLS) were set for LLaVA's 576 image "
        "tokens; scene-vlm has 64 pooled tokens, each covering a 28x28 px cell, so dropping half of them removes "
        "whole objects and the model answers \"No\" (the yes-ratio column).",
        "The stored `var` answers (2026-11-23) were made when VAR chose its image-centric heads again at every "
        "generated token (now `VAR(heads_at=\"step\")`); its default now keeps the heads chosen at prefill. The "
        "prefill is the same in both forms, so the first answer token is too; later tokens and the CHAIR captions "
        "may differ until `--methods var --force` is run again.",
        "`traces.npz` (21 MB of per-step attention summaries) is not committed; `traces.json` and the summary "
        "JSON are. Rerun with `--force` to rebuild it."])
    if not args.report:
        model = scene_vlm.load(args.weights)
        if not args.skip_baseline:
            log("baseline")
            run_pope(model, "baseline", None, args, world)
            run_chair(model, "baseline", None, args, world)
        if not args.skip_traces:
            run_traces(model, args, world)
        names = [] if args.methods == "none" else (
            [k for k in METHODS if k not in SKIP] if args.methods == "all" else args.methods.split(","))
        for name in names:
            log(f"method {name}")
            try:
                method = METHODS[name](heads=visual_heads(model, world)) if name == "decore" else METHODS[name]()
                run_pope(model, name, method, args, world)
                run_chair(model, name, method, args, world)
            except Exception as err:  # a method that cannot run on this model is reported, not fatal
                log(f"method {name} failed: {type(err).__name__}: {err}")
                (RAW / f"error-{name}.jsonl").write_text(json.dumps({"error": f"{type(err).__name__}: {err}"[:300]}) + "\n")
    summary = summarize_all(args, world)
    cfg = summary["config"]
    stale = {k: cfg[k] for k in ("n", "chair", "lookback") if not args.report and cfg[k] not in (None, getattr(args, k))}
    if stale:
        log(f"reused raw files hold other sizes than asked: {stale}; the report states theirs (--force reruns them)")
    (RESULTS / "hallucination.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    write_report(summary)
    log(f"wrote {RESULTS / 'hallucination.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
