#!/usr/bin/env python
"""GPU benchmarks on a LLaVA-1.5-7B-shaped model with random weights in bfloat16 (its weights cannot reach the
machines this project runs on; random weights give the same shapes, so the same kernels and the same costs).

    python bench/gpu.py --run DIR      # on a CUDA machine: growth, FastV prefill and split checks -> DIR/gpu.json
    python bench/gpu.py --report FILE  # bench/results/gpu.md and gpu.png from a gpu.json
    python bench/gpu.py --small        # the same code on the CPU with tiny dimensions (CI smoke run; no report)

Model: `LlavaForConditionalGeneration` with LLaVA-1.5-7B's shapes: a CLIP ViT-L/14 tower at 336 px (24 layers,
width 1024, 576 patches, feature layer -2), a 2-layer GELU projector, and a Llama-2-7B language model (32 layers,
32 heads of 128, MLP 11008, vocabulary 32064), SDPA attention, built directly on the GPU in bfloat16.

1. Growth: the last-token rows of every language layer and head (`capture(m, queries="last")`) against the plain
   SDPA prefill (`logits_to_keep=1`) at 256 (text only), 1k, 4k and 8k tokens (one 336 px image, 576 image
   tokens, then text). Time: CUDA-synchronised wall clock, both configurations in a shuffled order each round,
   ratio = median over rounds of capture/plain. Memory: `torch.cuda.max_memory_allocated` above the weights, for
   each configuration. Values: the captured rows against the model's own eager row for the last token (a decode
   step after an SDPA prefill of the first T-1 tokens, `output_attentions=True`).
2. FastV prefill speed-up: one image and a 40-token prompt (617 tokens); the prefill (`use_cache=True`,
   `logits_to_keep=1`) with no pruning against `steer(m, FastV(k=2, keep=0.5))` and keep 0.25, at batch 1 and 8.
   The tower and projector cost the same in every configuration. The theoretical language-model FLOPs ratio is
   given beside the measured one.
   The same check is repeated in float32 with TF32 off at 1k tokens (bfloat16 rounding alone hides errors).
   Host costs: the weights fingerprint of the 7B model (read at the end of every capture block) timed alone, and
   bench/host.py (the same structure at tiny widths, host-bound) on this machine's CPU: what the growth ratios at short
   contexts are made of.
3. Split model: the same architecture cut to 8 language layers and 4 tower layers, in float32 (TF32 off), placed
   over the GPU, the CPU and disk with an explicit device map, against the unsplit model on the GPU: captured
   attention of both streams, FastV's kept positions and logits, a VCD generation, and `explain`. GPU and CPU
   kernels differ, so the largest difference is reported, not bit equality (the CPU-only tests are bit-equal)."""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GROWTH_GOAL, FASTV_GOAL = 1.10, 1.6
IMAGE_TOKEN, VOCAB, PATCHES = 32000, 32064, 576
FULL = {"lengths": {256: (2, 10), 1024: (2, 10), 4096: (2, 6), 8192: (1, 4)}, "fastv_rounds": (3, 15), "batches": [1, 8]}
SMALL = {"lengths": {48: (1, 2), 80: (1, 2)}, "fastv_rounds": (1, 2), "batches": [1, 2]}


