#!/usr/bin/env python
"""Operator profile on the GPU of what bench/gpu.py times: the plain prefill against `capture(queries="last")`
at 4096 tokens, and against `steer(FastV(k=2, keep=0.5))` at 617 tokens, on the LLaVA-1.5-7B-shaped model with
random bf16 weights. Prints torch.profiler tables (GPU time, CPU time, synchronisations) per configuration.

    python bench/profile_gpu.py [--tokens 4096] > profile.txt     # on a CUDA machine"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import build, configs, inputs, patches  # noqa: E402


def kernel_ms(events, n: int) -> float:
    """GPU time per call in ms: the self time of the device's own events (kernels, copies). An operator's row (aten::mm)
    repeats the device time of the kernels it launched, so summing every row counts each kernel twice."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / n / 1e3


def profile(name: str, fn, warm: int = 2, n: int = 3) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    for _ in range(warm):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = (time.perf_counter() - t0) / n
    ev = p.key_averages()
    gpu = kernel_ms(ev, n)
    syncs = {e.key: e.count // n for e in ev if "Synchronize" in e.key or "Memcpy" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")}
    print(f"\n===== {name}: wall {wall * 1e3:.1f} ms per call (profiled), GPU kernel time {gpu:.1f} ms, per call: {syncs}")
    print(ev.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


def main() -> None:
    import torch

    import attnscope
    from attnscope.steer import FastV, steer

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--small", action="store_true", help="tiny dimensions on the CPU (smoke run)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = configs(args.small)
    dev, dtype = ("cpu", torch.float32) if args.small else ("cuda", torch.bfloat16)
    m = build(cfg, dev, dtype)
    x = inputs(cfg, args.tokens, dev, dtype)

    def last():
        with attnscope.capture(m, queries="last") as trace:
            m.hf(**x, logits_to_keep=1)
        return trace

    profile(f"plain {args.tokens}", lambda: m.hf(**x, logits_to_keep=1))
    profile(f"capture last {args.tokens}", last)
    y = inputs(cfg, patches(cfg) + 41, dev, dtype)

    def fastv():
        with steer(m, FastV(k=2, keep=0.5)):
            return m.hf(**y, use_cache=True, logits_to_keep=1)

    profile(f"plain {y['input_ids'].shape[1]}", lambda: m.hf(**y, use_cache=True, logits_to_keep=1))
    profile(f"FastV K=2 50% {y['input_ids'].shape[1]}", fastv)


if __name__ == "__main__":
    main()
