#!/usr/bin/env python
"""Summaries files: save and load time of format /2 (packed: one tensor per stream, layer and summary) against /1
(one tensor per record and summary, the writer kept in `capture/summaries_file_v1.py`), in the same run.

    flock /tmp/attnscope-heavy.lock python bench/summaries_file.py   # writes results/summaries_file.md and .json
    python bench/summaries_file.py --small --out /tmp/x               # a quick smoke version (CI)

Two captures of SmolLM2-135M with `queries="last", summaries="all"` (every layer and head, the default top-5):
- one generation of 200 new tokens (greedy, `min_new_tokens=200`): 200 records per layer;
- a dataset-like capture: 40 prompts, 10 new tokens each, in one capture block: 40 runs.
Each is written in both formats; every repetition times, in a shuffled order: save /1, save /2, load /1 (`Trace.load`,
which reads and checks every tensor), load /2 (`Trace.load`: metadata checked, no tensor read), load /2 then read
every summary (`Summaries.verify()`: every pack read and checked; what load /1 does), load /2 then read one layer
(the lookback ratios of layer 15 over every step). A ratio is the median over repetitions of (/1 time / /2 time in
that repetition). Files are in the page cache (written just before): this is CPU time, not disk. Each file is
checked to read back bit for bit (every record's labels and every tensor's dtype, shape and bytes) before timing."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TIMED = ("save /1", "save /2", "load /1", "load /2", "load /2 + read all", "load /2 + read one layer")
RATIOS = {"save": ("save /1", "save /2"), "load": ("load /1", "load /2"),
          "load, every tensor read and checked": ("load /1", "load /2 + read all"),
          "load, one layer read": ("load /1", "load /2 + read one layer")}
GOAL = {"load": 5.0}


def capture(model, prompts: list[str], new_tokens: int):
    import torch

    import attnscope

    with torch.no_grad(), attnscope.capture(model, queries="last", summaries="all") as s:
        for prompt in prompts:
            model.generate(**model.encode(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
    s.verify()
    return s


def same(a, b) -> None:
    """Raise unless `a` and `b` hold the same runs, records and tensors, bit for bit."""
    import torch

    assert a.provenance == b.provenance and len(a.runs) == len(b.runs)
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.steps, ra.lengths, list(ra.records)) == (rb.steps, rb.lengths, list(rb.records))
        for key in ra.records:
            for x, y in zip(ra.records[key], rb.records[key], strict=True):
                tx, ty = x.tensors(), y.tensors()
                assert x.meta() == y.meta() and list(tx) == list(ty)
                for n in tx:
                    assert tx[n].dtype == ty[n].dtype and tx[n].shape == ty[n].shape
                    assert torch.equal(tx[n].contiguous().reshape(-1).view(torch.uint8),
                                       ty[n].contiguous().reshape(-1).view(torch.uint8)), (key, n)


def tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


def one_layer(loaded, layer: int) -> list:
    """The lookback ratios of `layer` over every step of every run."""
    return [loaded.lookback("text", layer, step=None, run=r) for r in range(len(loaded.runs))]


def timing(s, tmp: Path, reps: int, layer: int, seed: int = 0) -> dict:
    from attnscope.capture import summaries_file_v1
    from attnscope.capture.summaries import Summaries

    p1, p2 = tmp / "s1.safetensors", tmp / "s2.safetensors"
    summaries_file_v1.save(s, p1)
    s.save(p2)
    same(s, Summaries.load(p2))
    same(Summaries.load(p1), Summaries.load(p2))
    jobs = {"save /1": lambda: summaries_file_v1.save(s, p1), "save /2": lambda: s.save(p2),
            "load /1": lambda: Summaries.load(p1), "load /2": lambda: Summaries.load(p2),
            "load /2 + read all": lambda: Summaries.load(p2).verify(),
            "load /2 + read one layer": lambda: one_layer(Summaries.load(p2), layer)}
    rng = random.Random(seed)
    seconds = {name: [] for name in TIMED}
    for _ in range(reps):
        order = list(TIMED)
        rng.shuffle(order)
        for name in order:
            gc.collect()
            start = time.perf_counter()
            jobs[name]()
            seconds[name].append(time.perf_counter() - start)
    ratios = {}
    for label, (base, new) in RATIOS.items():
        per = [b / n for b, n in zip(seconds[base], seconds[new])]
        ratios[label] = {"ratio": statistics.median(per), "min": min(per), "max": max(per), "per_rep": per,
                         "goal": GOAL.get(label)}
    records = sum(len(v) for r in s.runs for v in r.records.values())
    return {"runs": len(s.runs), "records": records,
            "tensors": {"/1": tensor_count(p1), "/2": tensor_count(p2)},
            "bytes": {"/1": p1.stat().st_size, "/2": p2.stat().st_size},
            "median_s": {name: statistics.median(v) for name, v in seconds.items()}, "seconds": seconds,
            "ratios": ratios}


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summaries_file.json").write_text(json.dumps(doc, indent=1))
    c, m = doc["config"], doc["machine"]
    lines = ["# Summaries files: format /2 (packed) against /1 (a tensor per record)", "",
             f"Produced by `{c['command']}` on {m['cpu']} (1 thread), torch {m['torch']}, transformers "
             f"{m['transformers']}. SmolLM2-135M, `capture(queries=\"last\", summaries=\"all\")` (30 layers x 9 heads, "
             f"top-5), greedy. {c['reps']} interleaved repetitions in shuffled order; a ratio is the median of "
             "per-repetition ratios (/1 time over /2 time in the same repetition). Files in the page cache: CPU time, "
             "not disk. Both files were checked to read back bit for bit before timing.", ""]
    for name, r in doc["cases"].items():
        lines += [f"## {name}", "",
                  f"{r['runs']} run(s), {r['records']} records; tensors in the file: {r['tensors']['/1']} (/1), "
                  f"{r['tensors']['/2']} (/2); size {r['bytes']['/1'] / 2**20:.2f} MiB (/1), "
                  f"{r['bytes']['/2'] / 2**20:.2f} MiB (/2).", "",
                  "| operation | median s |", "|---|---|"]
        lines += [f"| {op} | {s:.4f} |" for op, s in r["median_s"].items()]
        lines += ["", "| /1 time over /2 time | ratio | over repetitions | goal |", "|---|---|---|---|"]
        for label, q in r["ratios"].items():
            goal = f"≥{q['goal']:g}x {'(met)' if q['ratio'] >= q['goal'] else '(NOT met)'}" if q["goal"] else ""
            lines.append(f"| {label} | {q['ratio']:.1f}x | {q['min']:.1f}–{q['max']:.1f} | {goal} |")
        lines.append("")
    lines += ["Load /1 reads every tensor and checks its blake2b checksum and finite values at load; load /2 checks "
              "the metadata (its XXH3-128 seal, every record's dims and start against its packs' sizes, its "
              "steps and query rows against its run, the file's tensors against the packs) and reads a pack when a record first needs it, checking its XXH3-128 checksum and "
              "finite values then (so `load /2 + read all` does what `load /1` does). Per-repetition times are in "
              f"`summaries_file.json`; load average (1, 5, 15 min) {' '.join(f'{x:.2f}' for x in c['loadavg_start'])} "
              f"→ {' '.join(f'{x:.2f}' for x in c['loadavg_end'])} on a 2-core machine shared with other jobs.", ""]
    (out / "summaries_file.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a quick version: few steps, runs and repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch
    import transformers

    import attnscope

    torch.set_num_threads(1)
    reps = args.reps or (2 if args.small else 7)
    model = attnscope.load("smollm2-135m")
    steps, (n_prompts, per_prompt) = (4, (2, 3)) if args.small else (200, (40, 10))
    prompts = [f"Fact {i}: the capital of {c} is" for i, c in zip(range(n_prompts), ["France", "Spain", "Peru", "Chad"]
                                                                   * n_prompts)]
    cases = {f"one generation of {steps} new tokens": capture(model, ["The capital of France is"], steps),
             f"{n_prompts} prompts of {per_prompt} new tokens in one capture": capture(model, prompts, per_prompt)}
    doc = {"config": {"reps": reps, "small": args.small, "threads": torch.get_num_threads(),
                      "command": "python bench/summaries_file.py" + (" --small" if args.small else ""),
                      "loadavg_start": os.getloadavg()},
           "machine": {"cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                    if ln.startswith("model name")), platform.processor()),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in cases.items():
            doc["cases"][name] = timing(s, Path(tmp), reps, layer=15)
    doc["config"]["loadavg_end"] = os.getloadavg()
    write(doc, args.out)
    print((args.out / "summaries_file.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