def configs(small: bool, text_layers: int | None = None, vision_layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if small:  # the same structure, tiny: a 4x4 patch grid, 4 language layers
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=56, patch_size=14, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=16384)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=VOCAB, max_position_embeddings=16384, rms_norm_eps=1e-5)
    if text_layers:
        text.num_hidden_layers = text_layers
    if vision_layers:
        vision.num_hidden_layers = vision_layers
    cfg = LlavaConfig(vision_config=vision, text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def build(cfg, device: str, dtype, seed: int = 0):
    import torch
    from transformers import LlavaForConditionalGeneration

    import attnscope

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return attnscope.wrap(hf)


def patches(cfg) -> int:
    v = cfg.vision_config
    return (v.image_size // v.patch_size) ** 2


def inputs(cfg, tokens: int, device: str, dtype, batch: int = 1, image: bool = True, seed: int = 0) -> dict:
    """`tokens` ids: 5 text ids, then the image's tokens (when `image`), then text ids; random ids avoid the image id."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, IMAGE_TOKEN, (batch, tokens), generator=g)
    x = {}
    if image:
        n = patches(cfg)
        assert tokens > n + 6, f"{tokens} tokens cannot hold an image of {n} tokens"
        ids[:, 5:5 + n] = IMAGE_TOKEN
        size = cfg.vision_config.image_size
        x["pixel_values"] = torch.randn(batch, 3, size, size, generator=g).to(device, dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)} | x


def timed(fn, device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del out
    return dt


def rounds(fns: dict, warm: int, n: int, device: str, seed: int = 0) -> dict:
    """Each round runs every configuration once in a shuffled order; ratios are against the first configuration."""
    rng, times = random.Random(seed), {k: [] for k in fns}
    for r in range(warm + n):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            dt = timed(fns[name], device)
            if r >= warm:
                times[name].append(dt)
    base = next(iter(fns))
    out = {"median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times}
    for k in list(fns)[1:]:
        ratio = [a / b for a, b in zip(times[k], times[base])]
        out[k] = {"ratio": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}
    return out


def peak(fn, device: str) -> int | None:
    """Bytes allocated above those held before the call, at the call's peak (CUDA only)."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - before
    del out
    return used


# --- 1. growth ------------------------------------------------------------------------------------------------
def growth(m, cfg, plan: dict, device: str, dtype) -> dict:
    import torch

    import attnscope

    res = {}
    for tokens, (warm, n) in plan["lengths"].items():
        x = inputs(cfg, tokens, device, dtype, image=tokens > patches(cfg) + 6)

        def plain():
            return m.hf(**x, logits_to_keep=1)

        def last():
            with attnscope.capture(m, queries="last") as trace:
                m.hf(**x, logits_to_keep=1)
            return trace

        with torch.no_grad():
            t = rounds({"plain": plain, "last": last}, warm, n, device, seed=tokens)
            mem = {"plain": peak(plain, device), "last": peak(last, device)}
            values = last_row_check(m, x, last())
        res[tokens] = {"image_tokens": patches(cfg) if "pixel_values" in x else 0, "time": t["last"],
                       "median_s": t["median_s"], "times_s": t["times_s"], "peak_bytes": mem,
                       "peak_ratio": mem["last"] / mem["plain"] if mem["plain"] else None, "values": values}
        print(f"growth {tokens}: {t['last']['ratio']:.3f}x time, peak {mem}, values {values}", flush=True)
    return res


def last_row_check(m, x: dict, trace) -> dict:
    """Captured last rows against eager's own row for the last token, and the row sums."""
    from attnscope.core import seam

    hf = m.hf
    ids, mask = x["input_ids"], x["attention_mask"]
    rest = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
    pre = hf(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1, **rest)
    hf.set_attn_implementation("eager")
    try:
        step = hf(**seam.cache_inputs(hf, seam.output_cache(pre), input_ids=ids[:, -1:], attention_mask=mask,
                                      output_attentions=True, logits_to_keep=1))
    finally:
        hf.set_attn_implementation("sdpa")
    stream = "language"
    diff = rowsum = 0.0
    for layer, ref in enumerate(step.attentions):
        got = trace.attention(stream, layer).float().to(ref.device)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        diff = max(diff, float((got - ref.float()).abs().max()))
        rowsum = max(rowsum, float((got.sum(-1) - 1).abs().max()))
    return {"last_vs_eager_max_abs": diff, "rowsum_err": rowsum, "layers": len(step.attentions),
            "heads": int(step.attentions[0].shape[1]), "dtype": str(trace.attention(stream, 0).dtype)}


def exact_check(cfg, plan: dict, device: str) -> dict:
    """The same last-row check on the same shapes in float32 with TF32 off, where the two kernels should agree to
    float32 rounding: bfloat16 rounding alone cannot tell a wrong row from a right one."""
    import torch

    import attnscope

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = build(cfg, device, torch.float32)
    tokens = sorted(plan["lengths"])[1]
    x = inputs(cfg, tokens, device, torch.float32)
    with torch.no_grad():
        with attnscope.capture(m, queries="last") as trace:
            m.hf(**x, logits_to_keep=1)
        out = {"tokens": tokens} | last_row_check(m, x, trace)
    print(f"exact (float32) {tokens}: {out}", flush=True)
    return out


def host_costs(m, small: bool, device: str) -> dict:
    """What capture costs the host here, to read the growth ratios by: the weights fingerprint of this model with its
    weights unchanged (read at the end of every capture block, synchronised), and bench/host.py on this machine's
    CPU (the host work per attention call, at tiny widths)."""
    import host

    def fingerprint():
        m.fingerprint
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    fingerprint()
    times = [timed(fingerprint, device) for _ in range(5)]
    out = {"fingerprint_s": statistics.median(times), "tensors": len(m.hf.state_dict()),
           "host_bench": host.run(small, 2 if small else 9)}
    print(f"host: fingerprint {out['fingerprint_s'] * 1e3:.2f} ms; host.py ratios "
          f"{ {k: round(v['ratio'], 3) for k, v in out['host_bench']['ratios'].items()} }", flush=True)
    return out


# --- 2. FastV prefill -----------------------------------------------------------------------------------------
def lm_flops(ns: list[int], t) -> float:
    """Language-model FLOPs of one prefill (projections, dense QK^T and PV, gated MLP), per layer."""
    d, kv, mlp = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads), t.intermediate_size
    return sum(2 * n * (2 * d * d + 2 * d * kv) + 4 * n * n * d + 6 * n * d * mlp for n in ns)


def fastv(m, cfg, plan: dict, device: str, dtype) -> dict:
    import torch

    from attnscope.core import seam
    from attnscope.steer import FastV, steer

    n_img = patches(cfg)
    keeps = {"FastV K=2 keep 50%": 0.5, "FastV K=2 keep 25%": 0.25}
    res = {}
    for batch in plan["batches"]:
        x = inputs(cfg, n_img + 41, device, dtype, batch=batch)

        def run(keep=None):
            if keep is None:
                return m.hf(**x, use_cache=True, logits_to_keep=1)
            with steer(m, FastV(k=2, keep=keep)):
                return m.hf(**x, use_cache=True, logits_to_keep=1)

        fns = {"no pruning": run} | {name: (lambda k=k: run(k)) for name, k in keeps.items()}
        with torch.no_grad():
            base = run()
            checks = {}
            for name, k in keeps.items():
                out = run(k)
                lens = [layer.keys.shape[-2] for layer in seam.output_cache(out).layers]
                checks[name] = {"cache_len_layers_0_1": lens[:2], "cache_len_layers_2_on": sorted(set(lens[2:])),
                                "expected_2_on": x["input_ids"].shape[1] - n_img + round(n_img * k),
                                "same_next_token": bool((out.logits[:, -1].argmax(-1) == base.logits[:, -1].argmax(-1)).all())}
            warm, n = plan["fastv_rounds"]
            t = rounds(fns, warm, n, device, seed=batch)
            mem = {name: peak(fn, device) for name, fn in fns.items()}
        L, tokens = cfg.text_config.num_hidden_layers, x["input_ids"].shape[1]
        speed = {name: {"speedup": 1 / t[name]["ratio"], "min": 1 / t[name]["max"], "max": 1 / t[name]["min"],
                        "flops_ratio": lm_flops([tokens] * L, cfg.text_config)
                        / lm_flops([tokens] * 2 + [checks[name]["expected_2_on"]] * (L - 2), cfg.text_config)}
                 for name in keeps}
        res[batch] = {"tokens": tokens, "image_tokens": n_img, "speed": speed, "median_s": t["median_s"],
                      "times_s": t["times_s"], "peak_bytes": mem, "checks": checks}
        print(f"fastv batch {batch}: " + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in speed.items()), flush=True)
    return res


