#!/usr/bin/env python
"""Growth curve: the last-token rows of every layer and head vs a plain SDPA forward, as the context grows.

    python bench/growth.py            # smollm2-135m at 256, 1024, 4096 and 8192 tokens: writes
                                      # bench/results/growth.md, growth.json and growth.png
    python bench/growth.py --small    # 64 and 128 tokens, few rounds (CI smoke run): growth-small.*

Both configurations are one prefill forward with `logits_to_keep=1` (the next token's logits only, as a
generating prefill computes them; the full [T, vocab] logits would add the same 0.2-1.6 GB to both and hide
what the capture costs): the plain forward `m(**x, logits_to_keep=1)`, and the same call inside
`with attnscope.capture(m, queries="last")` (enter, forward, exit all timed).

Time: one model object per run; each round runs both configurations once in a shuffled order, after an untimed
warm-up round; ratio = median over rounds of (capture time / plain time of the same round). Peak memory: one
fresh subprocess per (length, configuration), as in bench/capture.py (`mem_child` there; the kernel's peak-RSS
counter is reset just before the measured call). Values: the captured last rows are compared with the model's
own eager attention for that row: a plain SDPA prefill of the first T-1 tokens, then the last token fed as a
decode step with the model switched to eager and `output_attentions=True` (a [heads, 1, T] row per layer, so
the reference costs no T x T matrix at any length)."""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from capture import MMAP_THRESHOLD, machine, status_kb, trim  # noqa: E402  (shared bench helpers)

MODEL = "smollm2-135m"
GOAL = 1.10
# tokens: (warm-up rounds, timed rounds)
FULL = {256: (1, 9), 1024: (1, 7), 4096: (1, 5), 8192: (1, 3)}
SMALL = {64: (1, 3), 128: (1, 3)}

# The Gettysburg Address (Bliss copy, 1864; public domain), repeated as needed and cut to the exact length.
TEXT = """Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in \
Liberty, and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, \
can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, \
as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting \
and proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The \
world will little note, nor long remember what we say here, but it can never forget what they did here. It is for \
us the living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so \
nobly advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these \
honored dead we take increased devotion to that cause for which they gave the last full measure of devotion -- \
that we here highly resolve that these dead shall not have died in vain -- that this nation, under God, shall have \
a new birth of freedom -- and that government of the people, by the people, for the people, shall not perish from \
the earth.

"""


def load():
    import attnscope

    return attnscope.load(MODEL)


def make_inputs(m, tokens: int) -> dict:
    reps = 1
    while (x := m.encode(text=TEXT * reps))["input_ids"].shape[1] < tokens:
        reps *= 2
    x = {k: v[:, :tokens].contiguous() for k, v in x.items()}
    assert x["input_ids"].shape == (1, tokens), x["input_ids"].shape
    return x


def call(m, x: dict, config: str):
    """One measured call: the plain forward ("sdpa") or the same forward under a last-row capture ("last")."""
    import attnscope

    if config == "sdpa":
        return m(**x, logits_to_keep=1)
    with attnscope.capture(m, queries="last") as trace:
        m(**x, logits_to_keep=1)
    return trace


# --- time ----------------------------------------------------------------------------------------------
def time_length(m, x: dict, warm: int, rounds: int, seed: int) -> dict:
    times = {"sdpa": [], "last": []}
    rng = random.Random(seed)
    for r in range(warm + rounds):
        order = list(times)
        rng.shuffle(order)
        for config in order:
            trim()
            t0 = time.perf_counter()
            out = call(m, x, config)
            dt = time.perf_counter() - t0
            del out
            if r >= warm:
                times[config].append(dt)
    ratios = [a / b for a, b in zip(times["last"], times["sdpa"])]
    return {"times_s": times, "ratios": ratios, "ratio": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios), "median_s": {k: statistics.median(v) for k, v in times.items()}}


