#!/usr/bin/env python
"""Host time of the weights fingerprint of unchanged weights: what every capture block pays at its end.

Before, `fingerprint` took a full walk each time: `weights` (`state_dict(keep_vars=True)` and the buffers it leaves
out), the key (per tensor its identity, counter, layout and a strided sample, concatenated per device and dtype) and a
comparison with the kept key. Now a kept plan (models/fingerprint_plan.py) tells the same without `state_dict()`.
Both are timed here in the same process, interleaved, on the LLaVA-1.5-7B structure (689 tensors, 3 of them
non-persistent buffers; tiny widths on the CPU, `gpu.configs` + `launches.tiny`) and on SmolLM2-135M (real weights).
The fast check is split into its Python part (the structure, counters, layouts) and its bytes (one copy of the sampled
elements per device and dtype and one comparison): on a GPU the bytes are device work (a few kernels and one read of a
flag), on the CPU they are host time.

    flock /tmp/attnscope-heavy.lock python bench/fingerprint.py    # -> bench/results/fingerprint.md and .json
    python bench/fingerprint.py --small    # tiny structure, few repetitions, no files (tests/test_bench_fingerprint.py)"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPEATS, NUMBER = 15, 20


def _models(small: bool):
    import gpu
    import launches
    import torch

    import attnscope

    if small:
        yield "LLaVA structure (4 language, 3 tower layers)", gpu.build(gpu.configs(True), "cpu", torch.float32)
        return
    cfg = gpu.configs(False)
    launches.tiny(cfg)
    yield "LLaVA-1.5-7B structure (tiny widths)", gpu.build(cfg, "cpu", torch.float32)
    yield "SmolLM2-135M", attnscope.load("smollm2-135m")


def _per_call(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e3


def measure(model, repeats: int = REPEATS, number: int = NUMBER) -> dict:
    import torch

    from attnscope.models import fingerprint as fp

    hf = model.hf
    first = model.fingerprint
    kept = fp._KEPT[hf]
    assert kept.plan is not None, "no plan was built: the fast check does not apply to this model"

    def full_walk():  # the unchanged-weights path before the plan
        with torch.no_grad():
            return fp.same_key(fp.weights_key(fp.weights(hf)), kept.key)

    def python_part():  # the fast check without its bytes
        views, kept.plan.views = kept.plan.views, {}
        try:
            return kept.plan.unchanged(hf)
        finally:
            kept.plan.views = views

    assert full_walk() and python_part() and model.fingerprint == first
    times = {"full walk": [], "fast check": [], "its Python part": []}
    for _ in range(repeats):  # interleaved, so contention hits all alike
        times["full walk"].append(_per_call(full_walk, number))
        times["fast check"].append(_per_call(lambda: model.fingerprint, number))
        times["its Python part"].append(_per_call(python_part, number))
    assert fp._KEPT[hf] is kept and model.fingerprint == first  # every read was the fast check's (a walk replaces it)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"tensors": len(fp.weights(hf)), "modules": len(list(hf.modules())),
            "sampled elements": sum(v.numel() for parts in kept.plan.views.values() for v in parts),
            "ms": medians, "ratio": medians["full walk"] / medians["fast check"]}


def report(results: dict) -> str:
    lines = ["# Weights fingerprint of unchanged weights: host time per read", "",
             "`flock /tmp/attnscope-heavy.lock python bench/fingerprint.py`, CPU, 1 thread; medians of "
             f"{REPEATS} interleaved repetitions of {NUMBER} reads. \"full walk\": the path before the plan "
             "(`state_dict()` and the buffers it leaves out, the key, the comparison); \"fast check\": "
             "`Model.fingerprint` now; \"its Python part\": the fast check without the copy and comparison of the "
             "sampled bytes (device work on a GPU).", "",
             "| model | tensors | modules | sampled elements | full walk (ms) | fast check (ms) | its Python part (ms) "
             "| speed-up |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ms = r["ms"]
        lines.append(f"| {name} | {r['tensors']} | {r['modules']} | {r['sampled elements']} | {ms['full walk']:.2f} | "
                     f"{ms['fast check']:.2f} | {ms['its Python part']:.2f} | {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"


def run(small: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    return {name: measure(model, *((2, 2) if small else ())) for name, model in _models(small)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny structure, few repetitions; no files")
    small = ap.parse_args().small
    results = run(small)
    if small:
        print(report(results))
        return
    out = HERE / "results"
    (out / "fingerprint.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "fingerprint.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
