#!/usr/bin/env python
"""Summaries reduced in the attention call (`capture(..., summaries="all")`) during a POPE run on scene-vlm, against
the same run unsteered and uncaptured.

    flock /tmp/attnscope-heavy.lock python bench/summaries.py           # writes results/summaries.md and .json
    python bench/summaries.py --small --out /tmp/x                      # a quick smoke version (CI)

Time: POPE questions (`evaluate.pope.scene_questions`, greedy, 3 new tokens as in the harness) answered by
`generate` alone and inside a capture of every summary (role mass, lookback ratio, entropy, top-5 keys) of every
layer and head of both streams (DINOv2 tower and language model), one capture per question as the harness does;
with the last query row of each step (what the POPE/CHAIR/Lookback harness reads) and with every query row;
and the harness's own selection (the language model's role mass, last query row: `evaluate/lookback.py`), also
inside `model.frozen_weights()` as a dataset loop runs it. The
configurations run in a shuffled order in every repetition, each over the same questions; a ratio is the median over
repetitions of (configuration time / uncaptured time in that repetition). Only `generate` is timed (encoding the
prompt and image is the same in every configuration). The answers must be identical in every configuration.

Memory: one capture held open over the whole run (dataset scale), each configuration in a fresh process; the peak
resident memory above the uncaptured run's peak (`VmHWM`, reset after loading), and the bytes the result retains,
for summaries and for rows of the same selection. This file is also that child program (`--mem`)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NEW_TOKENS = 3
TIMED = {  # name: capture keywords (None: no capture)
    "uncaptured": None,
    "summaries, last query row": {"queries": "last", "summaries": "all"},
    "summaries, every query row": {"summaries": "all"},
    # the same, the run inside `model.frozen_weights()`: each block's fingerprint read skips the sampled-bytes copy
    "summaries, last query row, weights frozen": {"queries": "last", "summaries": "all", "frozen": True},
    # what the Lookback harness captures (`evaluate/lookback.py:generate_traced`): role mass of the language model
    "harness's summaries (language role mass), last query row": {"streams": "language", "queries": "last",
                                                                 "summaries": ["role_mass"]},
    # the same in a dataset loop inside `model.frozen_weights()`, as `evaluate/lookback.py` advises for many items
    "harness's summaries, weights frozen": {"streams": "language", "queries": "last", "summaries": ["role_mass"],
                                            "frozen": True},
}
MEMORY = {
    "uncaptured": None,
    "summaries, every query row": {"summaries": "all"},
    "rows, every query row": {},
    "summaries, last query row": {"queries": "last", "summaries": "all"},
    "rows, last query row": {"queries": "last"},
}


def questions(model, n: int) -> list[dict]:
    from attnscope.evaluate.pope import Generator, scene_questions

    qs, image_of = scene_questions(n=-(-n // 3))  # n per split (random, popular, adversarial)
    ask = Generator(model, max_new_tokens=NEW_TOKENS)
    return [model.encode(ask.prompt(q.question), image_of(q.image_id)) for q in qs[:n]]


def answer(model, inputs: list[dict], kw: dict | None, keep: bool = False):
    """Generated ids per question, and the seconds spent in generate (captures opened around each call; with
    "frozen", the run inside `model.frozen_weights()`, whose checks at its two ends are timed too)."""
    from contextlib import nullcontext

    import torch

    import attnscope

    kw = None if kw is None else dict(kw)
    frozen = kw.pop("frozen", False) if kw is not None else False
    outs, seconds, held = [], 0.0, []
    start = time.perf_counter()
    block = model.frozen_weights() if frozen else nullcontext()
    with block:
        seconds += time.perf_counter() - start
        for x in inputs:
            start = time.perf_counter()
            with torch.no_grad():
                if kw is None:
                    out = model.generate(**x, max_new_tokens=NEW_TOKENS, do_sample=False)
                else:
                    with attnscope.capture(model, **kw) as result:
                        out = model.generate(**x, max_new_tokens=NEW_TOKENS, do_sample=False)
                    if keep:
                        held.append(result)
            seconds += time.perf_counter() - start
            outs.append(out[0, x["input_ids"].shape[1]:].tolist())
        start = time.perf_counter()
    seconds += time.perf_counter() - start
    return outs, seconds, held


def retained(results) -> int:
    total = 0
    for r in results:
        for run in r.runs:
            for recs in run.records.values():
                for rec in recs:
                    total += rec.nbytes if hasattr(rec, "tensors") else rec.probs.numel() * rec.probs.element_size()
    return total


def hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def mem_child(name: str, n: int) -> None:
    """One configuration in this fresh process: the peak memory of a whole run whose results are all kept."""
    import torch

    import attnscope

    torch.set_num_threads(1)
    model = attnscope.load("scene-vlm")
    inputs = questions(model, n)
    answer(model, inputs[:1], MEMORY[name])  # warm-up
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    start = hwm_kb()
    _, _, held = answer(model, inputs, MEMORY[name], keep=True)
    print(json.dumps({"peak_above_start_mib": (hwm_kb() - start) / 1024, "retained_bytes": retained(held)}))


def memory(n: int) -> dict:
    out = {}
    for name in MEMORY:
        proc = subprocess.run([sys.executable, __file__, "--mem", name, "--n", str(n)], capture_output=True,
                              text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["uncaptured"]["peak_above_start_mib"]
    for row in out.values():
        row["peak_above_uncaptured_mib"] = row["peak_above_start_mib"] - base
    return out


def timing(model, inputs: list[dict], reps: int, seed: int = 0) -> dict:
    answer(model, inputs[:2], None)  # warm-up of every path
    for kw in TIMED.values():
        answer(model, inputs[:1], kw)
    rng, times, answers = random.Random(seed), {k: [] for k in TIMED}, {}
    for _ in range(reps):
        order = list(TIMED)
        rng.shuffle(order)
        for name in order:
            outs, seconds, _ = answer(model, inputs, TIMED[name])
            times[name].append(seconds)
            if answers.setdefault(name, outs) != outs:
                raise AssertionError(f"{name}: answers differ between repetitions")
    differ = [name for name in TIMED if answers[name] != answers["uncaptured"]]
    if differ:
        raise AssertionError(f"{differ}: answers differ from the uncaptured run")
    base = times["uncaptured"]
    return {name: {"seconds": t, "median_seconds": statistics.median(t),
                   "ratio": statistics.median(x / b for x, b in zip(t, base)),
                   "ratios": [x / b for x, b in zip(t, base)]} for name, t in times.items()}


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summaries.json").write_text(json.dumps(doc, indent=1))
    t, m, cfg = doc["timing"], doc.get("memory"), doc["config"]
    lines = ["# Summaries reduced in the attention call during a POPE run (scene-vlm)", "",
             f"Produced by `{cfg['command']}` on {doc['machine']['cpu']} ({cfg['threads']} thread"
             f"{'s' if cfg['threads'] > 1 else ''}), torch {doc['machine']['torch']}, transformers "
             f"{doc['machine']['transformers']}. {cfg['questions']} POPE questions (greedy, {NEW_TOKENS} new tokens), "
             f"{cfg['reps']} interleaved repetitions in shuffled order; ratios are medians of per-repetition ratios to "
             "the uncaptured run of the same repetition. Summaries: role mass, lookback ratio, entropy and top-5 keys "
             "of every layer and head of both streams (DINOv2 tower: 12 layers x 6 heads; language model: 30 x 9). "
             "Answers were identical in every configuration.", "",
             "| configuration | median s (all questions) | time ratio | ratios over repetitions | goal |",
             "|---|---|---|---|---|"]
    for name, row in t.items():
        goal = "≤1.05x" if name.startswith(("summaries, last", "harness")) else ""
        spread = f"{min(row['ratios']):.3f}–{max(row['ratios']):.3f}" if name != "uncaptured" else ""
        lines.append(f"| {name} | {row['median_seconds']:.2f} | {row['ratio']:.3f}x | {spread} | {goal} |")
    plain, frozen = t["summaries, last query row"]["ratio"], t["summaries, last query row, weights frozen"]["ratio"]
    harness = t["harness's summaries (language role mass), last query row"]["ratio"]
    harness_frozen = t["harness's summaries, weights frozen"]["ratio"]
    load = " → ".join(" ".join(f"{x:.2f}" for x in cfg[k]) for k in ("loadavg_start", "loadavg_end") if k in cfg)
    lines += ["", "Goal ≤1.05x of the uncaptured run, last query row of every step: every summary of both streams "
              f"{plain:.4f}x ({'met' if plain <= 1.05 else 'not met'}) with a full weights check at each capture "
              f"block's end, {frozen:.4f}x ({'met' if frozen <= 1.05 else 'not met'}) with the run inside "
              "`model.frozen_weights()`, where each block's fingerprint read skips the copy of the sampled bytes (on "
              "the CPU it touches about every memory page of the weights) and the full check runs when the run "
              "starts and ends. What the Lookback harness captures (`evaluate/lookback.py:generate_traced`: the "
              "language model's role masses, from which its lookback ratios and image shares come): "
              f"{harness:.4f}x ({'met' if harness <= 1.05 else 'not met'}) with the full weights check at each "
              f"block's end, {harness_frozen:.4f}x ({'met' if harness_frozen <= 1.05 else 'not met'}) in a loop "
              "inside `model.frozen_weights()`, as a dataset run does. Per-repetition "
              f"ratios are in `summaries.json`; load average (1, 5, 15 min) {load} on a 2-core machine shared with "
              "other jobs, so a single repetition can be off by tens of percent (the median is what counts)."]
    if m:
        lines += ["", f"## Memory: one capture held over {cfg['memory_questions']} questions, each configuration in a "
                  "fresh process", "",
                  "| configuration | peak above the uncaptured run (MiB) | retained by the result |", "|---|---|---|"]
        for name, row in m.items():
            lines.append(f"| {name} | {row['peak_above_uncaptured_mib']:.1f} | {row['retained_bytes'] / 2**20:.2f} MiB |")
        s, r = m["summaries, every query row"], m["rows, every query row"]
        lines += ["", f"Summaries of every row retain {s['retained_bytes'] / r['retained_bytes']:.3f}x the bytes of the "
                  "rows (a fixed size per row: 10 role masses, lookback, entropy, 5 indices and 5 values, against one "
                  "probability per key); nothing larger than one chunk of rows [heads, 256, keys] or the reducer's "
                  "4 MiB queue (a forward's rows, reduced in one batch when it ends) is held."]
    (out / "summaries.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a quick version: few questions and repetitions, no memory")
    ap.add_argument("--n", type=int, default=None, help="POPE questions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--mem", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem:
        mem_child(args.mem, args.n)
        return 0
    import torch
    import transformers

    import attnscope

    torch.set_num_threads(1)
    n = args.n or (3 if args.small else 12)
    reps = args.reps or (2 if args.small else 9)
    model = attnscope.load("scene-vlm")
    inputs = questions(model, n)
    doc = {"config": {"questions": n, "reps": reps, "threads": torch.get_num_threads(), "small": args.small,
                      "command": "python bench/summaries.py" + (" --small" if args.small else ""),
                      "loadavg_start": os.getloadavg()},
           "machine": {"cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                    if ln.startswith("model name")), platform.processor()),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "timing": timing(model, inputs, reps)}
    doc["config"]["loadavg_end"] = os.getloadavg()
    if not args.small:
        doc["config"]["memory_questions"] = 8
        doc["memory"] = memory(8)
    write(doc, args.out)
    print((args.out / "summaries.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
