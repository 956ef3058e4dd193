#!/usr/bin/env python
"""Benchmark `attnscope.steer`: steered generation and token-pruned prefill, as ratios measured in one run.

    python bench/steer.py                 # full run, writes bench/results/steer.md and steer.json
    python bench/steer.py --quick         # a smoke run (fewer rounds and tokens; marked as quick)
    python bench/steer.py --threads 2     # torch threads (default 1: see the results file)

1. Generation on SmolLM2-135M: 1,024 context tokens + 64 new tokens (greedy, KV cache), unsteered SDPA vs
   PAI / VAR / head scaling through attnscope (SDPA kept; explicit rows only where an edit needs them) vs the same
   edits done the anchors' way (the model switched to eager attention and its `eager_attention_forward` patched to
   edit the full attention weights, which is how the reference implementations of these papers work).
2. Prefill on a LLaVA-shaped model: LlavaForConditionalGeneration with SmolLM2-135M's real weights as the language
   model and a small random CLIP tower at 336 px / patch 14, so each image gives 576 image tokens; FastV (K=2) keeping
   50% and 25% of them vs no pruning, beside the theoretical FLOPs ratio of the language model.

Every ratio is the median over rounds of (config time / mean of the baseline runs just before and after it);
configurations run in a freshly shuffled order each round, after a warm-up round."""
from __future__ import annotations

import argparse
import importlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/anchors.py, also when this file is loaded by path
RESULTS = HERE / "results"
VAR_STEP = "VAR, heads per step"  # VAR(heads_at="step"): the image-centric heads tested again at every decode step
RHO = 0.1  # VAR's head threshold here: the span is 100 of 1,024 plain-text tokens, so rho=0.5 would leave VAR idle
SENTENCE = ("The dominant sequence transduction models are based on complex recurrent or convolutional neural "
            "networks that include an encoder and a decoder. ")


def machine(threads: int) -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads, "loadavg_start": os.getloadavg()}


def context(m, n: int) -> dict:
    reps = 1
    while True:
        x = m.encode(SENTENCE * reps)
        if x["input_ids"].shape[1] >= n:
            return {k: v[:, :n].contiguous() for k, v in x.items()}
        reps *= 2


# --- the anchors' way: eager attention with a patched eager_attention_forward --------------------------------
def anchors(hf, edit: str, layers: set[int], span: list[int], alpha: float = 0.5, p: float = 0.6, rho: float = 0.5,
            sinks: list[int] | None = None, scales: dict | None = None, heads_at: str = "prefill"):
    """PAI, VAR or head scaling on full eager attention weights, as the papers' reference code does it
    (`anchors.eager_anchor`). VAR's image-centric heads: tested on the prefill's last row and reused at every decode
    step (`heads_at="prefill"`, attnscope's default), or tested again on every step's row ("step")."""
    import torch

    from anchors import eager_anchor, var_last_row

    span_t = torch.tensor(span)
    sink_t = torch.tensor(sinks or [0])
    chosen = {}  # layer -> [B, H, 1] heads chosen at prefill

    def pai(module, w):
        a = w[:, :, -1:, span_t]
        w[:, :, -1:, span_t] = a + alpha * a.abs()
        return w

    def var(module, probs):
        reuse = heads_at == "prefill" and probs.shape[2] == 1  # a decode step: the heads chosen at prefill
        probs, test = var_last_row(probs, sink_t, span_t, p, rho, chosen[module.layer_idx] if reuse else None)
        if heads_at == "prefill" and probs.shape[2] > 1:
            chosen[module.layer_idx] = test
        return probs

    def heads(module, out):
        s = torch.ones(out.shape[1])
        for h, f in scales.get(module.layer_idx, {}).items():
            s[h] = f
        return out * s[None, :, None, None]

    return eager_anchor(hf, layers, scores=pai if edit == "pai" else None, probs=var if edit == "var" else None,
                        heads=heads if edit == "heads" else None)