# --- values --------------------------------------------------------------------------------------------
def check_values(m, x: dict) -> dict:
    """Max abs difference between the captured last rows and eager's own last rows (a decode step after an SDPA
    prefill of the first T-1 tokens), the row-sum error, and what the trace stores."""
    import torch

    trace = call(m, x, "last")
    ids, mask = x["input_ids"], x["attention_mask"]
    hf = m.hf
    pre = hf(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
    hf.set_attn_implementation("eager")
    try:
        step = hf(input_ids=ids[:, -1:], attention_mask=mask, cache=pre.cache, use_cache=True,
                  output_attentions=True, logits_to_keep=1)
    finally:
        hf.set_attn_implementation("sdpa")
    diff, rowsum, stored = 0.0, 0.0, 0
    for layer, ref in enumerate(step.attentions):  # [1, heads, 1, T]
        got = trace.attention("text", layer)  # [1, heads, 1, T]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        diff = max(diff, (got - ref.float()).abs().max().item())
        rowsum = max(rowsum, (got.sum(-1) - 1).abs().max().item())
    for run in trace.runs:
        for entries in run.records.values():
            stored += sum(r.probs.numel() * r.probs.element_size() for r in entries)
    del pre, step
    return {"last_vs_eager": diff, "rowsum_err": rowsum, "stored_bytes": stored,
            "layers": len(trace.runs[-1].records), "heads": int(got.shape[1]), "torch": torch.__version__}


# --- memory: one fresh subprocess per (length, configuration) --------------------------------------------
def mem_child(tokens: int, config: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    m = load()
    x = make_inputs(m, tokens)
    out = call(m, make_inputs(m, 16), config)  # warm-up on a tiny input: code paths, lazy init, fingerprint
    del out
    trim()
    before = status_kb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    out = call(m, x, config)
    after = status_kb()
    print("MEMJSON" + json.dumps({"rss_before_kb": before, "hwm_kb": after["VmHWM"],
                                  "peak_increase_kb": after["VmHWM"] - before}))


def run_mem(tokens: int, config: str, threads: int) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": str(threads),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--mem", str(tokens), config, "--threads", str(threads)],
                          capture_output=True, text=True, env=env, cwd=HERE.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[len("MEMJSON"):])


