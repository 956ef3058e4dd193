#!/usr/bin/env python
"""Host time per prefill on the LLaVA-1.5-7B structure at tiny widths: what capture and token pruning add to the work
the host does, measured on the CPU.

A 7B prefill of a few hundred tokens on an H200 is bound by the host (bench/results/gpu.md: the plain prefill takes the
same ~45 ms at 256 and 1k tokens): Python and PyTorch's dispatch of each operator, not the GPU, set its time, so what
capture adds on the host adds to the prefill one for one. The same structure (a CLIP ViT-L/14-336 tower of 24 layers, a
Llama-2-7B language model of 32 layers x 32 heads) at widths where the arithmetic is negligible makes a CPU forward
host-bound too, so its time ratios show the host work capture adds, against the host work of the model itself. It is a
proxy, not a GPU measurement: a GPU launch costs more than a CPU operator of this size, which raises both sides; the
weights fingerprint (a fixed cost per capture block, see `models/fingerprint.py`) is measured alone beside it.
bench/launches.py counts the operators of the same prefills exactly.

Rows: "text": 32 text tokens (32 attention calls); "image": one image of a 4x4 patch grid (56 px; the host work per
call does not depend on the number of patches) and 41 text tokens (56 attention calls). Time: wall clock, every
configuration once per round in a shuffled order, ratio = median over rounds of configuration / its baseline in the
same round, one torch thread. What a capture adds per attention call leaves out the weights fingerprint, read once
per capture block (its time is the line under the table).

    python bench/host.py            # -> bench/results/host.md and .json
    python bench/host.py --small    # tiny structure, 2 rounds, no files (tests/test_bench_host.py)"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PAIRS = [("text: capture(queries='last')", "text: plain SDPA", "text"),
         ("image: capture(queries='last')", "image: plain SDPA", "image"),
         ("image: FastV K=2 keep 50%", "image: plain SDPA, use_cache", None)]


def configs(m, x: dict, text: dict) -> dict:
    import attnscope
    from attnscope.steer import FastV, steer

    hf = m.hf

    def last(inputs):
        with attnscope.capture(m, queries="last") as trace:
            hf(**inputs, logits_to_keep=1)
        return trace

    def fastv():
        with steer(m, FastV(k=2, keep=0.5)):
            return hf(**x, use_cache=True, logits_to_keep=1)

    return {"text: plain SDPA": lambda: hf(**text, logits_to_keep=1),
            "text: capture(queries='last')": lambda: last(text),
            "image: plain SDPA": lambda: hf(**x, logits_to_keep=1),
            "image: capture(queries='last')": lambda: last(x),
            "image: plain SDPA, use_cache": lambda: hf(**x, use_cache=True, logits_to_keep=1),
            "image: FastV K=2 keep 50%": fastv}


def run(small: bool, n_rounds: int) -> dict:
    import torch

    import gpu
    import launches

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = gpu.configs(small)
    if not small:
        launches.tiny(cfg)
        cfg.vision_config.image_size = 56  # a 4x4 patch grid: the tower's arithmetic negligible as well
    m = gpu.build(cfg, "cpu", torch.float32)
    x = gpu.inputs(cfg, gpu.patches(cfg) + 41, "cpu", torch.float32)
    text = gpu.inputs(cfg, 32, "cpu", torch.float32, image=False)
    fns = configs(m, x, text)
    with torch.no_grad():
        for fn in fns.values():  # warm-up: lazy initialisation (the weights fingerprint, caches) once only
            fn()
        traces = {name: fns[name]() for name in fns if "capture" in name}
        times = gpu.rounds(fns, 0, n_rounds, "cpu")["times_s"]
        fingerprint = min(timeit.repeat(lambda: m.fingerprint, number=5, repeat=3)) / 5
    ratios = {}
    for name, base, _ in PAIRS:
        r = [a / b for a, b in zip(times[name], times[base])]
        ratios[name] = {"baseline": base, "ratio": statistics.median(r), "min": min(r), "max": max(r)}
    calls = {"text": cfg.text_config.num_hidden_layers,
             "image": cfg.text_config.num_hidden_layers + cfg.vision_config.num_hidden_layers}
    recorded = {name: sum(len(v) for v in t.runs[0].records.values()) for name, t in traces.items()}
    return {"rounds": n_rounds, "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "ratios": ratios, "attention_calls": calls, "records": recorded, "fingerprint_ms": fingerprint * 1e3,
            "tensors": len(m.hf.state_dict()), "machine": {"cpu": platform.processor() or platform.machine(),
                                                            "torch": torch.__version__}}


ROUNDS = 21


def command(rounds: int) -> str:
    """The command that gives a result of `rounds` rounds."""
    return "python bench/host.py" + ("" if rounds == ROUNDS else f" --rounds {rounds}")


def report(res: dict, md: Path) -> None:
    L = ["# Host time per prefill: the LLaVA-1.5-7B structure at tiny widths (CPU)", "",
         f"Command: `{command(res['rounds'])}`. {__doc__.split(chr(10) + chr(10))[1]}", "",
         __doc__.split(chr(10) + chr(10))[2], "",
         f"Machine: {res['machine']['cpu']}, torch {res['machine']['torch']}; {res['rounds']} rounds.", "",
         "| prefill | baseline | median ms | baseline ms | ratio (min..max) | added per attention call (fingerprint apart) |",
         "|---|---|---|---|---|---|"]
    for name, base, per in PAIRS:
        r, t = res["ratios"][name], res["median_ms"]
        # the fingerprint is read once per block, not per call: left out of what each call adds
        added = (f"{(t[name] - t[base] - res['fingerprint_ms']) / res['attention_calls'][per] * 1e3:.0f} us" if per
                 else "-")
        L.append(f"| {name} | {base} | {t[name]:.2f} | {t[base]:.2f} | **{r['ratio']:.3f}x** ({r['min']:.3f}.."
                 f"{r['max']:.3f}) | {added} |")
    L += ["", f"Weights fingerprint, unchanged weights ({res['tensors']} tensors; read once at the end of every capture "
          f"block that ran a forward, included in the capture rows above): **{res['fingerprint_ms']:.2f} ms**.", ""]
    md.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny structure (4 language, 3 tower layers), 2 rounds; no files")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    res = run(args.small, 2 if args.small else args.rounds)
    if args.small:
        print(json.dumps(res["ratios"]))
        return
    out = HERE / "results"
    (out / "host.json").write_text(json.dumps(res, indent=1))
    report(res, out / "host.md")
    print((out / "host.md").read_text())


if __name__ == "__main__":
    main()
