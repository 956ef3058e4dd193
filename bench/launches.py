#!/usr/bin/env python
"""Operators per prefill on the LLaVA-1.5-7B structure: what a launch-bound GPU pays for capture and token pruning.

A 7B prefill of a few hundred tokens on an H200 is bound by the host launching kernels, not by the GPU
(bench/results/gpu.md: the plain prefill takes the same ~45 ms at 256 and 1k tokens), so each operator capture or
FastV adds costs about one launch, whatever its size. Operators do not depend on the widths, only on the structure
(layers, calls, heads, selections), so they are counted here on the CPU, exactly, with the LLaVA-1.5-7B structure
(a CLIP ViT-L/14-336 tower of 24 layers, 576 patches; a Llama-2-7B language model of 32 layers x 32 heads) at tiny
widths, with `TorchDispatchMode`. A "kernel" is an operator that is not a view (views launch nothing on a GPU) nor
`is_set_to` (the weights fingerprint's host-side comparison of storages);
"copies" are `_to_copy`/`copy_` (one per host-to-device index copy on a GPU); "reads" are `_local_scalar_dense`
(a tensor value read into Python: a wait for the GPU queue when the tensor lives there). The indices capture and
FastV build on the host (capture's heads and rows, FastV's kept positions) share the CPU model's device, so
`index_on` would return them untouched; on a GPU it makes each there (an `arange` for a run of consecutive indices,
a host-to-device `_to_copy` for any other): `index_on` is counted as it runs for a model on a GPU (its reads of the
host index wait for nothing and are left out). Not counted: FastV's two device-to-host copies of its ranking.

    python bench/launches.py            # -> bench/results/launches.md and .json
    python bench/launches.py --small    # tiny structure, no files (tests/test_bench_launches.py)"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VIEWS = {"view", "_unsafe_view", "expand", "transpose", "slice", "select", "detach", "alias", "unsqueeze", "squeeze",
         "permute", "t", "as_strided", "lift_fresh", "reshape", "_reshape_alias", "split", "unbind", "chunk",
         "split_with_sizes", "narrow", "view_as", "expand_as", "unflatten", "flatten", "movedim", "diagonal", "mT"}
METADATA = {"is_set_to"}  # compares tensors' storage and layout on the host: no kernel (the fingerprint's check)
COPIES = {"_to_copy", "copy_"}
READ = "_local_scalar_dense"


def count(fn) -> dict:
    """Operators dispatched while `fn` runs: all, kernels (non-views), copies, reads, and each kernel by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Counter() as c:
        fn()
    kernels = {k: v for k, v in c.ops.items() if k not in VIEWS and k not in METADATA and k != READ}
    return {"operators": sum(c.ops.values()), "kernels": sum(kernels.values()),
            "copies": sum(v for k, v in kernels.items() if k in COPIES), "reads": c.ops.get(READ, 0),
            "by_kernel": kernels}