# --- report --------------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(t) for t in res["lengths"]]
    rows = [res["lengths"][str(t)] for t in lengths]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(lengths, [r["time"]["ratio"] for r in rows], "o-", label="time (median of rounds)")
    ax.fill_between(lengths, [r["time"]["min"] for r in rows], [r["time"]["max"] for r in rows], alpha=0.15,
                    label="time, min..max of rounds")
    mem = [(t, r["memory"]["ratio"]) for t, r in zip(lengths, rows) if r["memory"].get("ratio") is not None]
    if mem:
        ax.plot(*zip(*mem), "s--", label="peak RSS increase")
    ax.axhline(GOAL, color="red", lw=1, ls=":", label=f"goal {GOAL:.2f}x")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("capture(queries='last') / plain SDPA")
    ax.set_title(f"{MODEL}: last rows of all {rows[0]['values']['layers']} layers x {rows[0]['values']['heads']} heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(res: dict, path: Path, png: str) -> None:
    mc = res["machine"]
    la0, la1 = mc["loadavg_start"], res["loadavg_end"]
    L = ["# Growth: last-token rows of every layer and head vs a plain SDPA forward\n"]
    if res["small"]:
        L.append("**Small smoke run (`--small`): short contexts, few rounds, not for quoting.**\n")
    L.append(f"Command: `{res['command']}` (total {res['total_s']:.0f} s).  ")
    L.append(f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['mem_mib']:,} MiB RAM, Python {mc['python']}, torch "
             f"{mc['torch']}, transformers {mc['transformers']}, torch threads {mc['threads']}, no GPU.  ")
    L.append(f"Load average (1/5/15 min) at start {la0[0]:.1f}/{la0[1]:.1f}/{la0[2]:.1f}, at end "
             f"{la1[0]:.1f}/{la1[1]:.1f}/{la1[2]:.1f}.\n")
    L.append(f"![growth curve]({png})\n")
    L.append(f"| tokens | plain SDPA forward (median s) | time, capture / plain (goal <= {GOAL:.2f}x) | rounds | "
             "peak RSS increase MiB, plain / capture | peak memory, capture / plain | stored MiB | "
             "last rows vs eager (max abs diff) | row-sum error |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for t, r in res["lengths"].items():
        tm, mm, v = r["time"], r["memory"], r["values"]
        missing = "not measured" if not mm else "error (in the JSON)"
        peaks = (f"{mm['sdpa']['peak_increase_kb'] / 1024:,.0f} / {mm['last']['peak_increase_kb'] / 1024:,.0f}"
                 if mm.get("ratio") is not None else missing)
        mem_ratio = f"{mm['ratio']:.3f}x" if mm.get("ratio") is not None else missing
        L.append(f"| {t} | {tm['median_s']['sdpa']:.3f} | {tm['ratio']:.3f}x ({tm['min']:.2f}..{tm['max']:.2f}) | "
                 f"{len(tm['ratios'])} | {peaks} | {mem_ratio} | {v['stored_bytes'] / 2**20:.2f} | "
                 f"{v['last_vs_eager']:.1e} | {v['rowsum_err']:.1e} |")
    worst = max(r["time"]["ratio"] for r in res["lengths"].values())
    L.append("")
    L.append(f"Worst time ratio {worst:.3f}x: " + (f"within the {GOAL:.2f}x goal at every length measured."
                                                    if worst <= GOAL else f"over the {GOAL:.2f}x goal."))
    L.append("")
    L.append(HOW)
    path.write_text("\n".join(L) + "\n")


HOW = """\
## How measured

- Input: the Gettysburg Address (public domain) repeated and cut to exactly T tokens by SmolLM2's tokenizer
  (batch 1, attention mask all ones). SmolLM2-135M's `max_position_embeddings` is 8192, so 8192 is the longest
  context measured. Model float32 on CPU, SDPA backend, `torch.no_grad()`, torch threads fixed.
- Both configurations call the model with `logits_to_keep=1`. "capture" is the whole
  `with attnscope.capture(m, queries="last"): m(**x, logits_to_keep=1)` block: 30 layers x 9 heads, one [1, T] row
  each, recomputed from q and k in float32 (`core/probs.py`), plus the token maps of the T tokens.
- Time: one model object; every round runs both configurations once in a freshly shuffled order (fixed seed),
  after an untimed warm-up round; `gc.collect()` + `malloc_trim` before each call, outside the timed region. Ratio =
  median over rounds of (capture time / plain time of the same round), (min..max) over rounds; raw times in the JSON.
- Peak memory: each (length, configuration) runs in its own fresh `python bench/growth.py --mem T CONFIG`
  subprocess with `MALLOC_MMAP_THRESHOLD_=65536` (every tensor of 64 KiB or more is its own mmap, returned to the
  OS when freed, so RSS follows live tensors); it loads the model, runs the configuration once on 16 tokens
  (warm-up), trims, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs the measured call
  and reads VmHWM. "Peak RSS increase" = VmHWM - VmRSS before the call (activations, the returned logits, and for
  the capture its records and token maps).
- Values: the captured last rows of every layer are compared with the model's own eager attention for the last
  token: an SDPA prefill of the first T-1 tokens, then the last token as a decode step with the model switched to
  eager and `output_attentions=True`. The two runs compute the last token's hidden states with different kernels
  (SDPA over T tokens vs eager over one query), so the difference grows a little through the layers; it is float
  rounding, not a different row.
"""


# --- main ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="64 and 128 tokens, few rounds (CI smoke run)")
    ap.add_argument("--lengths", type=int, nargs="*", help="token counts to run (default: the mode's)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for growth[-small].md/.json/.png")
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--mem", nargs=2, metavar=("TOKENS", "CONFIG"))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.mem:
        return mem_child(int(args.mem[0]), args.mem[1], args.threads)

    import torch

    t_start = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    plan = SMALL if args.small else FULL
    if args.lengths:
        plan = {t: plan.get(t, (1, 3)) for t in args.lengths}
    res = {"command": "python bench/growth.py" + (" --small" if args.small else ""), "small": args.small,
           "model": MODEL, "goal": GOAL, "machine": machine(), "lengths": {}}
    m = load()
    for i, (tokens, (warm, rounds)) in enumerate(plan.items()):
        x = make_inputs(m, tokens)
        t0 = time.perf_counter()
        timing = time_length(m, x, warm, rounds, seed=i)
        values = check_values(m, x)
        res["lengths"][str(tokens)] = {"time": timing, "values": values, "loadavg": os.getloadavg(),
                                       "wall_s": time.perf_counter() - t0, "memory": {}}
        print(f"[{time.perf_counter() - t_start:6.0f}s] {tokens} tokens: time {timing['ratio']:.3f}x "
              f"({timing['min']:.2f}..{timing['max']:.2f}), plain {timing['median_s']['sdpa']:.2f} s, "
              f"last vs eager {values['last_vs_eager']:.1e}", flush=True)
    del m
    trim()
    if not args.skip_mem:
        for tokens in plan:
            mem = {c: run_mem(tokens, c, threads) for c in ("sdpa", "last")}
            if all("peak_increase_kb" in v for v in mem.values()):
                mem["ratio"] = mem["last"]["peak_increase_kb"] / mem["sdpa"]["peak_increase_kb"]
            res["lengths"][str(tokens)]["memory"] = mem
            print(f"[{time.perf_counter() - t_start:6.0f}s] {tokens} tokens: memory "
                  + (f"{mem['ratio']:.3f}x" if "ratio" in mem else json.dumps(mem)[:500]), flush=True)
    res["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start
    name = "growth-small" if args.small else "growth"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / f"{name}.png")
    write_report(res, args.out / f"{name}.md", f"{name}.png")
    print(f"wrote {args.out / name}.md, .json and .png in {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