# --- 3. split model -------------------------------------------------------------------------------------------
def split_map(cfg, main: str) -> dict:
    """Tower, projector and the first half of the language layers on `main`; then the CPU and disk alternately."""
    lm, n, tower = "model.language_model", cfg.text_config.num_hidden_layers, "model.vision_tower"
    out = {f"{tower}.embeddings": main, f"{tower}.pre_layrnorm": main,
           f"{tower}.post_layernorm": "cpu", "model.multi_modal_projector": "disk",
           f"{lm}.embed_tokens": main, f"{lm}.rotary_emb": main, f"{lm}.norm": "cpu", "lm_head": main}
    for i in range(cfg.vision_config.num_hidden_layers):
        out[f"{tower}.encoder.layers.{i}"] = main if i % 2 == 0 else ("disk" if i == 1 else "cpu")
    for i in range(n):
        out[f"{lm}.layers.{i}"] = main if i < n // 2 else ("disk" if i % 2 else "cpu")
    return out


def split_check(small: bool, device: str) -> dict:
    import torch

    import attnscope
    from attnscope.models import placement
    from attnscope.steer import VCD, FastV, steer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = configs(small, text_layers=4 if small else 8, vision_layers=3 if small else 4)
    plain = build(cfg, device, torch.float32, seed=1)
    moved = build(cfg, "cpu", torch.float32, seed=1)
    moved.hf.load_state_dict(plain.hf.state_dict())
    folder = tempfile.mkdtemp(prefix="attnscope-offload-")
    placement.split(moved, device_map=split_map(cfg, device), offload_folder=folder)
    devices = sorted({str(d) for d in moved.hf.hf_device_map.values()})
    x = inputs(cfg, patches(cfg) + 30, device, torch.float32)
    res = {"devices": devices}

    def diff(a, b) -> float:
        return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())

    with torch.no_grad():
        traces = []
        for model in (plain, moved):
            with attnscope.capture(model, streams=["vision", "language"]) as trace:
                model(**x)
            traces.append(trace)
        res["capture_max_abs"] = max(diff(traces[0].attention(s, i), traces[1].attention(s, i))
                                     for s in ("vision", "language") for i in traces[0].layers(s))
        res["capture_roles_equal"] = all(traces[0].tokens(s).roles == traces[1].tokens(s).roles
                                         for s in ("vision", "language"))
        outs, kept = [], []
        for model in (plain, moved):
            with steer(model, FastV(k=2, keep=0.5)) as session:
                outs.append(model(**x, use_cache=True).logits)
            kept.append({k: v.tolist() for k, v in session.state.kept.items()})
        res["fastv_kept_equal"], res["fastv_logits_max_abs"] = kept[0] == kept[1], diff(outs[0], outs[1])
        gens = []
        for model in (plain, moved):
            with steer(model, VCD()):
                gens.append(model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                                           return_dict_in_generate=True))
        res["vcd_tokens_equal"] = torch.equal(gens[0].sequences.cpu(), gens[1].sequences.cpu())
        res["vcd_logits_max_abs"] = max(diff(a, b) for a, b in zip(gens[0].logits, gens[1].logits))
    a, b = (attnscope.explain(model, x) for model in (plain, moved))
    res["explain_scores_max_abs"] = diff(a.scores, b.scores)
    res["explain_scores_max"] = float(a.scores.abs().max())
    print(f"split: {res}", flush=True)
    return res