# --- 1. generation -------------------------------------------------------------------------------------------
def generation(m, n_ctx: int, new: int, warm: int, rounds: int, only: list[str] | None = None) -> dict:
    import torch

    st = importlib.import_module("attnscope.steer")  # the package (attnscope.steer is also the context manager)

    x = context(m, n_ctx)
    span = list(range(100, 200))
    n = m.streams["text"]
    pai_layers = set(range(2, n))
    head_scales = {(layer, h): 1.5 for layer in range(0, n, 3) for h in (0, 4)}
    by_layer: dict[int, dict[int, float]] = {}
    for (layer, h), f in head_scales.items():
        by_layer.setdefault(layer, {})[h] = f
    with torch.no_grad(), st.steer(m, st.VAR(keys=span)) as session:  # the sinks VAR finds, handed to the anchor
        m.hf(**x)
    sinks = sorted(set(session.state.sink[("text", n - 1)][0].nonzero()[:, 0].tolist()))
    methods = {"PAI": [st.PAI(alpha=0.5, keys=span)], "VAR": [st.VAR(keys=span, rho=RHO)],
               VAR_STEP: [st.VAR(keys=span, rho=RHO, heads_at="step")], "head scaling": [st.HeadScale(head_scales)]}
    anchor_kw = {"PAI": dict(edit="pai", layers=pai_layers, span=span, alpha=0.5),
                 "VAR": dict(edit="var", layers=pai_layers, span=span, sinks=sinks, rho=RHO),
                 VAR_STEP: dict(edit="var", layers=pai_layers, span=span, sinks=sinks, rho=RHO, heads_at="step"),
                 "head scaling": dict(edit="heads", layers=set(by_layer), span=span, scales=by_layer)}
    if only:
        methods = {k: v for k, v in methods.items() if k in only}
    cfgs = {"sdpa": ("plain", None)}
    for name in methods:
        cfgs[f"{name} (attnscope)"] = ("steer", name)
        cfgs[f"{name} (anchors: eager + patched)"] = ("anchor", name)

    def run(cfg):
        kind, name = cfg
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
        if kind == "plain":
            return m.generate(**x, **kw)
        if kind == "steer":
            with st.steer(m, *methods[name]):
                return m.generate(**x, **kw)
        with anchors(m.hf, **anchor_kw[name]):
            return m.generate(**x, **kw)

    # same edit, same numbers: first-step logits and tokens of attnscope vs the anchors
    checks = {}
    with torch.no_grad():
        outs = {c: run(cfgs[c]) for c in cfgs}
    for name in methods:
        a, b = outs[f"{name} (attnscope)"], outs[f"{name} (anchors: eager + patched)"]
        checks[name] = {"first_step_logits_max_abs_diff": float((a.logits[0] - b.logits[0]).abs().max()),
                        "all_steps_logits_max_abs_diff": max(float((u - v).abs().max()) for u, v in zip(a.logits, b.logits)),
                        "same_tokens": int((a.sequences == b.sequences).float().mean() * 100),
                        "changed_vs_unsteered": float((a.logits[0] - outs["sdpa"].logits[0]).abs().max())}
    del outs
    timing = time_rounds(cfgs, run, warm, rounds)
    return {"context": n_ctx, "new_tokens": new, "span": [span[0], span[-1]], "sinks": sinks, **timing,
            "checks": checks, "head_scales": len(head_scales)}


def time_rounds(cfgs: dict, run, warm: int, rounds: int, seed: int = 0, base: str | None = None) -> dict:
    """Per round: the baseline, then each other configuration (shuffled) followed by the baseline again, so each
    configuration's time is compared with the mean of the two baseline runs around it (the load of the shared
    machine drifts over minutes; adjacent runs see nearly the same load). Returns times and per-round ratios."""
    import torch

    base = base or next(iter(cfgs))
    others = [n for n in cfgs if n != base]
    times = {n: [] for n in cfgs}
    ratios = {n: [] for n in others}
    rng = random.Random(seed)

    def timed(name):
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run(cfgs[name])
        dt = time.perf_counter() - t0
        del out
        return dt

    for r in range(warm + rounds):
        order = others[:]
        rng.shuffle(order)
        before = timed(base)
        for name in order:
            t = timed(name)
            after = timed(base)
            if r >= warm:
                times[name].append(t)
                times[base].append(after)
                ratios[name].append(t / ((before + after) / 2))
            before = after
        if r >= warm:
            print(f"  round {r + 1 - warm}/{rounds}: " + ", ".join(f"{n} {ratios[n][-1]:.3f}x" for n in order), flush=True)
    return {"times": times, "ratios": ratios, "base": base}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- 2. prefill with pruning ----------------------------------------------------------------------------------