@contextlib.contextmanager
def indices_as_on_a_gpu():
    """`index_on` as it runs for a model on a GPU and an index on the host: a run of consecutive indices made on the
    device with one `arange`, any other index copied there with one `_to_copy` (here a copy on the CPU). Reading the
    host index to tell the two apart (a host read: no wait for the GPU) is not counted."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    from attnscope.core import dispatch, probs, seam
    from attnscope.steer import session

    real = probs.index_on

    def placed(index, device):
        if index.numel() == 0 or index.device.type != "cpu":
            return real(index, device)
        with _disable_current_modes():
            first = probs._run_start(index)
        if first is not None:
            return torch.arange(first, first + index.numel(), dtype=index.dtype)
        return index.to("cpu", copy=True)

    modules = (probs, dispatch, seam, session)
    for mod in modules:
        mod.index_on = placed
    try:
        yield
    finally:
        for mod in modules:
            mod.index_on = real


def tiny(cfg) -> None:
    """The same layers, heads and patches, at widths where a CPU forward takes well under a second."""
    v, t = cfg.vision_config, cfg.text_config
    v.hidden_size, v.intermediate_size, v.projection_dim = 2 * v.num_attention_heads, 32, 32
    t.hidden_size = t.intermediate_size = 2 * t.num_attention_heads
    t.head_dim = 2


def configs(m, x: dict, text: dict) -> dict:
    """The measured prefills (name -> function), each with the inputs it runs on."""
    import attnscope
    from attnscope.steer import FastV, steer
    from attnscope.steer import session as steer_session

    hf = m.hf

    def eager(**kw):
        hf.set_attn_implementation("eager")
        try:
            return hf(**x, logits_to_keep=1, **kw)
        finally:
            hf.set_attn_implementation("sdpa")

    def last(inputs):
        with attnscope.capture(m, queries="last"):
            hf(**inputs, logits_to_keep=1)

    def fastv(per_layer=False):
        cut = steer_session._sliced
        if per_layer:  # the block arguments cut again at every layer (before they were cut once per forward)
            steer_session._sliced = lambda st, kwargs, kept, build: build()
        try:
            with steer(m, FastV(k=2, keep=0.5)):
                hf(**x, use_cache=True, logits_to_keep=1)
        finally:
            steer_session._sliced = cut

    return {
        "text: plain SDPA": lambda: hf(**text, logits_to_keep=1),
        "text: capture(queries='last')": lambda: last(text),
        "image: plain SDPA": lambda: hf(**x, logits_to_keep=1),
        "image: eager": lambda: eager(),
        "image: eager + output_attentions": lambda: eager(output_attentions=True),
        "image: capture(queries='last')": lambda: last(x),
        "image: plain SDPA, use_cache": lambda: hf(**x, use_cache=True, logits_to_keep=1),
        "image: FastV K=2 keep 50%": lambda: fastv(),
        "image: FastV K=2 keep 50%, arguments cut per layer": lambda: fastv(per_layer=True),
    }


def run(small: bool, tokens: int, only: list[str] | None = None) -> dict:
    import torch

    import gpu

    torch.manual_seed(0)
    cfg = gpu.configs(small)
    if not small:
        tiny(cfg)
    m = gpu.build(cfg, "cpu", torch.float32)
    n_img = gpu.patches(cfg)
    x = gpu.inputs(cfg, tokens, "cpu", torch.float32)
    text = gpu.inputs(cfg, tokens, "cpu", torch.float32, image=False)
    fns = {k: f for k, f in configs(m, x, text).items() if only is None or k in only}
    with torch.no_grad(), indices_as_on_a_gpu():
        for fn in fns.values():  # warm-up: lazy initialisation (the weights fingerprint, caches) counted once only
            fn()
        counts = {name: count(fn) for name, fn in fns.items()}
    calls = {"text": cfg.text_config.num_hidden_layers,
             "image": cfg.text_config.num_hidden_layers + cfg.vision_config.num_hidden_layers}
    return {"tokens": tokens, "image_tokens": n_img, "attention_calls": calls,
            "layers": {"language": cfg.text_config.num_hidden_layers, "vision": cfg.vision_config.num_hidden_layers},
            "counts": counts}


PAIRS = [("text: capture(queries='last')", "text: plain SDPA", "text"),
         ("image: capture(queries='last')", "image: plain SDPA", "image"),
         ("image: eager", "image: plain SDPA", "image"),
         ("image: eager + output_attentions", "image: plain SDPA", "image"),
         ("image: FastV K=2 keep 50%", "image: plain SDPA, use_cache", None),
         ("image: FastV K=2 keep 50%, arguments cut per layer", "image: plain SDPA, use_cache", None)]


def report(res: dict, md: Path) -> None:
    c = res["counts"]
    L = ["# Operators per prefill: the LLaVA-1.5-7B structure", "",
         f"Command: `python bench/launches.py`. {__doc__.split(chr(10) + chr(10))[1]}", "",
         f"Inputs: {res['tokens']} tokens; \"image\" rows hold one 336 px image ({res['image_tokens']} image tokens) and "
         f"run {res['attention_calls']['image']} attention calls ({res['layers']['vision']} tower layers, "
         f"{res['layers']['language']} language layers); \"text\" rows run {res['attention_calls']['text']}. The counts "
         "do not depend on the number of tokens (tests/test_bench_launches.py checks this at two lengths).", "",
         "| prefill | operators | kernels | copies | reads |", "|---|---|---|---|---|"]
    for name, r in c.items():
        L.append(f"| {name} | {r['operators']} | {r['kernels']} | {r['copies']} | {r['reads']} |")
    L += ["", "## Added to its baseline", "", "| prefill | baseline | kernels added | per attention call | copies added "
          "| reads added | kernels added, by name |", "|---|---|---|---|---|---|---|"]
    for name, base, per in PAIRS:
        a, b = c[name], c[base]
        added = {k: v - b["by_kernel"].get(k, 0) for k, v in a["by_kernel"].items() if v != b["by_kernel"].get(k, 0)}
        top = ", ".join(f"{k} {v:+d}" for k, v in sorted(added.items(), key=lambda kv: -abs(kv[1]))[:6])
        calls = f"{(a['kernels'] - b['kernels']) / res['attention_calls'][per]:.2f}" if per else "-"
        L.append(f"| {name} | {base} | {a['kernels'] - b['kernels']:+d} | {calls} | {a['copies'] - b['copies']:+d} | "
                 f"{a['reads'] - b['reads']:+d} | {top} |")
    L += ["", "Reading it: `capture(queries='last')` adds three kernels per attention call (the row recomputation: a "
          "product, a scaling, a softmax; its rows, a run, are a view of the queries and every head needs no index, so "
          "nothing is indexed or made on the device), none per token; eager attention, what attention tools without an "
          "attention-function seam run, adds about 5 per call. FastV adds its ranking at layer K-1 and its cut at layer "
          "K once per prefill (host-to-device index copies of its kept positions); before the cut block arguments were "
          "shared, every later layer cut the position embeddings and position ids again, each with its own index copy "
          "(the row 'arguments cut per layer')."]
    md.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny structure (4 language, 3 tower layers); no files")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    res = run(args.small, 80 if args.small and args.tokens == 1024 else args.tokens)
    if args.small:
        print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "by_kernel"} for k, r in res["counts"].items()}))
        return
    out = HERE / "results"
    (out / "launches.json").write_text(json.dumps(res, indent=1))
    report(res, out / "launches.md")
    print((out / "launches.md").read_text())


if __name__ == "__main__":
    main()