# --- run / report -----------------------------------------------------------------------------------------------
def run(out_dir: Path | None, small: bool) -> dict:
    import torch

    import attnscope

    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    plan = SMALL if small else FULL
    res = {"machine": machine_info(device), "attnscope": attnscope.__version__, "small": small}
    cfg = configs(small)
    t0 = time.perf_counter()
    m = build(cfg, device, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in m.hf.parameters())
    parts = {"growth": lambda: growth(m, cfg, plan, device, dtype), "fastv": lambda: fastv(m, cfg, plan, device, dtype),
             "host": lambda: host_costs(m, small, device), "exact": lambda: exact_check(cfg, plan, device),
             "split": lambda: split_check(small, device)}
    for part, fn in parts.items():
        if part == "exact":
            del m
            if device == "cuda":
                torch.cuda.empty_cache()
        t0 = time.perf_counter()
        try:
            res[part] = fn()
        except Exception:  # a device run is costly: keep the other parts, and say what failed
            if small:
                raise
            res[f"{part}_error"] = traceback.format_exc()
            print(res[f"{part}_error"], flush=True)
        res[f"{part}_s"] = time.perf_counter() - t0
        save(res, out_dir)
    return res


def save(res: dict, out_dir: Path | None) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu.json").write_text(json.dumps(res, indent=1, default=str))


