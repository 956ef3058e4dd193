#!/usr/bin/env python
"""Hallucination detectors from attention on scene-vlm's own captions: LapEigvals (evaluate/lapeigvals.py) against
Lookback Lens (evaluate/lookback.py), the single best head and shuffled-label controls, on one train/test split.

    python bench/detectors.py            # 150 captions (~15 min on one CPU thread); rewrites only its own section
                                         # of results/hallucination.md (between the markers below)
    python bench/detectors.py --report   # only re-summarise the cached features
    python bench/detectors.py --small    # 4 short captions into a temporary folder (CI smoke run; not for quoting)

The captions are greedy answers to "Describe the image." on the test scenes the Lookback Lens observations of
bench/hallucination.py use (test 60..209), generated once with attention captured (`queries="last"`, SDPA on): the
lookback ratios and LapEigvals' graph come from the same rows. Spans are object words; a span is hallucinated when
the scene does not hold its class (exact). Train on the captions of the first half of the images, test on the
rest. Intervals: 95% cluster bootstrap over test captions (one caption per image), not spans: the spans of one
caption share its image and nested prefixes of one attention graph, so they are not independent evidence.

Cached features go to results/hallucination/detectors.npz (not committed), captions and labels to
results/hallucination/detectors.json, the summary to results/hallucination-detectors.json."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hallucination import write_section  # noqa: E402  (one writer of marked sections for both commands)

BEGIN, END = "<!-- begin: bench/detectors.py -->", "<!-- end: bench/detectors.py -->"
K, K_MAX, KS = 10, 20, (1, 5, 10, 20)  # k of the comparison (fixed before the run), eigenvalues kept, k ablation


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def generate(model, args, raw: Path) -> None:
    """Caption the scenes and cache per-span features of both detectors."""
    from attnscope.evaluate.chair import ObjectVocabulary
    from attnscope.evaluate.lapeigvals import span_features as lap_features
    from attnscope.evaluate.lookback import generate_traced, object_spans, span_features
    from attnscope.scenes import SceneWorld

    world, vocab = SceneWorld(seed=0), ObjectVocabulary.scenes()
    rows, lb, lb_img, lap, lap_all = [], [], [], [], []
    t0 = time.time()
    for i in range(args.captions):
        scene = world.scene("test", args.start + i)
        tr = generate_traced(model, scene.image, "Describe the image.", max_new_tokens=args.max_new_tokens, keep_graph="all")
        spans = object_spans(tr, scene.classes, vocab)
        rows.append({"image_id": scene.id, "text": tr.text, "gold": scene.classes, "tokens": len(tr.token_ids),
                     "spans": [{"class": s["class"], "hallucinated": s["hallucinated"], "steps": s["steps"]} for s in spans]})
        lb.append(span_features(tr, spans))
        lb_img.append(span_features(tr, spans, context="image"))
        first = tr.prompt_len - 1  # node of generated token 0's query in the whole-sequence graph
        lap.append(lap_features(tr.graph[:, :, first:, first:], spans, k=K_MAX))  # the generating positions only
        lap_all.append(lap_features(tr.graph, spans, k=K_MAX, offset=first))
        if (i + 1) % 10 == 0:
            log(f"  {i + 1}/{args.captions} captions, {time.time() - t0:.0f}s")
    L, H = tr.graph.shape[:2]
    raw.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(raw / "detectors.npz", lookback=np.concatenate(lb), lookback_image=np.concatenate(lb_img),
                        lapeigvals=np.concatenate(lap), lapeigvals_all=np.concatenate(lap_all), shape=np.array([L, H, K_MAX]))
    (raw / "detectors.json").write_text(json.dumps({"config": vars(args) | {"seconds": time.time() - t0}, "captions": rows}))
    log(f"captions: {time.time() - t0:.0f}s")


def summarize(raw: Path, boot: int) -> dict:
    from attnscope.evaluate.lapeigvals import compare_detectors

    meta = json.loads((raw / "detectors.json").read_text())
    z = np.load(raw / "detectors.npz")
    L, H, k_max = (int(v) for v in z["shape"])
    y = np.array([s["hallucinated"] for r in meta["captions"] for s in r["spans"]], bool)
    groups = np.array([r["image_id"] for r in meta["captions"] for s in r["spans"]])
    ids = list(dict.fromkeys(r["image_id"] for r in meta["captions"]))
    train = np.isin(groups, ids[: len(ids) // 2])
    lap = z["lapeigvals"].reshape(len(y), L, H, k_max)
    feats = {"lapeigvals": lap[..., :K].reshape(len(y), -1), "lookback": z["lookback"],
             "lapeigvals_all": z["lapeigvals_all"].reshape(len(y), L, H, k_max)[..., :K].reshape(len(y), -1)}
    feats["lapeigvals+lookback"] = np.concatenate([feats["lapeigvals"], feats["lookback"]], 1)
    T = np.array([r["tokens"] for r in meta["captions"]])
    out = {"config": meta["config"], "boot": boot, "captions": len(ids), "spans": int(len(y)), "hallucinated": int(y.sum()),
           "k": K, "layers": L, "heads": H, "mean_tokens": float(T.mean()),
           "graph_mb": float((L * H * T * (T + 1) / 2 * 4).mean() / 2**20)}  # float32 numbers generate_graph keeps
    try:
        main = compare_detectors(feats, y, groups, train, single={"best_head_lookback": "lookback",
                                                                  "best_single_eigenvalue": "lapeigvals"},
                                 pairs=[("lapeigvals", "lookback"), ("lapeigvals_all", "lookback"),
                                        ("lapeigvals+lookback", "lookback")], boot=boot)
    except ValueError as err:  # a split without both classes (tiny runs)
        out["error"] = str(err)
        return out
    for name, c in main["single"].items():
        kk = K if name == "best_single_eigenvalue" else 1
        layer, rest = divmod(c["column"], H * kk)
        c |= {"layer": layer, "head": rest // kk} | ({"rank": rest % kk} if kk > 1 else {})
    out["comparison"] = main
    out["k_ablation"] = {}
    for k in KS:
        if k <= k_max:
            r = compare_detectors({"lapeigvals": lap[..., :k].reshape(len(y), -1)}, y, groups, train, boot=boot)
            out["k_ablation"][k] = r["auroc"]["lapeigvals"]
    image_ctx = compare_detectors({"lookback_image": z["lookback_image"]}, y, groups, train, boot=boot)
    out["lookback_image_context"] = image_ctx["auroc"]["lookback_image"]
    observed = raw.parent / "hallucination.json"  # bench/hallucination.py's Lookback Lens on the same scenes, if run
    if observed.is_file():
        ref = json.loads(observed.read_text()).get("observations", {}).get("lookback", {}).get("detector_prompt_context")
        if ref:
            out["observations_lookback"] = {"lookback_lens": ref["lookback_lens"], "best_single_head": ref["best_single_head"],
                                            "n_train": ref["n_train"], "n_test": ref["n_test"]}
    return out


def f(ci, d=3) -> str:
    return f"{ci['value']:.{d}f} [{ci['low']:.{d}f}, {ci['high']:.{d}f}]"


DEFAULTS = {"captions": 150, "start": 60, "max_new_tokens": 56, "boot": 1000}


def command(s: dict, small: bool) -> str:
    """The command line that reproduces these numbers: the options that differ from the defaults are named."""
    if small:
        return "python bench/detectors.py --small"
    given = s["config"] | {"boot": s.get("boot", DEFAULTS["boot"])}
    return "python bench/detectors.py" + "".join(f" --{k.replace('_', '-')} {given[k]}" for k, v in DEFAULTS.items()
                                                 if k in given and given[k] != v)


def section(s: dict, small: bool) -> str:
    L = [BEGIN, "", "## Hallucination detectors: LapEigvals beside Lookback Lens", ""]
    cfg = s["config"]
    L.append(f"Generated by `{command(s, small)}` ({time.strftime('%Y-%m-%d %H:%M')}; "
             f"{platform.platform()}; torch {torch.__version__}); this section only, the rest of the file is "
             "bench/hallucination.py's.")
    if small:
        L += ["", "**Small smoke run (`--small`): few short captions, not for quoting.**"]
    L += ["", f"* Data: {s['captions']} greedy scene-vlm captions (\"Describe the image.\", up to {cfg['max_new_tokens']} "
          f"new tokens) of test scenes {cfg['start']}..{cfg['start'] + cfg['captions'] - 1}; {s['spans']} object words, "
          f"{s['hallucinated']} hallucinated (class not in the scene: exact labels).",
          "* Features, from one capture per caption (all prefill rows, then the generating query's row per step; "
          f"SDPA on): Lookback Lens, the lookback ratio (prompt as context) of each of the {s['layers']} x "
          f"{s['heads']} heads averaged over the word's tokens; LapEigvals, per head the top-{s['k']} eigenvalues "
          "of the Laplacian (L = D - A, d_i = attention node i receives / nodes that can attend to it) of the "
          "causal attention graph up to the query that generated the word's last token, with the generating "
          "positions as nodes (the default: the last prompt token and the generated tokens) or every position "
          f"as a node (the paper's whole-sequence graph); {s['layers'] * s['heads'] * s['k']} features each, k "
          "fixed before the run. Every probe: the same standardised logistic regression (C = 0.1, balanced classes).",
          f"* Cost: the default graph is all LapEigvals needs from a caption; `generate_graph` captures only those "
          f"keys (`keys=[last prompt position, \"generated\"]`): {s['graph_mb']:.2f} MB of float32 per caption of "
          f"{s['mean_tokens']:.0f} tokens on average, for all {s['layers']} x {s['heads']} heads. Cached features: "
          "results/hallucination/detectors.npz (not committed; `--report` reuses it).",
          "* Split: spans of the first half of the images train every detector and pick the single best column; "
          "the others test. Intervals: 95% cluster bootstrap over test captions (one per image), since spans of one "
          "caption share its image and nested prefixes of one attention graph.", ""]
    if "error" in s:
        return "\n".join(L + [f"Not evaluated: {s['error']}.", "", END])
    c = s["comparison"]
    a, single = c["auroc"], c["single"]
    bh, be = single["best_head_lookback"], single["best_single_eigenvalue"]
    L += [f"Trained on {c['n_train']} spans ({c['hallucinated_train']} hallucinated) of {c['groups_train']} captions, "
          f"tested on {c['n_test']} ({c['hallucinated_test']}) of {c['groups_test']}.", "",
          "| detector | test AUROC |", "|---|---|",
          f"| LapEigvals (top-{s['k']} Laplacian eigenvalues per head; generating positions as nodes) | {f(a['lapeigvals'])} |",
          f"| LapEigvals, every position a node (the paper's whole-sequence graph, prompt included) | "
          f"{f(a['lapeigvals_all'])} |",
          f"| Lookback Lens (lookback ratio per head) | {f(a['lookback'])} |",
          f"| LapEigvals + Lookback Lens features | {f(a['lapeigvals+lookback'])} |",
          f"| best single head, lookback ratio (L{bh['layer']} H{bh['head']}, chosen on training spans) | "
          f"{f(a['best_head_lookback'])} |",
          f"| best single eigenvalue (L{be['layer']} H{be['head']} rank {be['rank'] + 1}, chosen on training spans) | "
          f"{f(a['best_single_eigenvalue'])} |",
          f"| LapEigvals trained on shuffled labels | {f(a['lapeigvals_shuffled'])} |",
          f"| LapEigvals (every position) trained on shuffled labels | {f(a['lapeigvals_all_shuffled'])} |",
          f"| Lookback Lens trained on shuffled labels | {f(a['lookback_shuffled'])} |", "",
          f"Paired differences on the same resamples: LapEigvals - Lookback Lens {f(a['lapeigvals-lookback'])}; "
          f"LapEigvals (every position) - Lookback Lens {f(a['lapeigvals_all-lookback'])}; "
          f"LapEigvals + Lookback Lens features - Lookback Lens {f(a['lapeigvals+lookback-lookback'])}.", "",
          "LapEigvals test AUROC by k (ablation on the same split; the comparison above uses the k fixed beforehand): "
          + ", ".join(f"k={k}: {f(v)}" for k, v in s["k_ablation"].items()) + ".", "",
          f"Lookback Lens with the image tokens alone as context: {f(s['lookback_image_context'])}.", ""]
    ref = s.get("observations_lookback")
    if ref and not small:
        same = (ref["n_train"], ref["n_test"]) == (c["n_train"], c["n_test"]) and all(
            abs(ref[r][q] - a[m][q]) < 5e-4 for r, m in (("lookback_lens", "lookback"), ("best_single_head", "best_head_lookback"))
            for q in ("value", "low", "high"))
        L += [("The Lookback Lens and best-head rows equal" if same else "**The Lookback Lens and best-head rows differ from**")
              + f" those of the observations above (bench/hallucination.py's own traces of the same scenes: "
              f"{f(ref['lookback_lens'])} and {f(ref['best_single_head'])}), an end-to-end check that both commands "
              "see the same captions, spans, labels and split.", ""]
    L += verdict(a) + ["", END]
    return "\n".join(L)


def verdict(a: dict) -> list[str]:
    """One line per paired difference against Lookback Lens: better, worse, or not shown either way."""
    names = {"lapeigvals": "LapEigvals (generating positions)", "lapeigvals_all": "LapEigvals (every position)",
             "lapeigvals+lookback": "LapEigvals + Lookback Lens features"}
    out = []
    for key, name in names.items():
        d = a[f"{key}-lookback"]
        if d["low"] > 0:
            out.append(f"* {name} separates hallucinated object words better than Lookback Lens: {f(d)}.")
        elif d["high"] < 0:
            out.append(f"* {name} separates hallucinated object words worse than Lookback Lens: {f(d)}, the interval excludes 0.")
        else:
            out.append(f"* {name} against Lookback Lens: {f(d)}, the interval includes 0: neither is shown better.")
    ctrl = [n for n in a if n.endswith("_shuffled") and not a[n]["low"] <= 0.5 <= a[n]["high"]]
    return out + ([f"* Control check failed: {', '.join(ctrl)} has an interval excluding 0.5."] if ctrl else
                  ["* Every probe trained on shuffled labels has an interval containing 0.5."])


def main(argv=None, model=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=DEFAULTS["captions"])
    ap.add_argument("--start", type=int, default=DEFAULTS["start"], help="first test scene (60: those of hallucination.py's traces)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    ap.add_argument("--boot", type=int, default=DEFAULTS["boot"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=None, help="results folder (default bench/results; --small: a temporary one)")
    ap.add_argument("--report", action="store_true", help="only summarise the cached features")
    ap.add_argument("--small", action="store_true", help="4 captions of 24 tokens, 50 resamples (smoke run)")
    args = ap.parse_args(argv)
    from attnscope.evaluate.bootstrap import FewUnitsWarning

    if args.small:
        args.captions, args.max_new_tokens, args.boot = 4, 24, 50
    results = Path(args.results or (tempfile.mkdtemp(prefix="detectors-") if args.small else HERE / "results"))
    raw = results / "hallucination"
    torch.set_num_threads(args.threads)
    if not args.report:
        if model is None:
            from attnscope.models import scene_vlm

            model = scene_vlm.load()
        cfg = {k: getattr(args, k) for k in ("captions", "start", "max_new_tokens")}
        generate(model, argparse.Namespace(**cfg), raw)
    elif not (raw / "detectors.npz").is_file():
        print(f"error: no cached features in {raw}; run without --report first", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        if args.small:  # a smoke run has few captions by design; the section says it is not for quoting
            warnings.simplefilter("ignore", FewUnitsWarning)
        summary = summarize(raw, args.boot)
    (results / "hallucination-detectors.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    write_section(results / "hallucination.md", section(summary, args.small))
    log(f"wrote the detector section of {results / 'hallucination.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