def llava_smollm2(m):
    """LlavaForConditionalGeneration: a random 2-layer CLIP tower (336 px, patch 14: 576 patches) + SmolLM2-135M."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    import attnscope

    text = m.hf.config
    image_token = text.vocab_size - 1
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text.to_dict(), image_token_index=image_token,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    state = m.hf.state_dict()
    lm = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = hf.model.language_model.load_state_dict(lm, strict=True), None
    hf.lm_head.weight.data.copy_(state["lm_head.weight"])
    wrapped = attnscope.wrap(hf, tokenizer=m.tokenizer)
    return wrapped, image_token, (missing, unexpected)


def flops(n_tokens: list[int], d: int, kv: int, m: int) -> float:
    """Language-model FLOPs of one prefill, layer by layer: q/k/v/o projections, dense QK^T and PV (n x n), and the
    gated MLP; embeddings, the tower and the last-position LM head are the same in every config and left out."""
    return sum(2 * n * (2 * d * d + 2 * d * kv) + 4 * n * n * d + 6 * n * d * m for n in n_tokens)


def prefill(m, warm: int, rounds: int, quick: bool) -> dict:
    import torch

    st = importlib.import_module("attnscope.steer")  # the package (attnscope.steer is also the context manager)
    from attnscope.core import seam

    vlm, image_token, _ = llava_smollm2(m)
    tok = m.tokenizer
    before = tok("USER: ", add_special_tokens=False)["input_ids"]
    after = tok("\nDescribe the picture in detail, naming every object you can see and where it is. ASSISTANT:",
                add_special_tokens=False)["input_ids"]
    ids = torch.tensor([before + [image_token] * 576 + after])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336)}
    n = ids.shape[1]
    cfgs = {"no pruning": None, "FastV K=2 keep 50%": st.FastV(k=2, keep=0.5), "FastV K=2 keep 25%": st.FastV(k=2, keep=0.25)}

    def run(cfg):
        if cfg is None:
            return vlm.hf(**x, use_cache=True, logits_to_keep=1)
        with st.steer(vlm, cfg):
            return vlm.hf(**x, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        base = run(None)
        checks = {}
        for name, cfg in cfgs.items():
            if cfg is None:
                continue
            out = run(cfg)
            lens = [layer.keys.shape[-2] for layer in seam.output_cache(out).layers]
            checks[name] = {"cache_len_layer0_1": lens[:2], "cache_len_layer2_plus": sorted(set(lens[2:])),
                            "last_logits_max_abs_diff_vs_unpruned": float((out.logits - base.logits).abs().max()),
                            "same_next_token": bool(out.logits[0, -1].argmax() == base.logits[0, -1].argmax())}
    timing = time_rounds(cfgs, run, warm, rounds)
    c = m.hf.config
    kv = c.num_key_value_heads * c.head_dim
    L = c.num_hidden_layers
    full = flops([n] * L, c.hidden_size, kv, c.intermediate_size)
    theory = {}
    for name, cfg in cfgs.items():
        if cfg is None:
            continue
        kept = n - 576 + round(576 * cfg.keep)
        theory[name] = full / flops([n] * cfg.k + [kept] * (L - cfg.k), c.hidden_size, kv, c.intermediate_size)
    return {"tokens": n, "image_tokens": 576, **timing, "checks": checks, "flops_ratio": theory}


# --- report ------------------------------------------------------------------------------------------------------
def report(res: dict) -> str:
    g, p = res["generation"], res.get("prefill")
    mach = res["machine"]
    L = ["# attnscope.steer benchmark", ""]
    if res["quick"]:
        L.append("**Quick smoke run (`--quick`): few rounds and tokens, not for quoting.**\n")
    L += [f"Command: `{res['command']}` (total {res['seconds']:.0f} s).  ",
          f"Machine: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, torch {mach['torch']}, "
          f"transformers {mach['transformers']}, torch threads {mach['threads']}, no GPU.  ",
          f"Load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in mach['loadavg_start'])}, at end "
          f"{'/'.join(f'{v:.1f}' for v in res['loadavg_end'])}: other jobs shared the 2 cores, which widens the "
          "spread (min..max over rounds) more than the paired medians.", ""]
    base = statistics.median(g["times"]["sdpa"])  # baseline runs around the steered ones
    L += [f"## 1. Steered generation: SmolLM2-135M, {g['context']} context tokens + {g['new_tokens']} new tokens "
          "(greedy, KV cache)", "",
          f"Unsteered SDPA generation: median {base:.2f} s. The edits target the context span of positions "
          f"{g['span'][0]}..{g['span'][1]}; PAI alpha=0.5 and VAR (p=0.6, rho={RHO}: with rho=0.5 no head of this plain "
          f"text puts half its attention on the span, so VAR would compute everything and change nothing) on layers "
          f"2..29, the generating row; head scaling x1.5 on {g['head_scales']} heads (heads 0 and 4 of every third layer). "
          "VAR chooses its image-centric heads once per sequence, from the prefill's last row, and reuses them at every "
          "decode step (`heads_at=\"prefill\"`, the default; decode steps then need explicit rows only in those heads); "
          f"\"{VAR_STEP}\" tests every step's row again (`heads_at=\"step\"`, explicit rows in every head of every "
          "edited layer at every step). Each is compared with an anchor that follows the same rule.", "",
          "| edit | attnscope vs unsteered SDPA (goal <= 1.10x) | anchors' way (eager + patched) vs unsteered SDPA | "
          "anchors' way vs attnscope | first-step logits, attnscope vs anchors (max abs diff) | all steps' logits, attnscope "
          "vs anchors | tokens equal |",
          "|---|---|---|---|---|---|---|"]
    for name in [n for n in ("PAI", "VAR", VAR_STEP, "head scaling") if n in g["checks"]]:
        ours, theirs = g["ratios"][f"{name} (attnscope)"], g["ratios"][f"{name} (anchors: eager + patched)"]
        a, b = summary(ours), summary(theirs)
        c = summary([t / o for t, o in zip(theirs, ours)])
        chk = g["checks"][name]
        L.append(f"| {name} | {a['median']:.3f}x ({a['min']:.2f}..{a['max']:.2f}) | {b['median']:.3f}x "
                 f"({b['min']:.2f}..{b['max']:.2f}) | {c['median']:.2f}x | {chk['first_step_logits_max_abs_diff']:.1e} "
                 f"(the edit itself moves them by {chk['changed_vs_unsteered']:.2f}) | "
                 f"{chk.get('all_steps_logits_max_abs_diff', float('nan')):.1e} | {chk['same_tokens']}% |")
    L += ["", f"VAR's sinks (massive activations, found by attnscope, handed to the anchor): positions {g['sinks']}.", ""]
    if p is None:
        L += ["Only VAR's rows were run (`--only var`): the other edits and the prefill with FastV pruning are in "
              "steer.md.", "", "## How measured", ""]
        return "\n".join(L + how(mach))
    pb = statistics.median(p["times"]["no pruning"])
    L += [f"## 2. Prefill with FastV pruning: LLaVA-shaped SmolLM2 ({p['tokens']} tokens, {p['image_tokens']} image "
          "tokens)", "",
          "LlavaForConditionalGeneration built from a config: SmolLM2-135M's real weights as the language model, a "
          "random 2-layer CLIP tower (hidden 64, 336 px, patch 14: 576 patches) and a random projector; one random "
          "image. The tower and projector cost the same in every config. A prefill is one forward with "
          f"`use_cache=True, logits_to_keep=1`. Unpruned median {pb:.2f} s.", "",
          "| config | prefill speed-up vs no pruning (goal >= 1.3x at 50%) | theoretical LM FLOPs ratio | cache length "
          "layers 0-1 / 2-29 | next-token logits vs unpruned (max abs diff) | same next token |", "|---|---|---|---|---|---|"]
    for name in ("FastV K=2 keep 50%", "FastV K=2 keep 25%"):
        r = summary([1 / v for v in p["ratios"][name]])
        chk = p["checks"][name]
        L.append(f"| {name} | {r['median']:.2f}x ({r['min']:.2f}..{r['max']:.2f}) | {p['flops_ratio'][name]:.2f}x | "
                 f"{chk['cache_len_layer0_1'][0]} / {chk['cache_len_layer2_plus'][0]} | "
                 f"{chk['last_logits_max_abs_diff_vs_unpruned']:.2f} | {chk['same_next_token']} |")
    L += ["", "Speed-up = median over rounds of (unpruned time / pruned time), the unpruned time being the mean of the "
          "unpruned runs just before and just after. FLOPs count dense "
          "n x n attention scores (causal kernels skip about half, which makes the measured ratio a little lower "
          "than the count when attention is a large share).", "",
          "## How measured", ""] + how(mach)
    return "\n".join(L)


def how(mach: dict) -> list[str]:
    return [
        "- Each round runs the baseline, then every other configuration in a freshly shuffled order, each followed by "
        "the baseline again; a configuration's ratio is its time over the mean of the two baseline runs around it "
        "(the load on the shared cores drifts over minutes, adjacent runs see nearly the same load); median over "
        "rounds, after a warm-up round; `gc.collect()` before each call, outside the timed region. Generation calls are whole "
        "`with steer(...): model.generate(...)` blocks (enter, generate, exit); anchors' calls include switching "
        "the model to eager and back. Raw times per round are in the JSON beside this file.",
        "- The anchors' way: `set_attn_implementation('eager')` and `modeling_llama.eager_attention_forward` "
        "replaced by a function that computes the full attention weights of the edited layers and edits them "
        "(PAI: a + alpha|a| on the span in the last row before the mask; VAR: the last row's sink mass moved to the "
        "span in heads whose span share of non-sink attention is >= rho, tested on the prefill's last row and reused "
        "at decode steps, or tested at every step for the per-step form; heads: the head outputs scaled before "
        "o_proj). Same edit, so the first-step logits agree to float precision and the tokens match (table).",
        f"- torch threads fixed to {mach['threads']}: with other jobs on the two cores, two OpenMP threads that "
        "spin-wait for each other made every forward several times slower and far noisier than one thread.", ""
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["var"], help="only VAR's two forms (no prefill part): writes steer-var.md/.json")
    args = ap.parse_args()
    import torch

    import attnscope

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    m = attnscope.load("smollm2-135m")
    res = {"command": "python bench/steer.py" + (" --quick" if args.quick else "")
           + (f" --threads {args.threads}" if args.threads != 1 else "") + (f" --only {args.only}" if args.only else ""),
           "quick": args.quick,
           "machine": machine(args.threads)}
    print("generation", flush=True)
    n_ctx, new, warm, rounds = (256, 8, 1, 2) if args.quick else (1024, 64, 1, 4)
    res["generation"] = generation(m, n_ctx, new, warm, rounds, only=["VAR", VAR_STEP] if args.only else None)
    if not args.only:
        print("prefill", flush=True)
        res["prefill"] = prefill(m, 1, 3 if args.quick else 8, args.quick)
    res["loadavg_end"] = os.getloadavg()
    res["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    suffix = ("-var" if args.only else "") + ("-quick" if args.quick else "")
    (RESULTS / f"steer{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"steer{suffix}.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