def machine_info(device: str) -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return info


def report(res: dict, md: Path) -> None:
    mc, g, f, s = res["machine"], res["growth"], res["fastv"], res.get("split")
    gib = 2 ** 30
    L = [f"# GPU: LLaVA-1.5-7B-shaped model, random weights in bfloat16 ({mc.get('gpu', 'CPU')})", "",
         "Produced by `python bench/gpu.py --run DIR` on the GPU machine, then `python bench/gpu.py --report "
         "DIR/gpu.json`; raw numbers in `gpu.json` (its `summary` and `notes` are written there by hand after the run). "
         "The model's shapes are LLaVA-1.5-7B's (CLIP ViT-L/14-336 tower, "
         f"Llama-2-7B language model, {res['params'] / 1e9:.2f} B parameters) with random weights: the weights cannot "
         "reach this project's machines, and the shapes alone set the kernels and their cost. "
         f"torch {mc['torch']}, CUDA {mc.get('cuda')}, transformers {mc['transformers']}.", "",
         *res.get("summary", []),
         f"## 1. Growth: last-token rows of all 32 layers x 32 heads vs a plain SDPA prefill (goal <= {GROWTH_GOAL:.2f}x)",
         "", "| tokens | image tokens | plain prefill | time vs plain (median, min..max of rounds) | peak above weights: "
         "plain / capture | last rows vs eager (max abs) | row-sum error |", "|---|---|---|---|---|---|---|"]
    for t, r in g.items():
        pb = r["peak_bytes"]
        L.append(f"| {t} | {r['image_tokens']} | {r['median_s']['plain'] * 1e3:.1f} ms | **{r['time']['ratio']:.3f}x** "
                 f"({r['time']['min']:.3f}..{r['time']['max']:.3f}, {len(r['times_s']['plain'])} rounds) | "
                 f"{pb['plain'] / gib:.2f} / {pb['last'] / gib:.2f} GiB ({r['peak_ratio']:.3f}x) | "
                 f"{r['values']['last_vs_eager_max_abs']:.1e} | {r['values']['rowsum_err']:.1e} |")
    if res.get("exact"):
        e = res["exact"]
        L += ["", f"**Float32 check** (the same shapes in float32, TF32 off, {e['tokens']} tokens): the captured last rows "
              f"of all {e['layers']} layers equal eager's to {e['last_vs_eager_max_abs']:.1e} (row sums to "
              f"{e['rowsum_err']:.1e})."]
    if res.get("host"):
        h, hb = res["host"], res["host"]["host_bench"]
        L += ["", f"**Host costs on this machine**: the weights fingerprint ({h['tensors']} tensors, weights unchanged), "
              f"read at the end of every capture block, takes {h['fingerprint_s'] * 1e3:.2f} ms; `bench/host.py` on its "
              "CPU (the same structure at tiny widths, host-bound): " + "; ".join(
                  f"{k} {v['ratio']:.3f}x" for k, v in hb["ratios"].items()) + "."]
    L += ["", "`capture(queries=\"last\")` records every stream: where there is an image (1k tokens and up) the last row "
          "of each of the vision tower's 24 layers too (24 more attention calls than the text-only 256-token row).",
          "", "The eager reference runs in bfloat16 too (the model's own eager attention for the last token, after an "
          "SDPA prefill of the others), so the differences are bfloat16 rounding of two different kernels.", "",
          "![growth](gpu.png)", "",
          f"## 2. FastV prefill speed-up, K=2 (goal >= {FASTV_GOAL:.1f}x at keep 50%)", "",
          "One 336 px image (576 image tokens) and 41 text tokens. Prefill = one forward with `use_cache=True`, "
          "`logits_to_keep=1`, the tower and projector included (the same in every configuration). With random weights "
          "the next token means nothing: \"same next token\" says whether pruning moved it, not whether an answer got "
          "worse.", "",
          "| batch | config | speed-up vs no pruning (median, min..max) | theoretical LM FLOPs ratio | cache length, layers "
          "0-1 / 2 on | same next token | peak above weights |", "|---|---|---|---|---|---|---|"]
    for batch, r in f.items():
        for name, sp in r["speed"].items():
            c = r["checks"][name]
            L.append(f"| {batch} | {name} | **{sp['speedup']:.2f}x** ({sp['min']:.2f}..{sp['max']:.2f}) | "
                     f"{sp['flops_ratio']:.2f}x | {c['cache_len_layers_0_1'][0]} / {c['cache_len_layers_2_on']} | "
                     f"{c['same_next_token']} | {r['peak_bytes'][name] / gib:.2f} GiB (no pruning "
                     f"{r['peak_bytes']['no pruning'] / gib:.2f}) |")
        L.append(f"| {batch} | no pruning | {r['median_s']['no pruning'] * 1e3:.1f} ms per prefill | | "
                 f"{r['tokens']} | | |")
    if s:
        L += ["", "## 3. Split model: GPU, CPU and disk against the unsplit model on the GPU", "",
              "The same architecture cut to 8 language and 4 tower layers, float32 with TF32 off; the tower's even "
              "layers, the first half of the language layers, the embeddings and the LM head on the GPU, the other "
              f"layers on the CPU and disk alternately, the projector on disk (devices: {', '.join(s['devices'])}).",
              "", "| check | result |", "|---|---|",
              f"| capture, both streams, every layer: max abs difference | {s['capture_max_abs']:.1e} |",
              f"| token roles equal | {s['capture_roles_equal']} |",
              f"| FastV kept positions equal | {s['fastv_kept_equal']} |",
              f"| FastV logits: max abs difference | {s['fastv_logits_max_abs']:.1e} |",
              f"| VCD generation (3 tokens): tokens equal | {s['vcd_tokens_equal']} |",
              f"| VCD logits: max abs difference | {s['vcd_logits_max_abs']:.1e} |",
              f"| explain scores: max abs difference (largest score {s['explain_scores_max']:.1e}) | "
              f"{s['explain_scores_max_abs']:.1e} |"]
    for part in ("growth", "fastv", "host", "exact", "split"):
        if res.get(f"{part}_error"):
            last = res[f"{part}_error"].strip().splitlines()[-1]
            L += ["", f"**{part} failed in this run:** `{last}`" + (f" {res['notes'][part]}" if part in res.get("notes", {}) else "")]
    md.write_text("\n".join(L) + "\n")
    plot(g, md.with_suffix(".png"))


def plot(g: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(t) for t in g]
    rows = [g[t] for t in g]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(xs, [r["time"]["ratio"] for r in rows], "o-", label="time (median of rounds)")
    ax.fill_between(xs, [r["time"]["min"] for r in rows], [r["time"]["max"] for r in rows], alpha=0.15,
                    label="time, min..max of rounds")
    ax.plot(xs, [r["peak_ratio"] for r in rows], "s--", label="peak GPU memory above the weights")
    ax.axhline(GROWTH_GOAL, color="red", lw=1, ls=":", label=f"goal {GROWTH_GOAL:.2f}x")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(t) for t in xs])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("capture(queries='last') / plain SDPA")
    ax.set_title("LLaVA-1.5-7B-shaped, bf16, H200: last rows of 32 layers x 32 heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, metavar="DIR", help="run on this machine's GPU, write DIR/gpu.json")
    ap.add_argument("--report", type=Path, metavar="JSON", help="write bench/results/gpu.md/.png from a gpu.json")
    ap.add_argument("--small", action="store_true", help="tiny dimensions on the CPU (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the report (default bench/results)")
    args = ap.parse_args()
    if args.report:
        res = json.loads(args.report.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(res, indent=1))
        report(res, args.out / "gpu.md")
        return
    if not args.small and not args.run:
        ap.error("give --run DIR (on a CUDA machine), --report JSON or --small")
    import torch

    if not args.small and not torch.cuda.is_available():
        sys.exit("error: --run needs a CUDA device (use --small for the CPU smoke run)")
    run(args.run, args.small)  # --small --run DIR: the CPU smoke run, written to DIR


if __name__ == "__main__":
    main()
