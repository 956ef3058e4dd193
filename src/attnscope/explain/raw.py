"""Raw attention: the attention row(s) of the target's query position(s) at one layer (or the mean of several).

Paper: the baseline of "Quantifying Attention Flow in Transformers" (Abnar & Zuidema, 2020) and of Chefer et al.
(2021): the attention weights of a single layer read as token importance.

Computes A_l[q, :] for the target's query positions q (CLS for DINOv2/ViT targets, the last position for a
next-token target, all non-pad positions for a mean-pooled sentence embedding), fused over heads.

Defaults, and why: `layer=-1` (the last layer, the one next to the readout, as in the papers' baseline);
`heads=None` (all heads); `head_fusion="mean"` ("max"/"min" also available, as in the vit-explain rollout
code); `sinks="keep"` ("discount" zeroes the attention to detected sinks and renormalises, see `sinks.py`)."""
from __future__ import annotations

import torch

from . import base, engine, sinks as sinklib

NAME = "raw"
UNITS = ("attention weight of the readout row at the chosen layer (heads fused): a share of 1 over the keys")
DEFAULTS = {"layer": -1, "heads": None, "head_fusion": "mean", "sinks": "keep"}


def layer_list(layer, n: int, what: str = "layer") -> list[int]:
    items = [layer] if isinstance(layer, int) else list(layer)
    bad = [i for i in items if not isinstance(i, int) or not -n <= i < n]
    if bad or not items:
        raise engine.MethodError(f"{what} {bad or items} out of range: the stream has {n} layers (0..{n - 1}, negatives allowed)")
    return sorted({i % n for i in items})


def select_heads(probs: torch.Tensor, heads) -> torch.Tensor:
    if heads is None:
        return probs
    items = [heads] if isinstance(heads, int) else list(heads)
    n = probs.shape[1]
    bad = [h for h in items if not -n <= h < n]
    if bad:
        raise engine.MethodError(f"heads {bad} out of range: this layer has {n} heads")
    return probs[:, [h % n for h in items]]


def run(model, inputs, target, stream, layer=-1, heads=None, head_fusion="mean", sinks="keep"):
    sinklib.check_mode(sinks)
    p = engine.run(model, inputs, target, streams=[stream], keep_blocks=[stream], grad=False)
    tmap = p.tokens[stream][0]
    report = sinklib.from_pass(p, stream)
    layers = layer_list(layer, len(p.layers(stream)))
    drop = sinklib.discount_positions(tmap) if sinks == "discount" else []
    queries = p.target.queries(tmap)
    rows = []
    for l in layers:
        fused = engine.on_host(engine.fuse_heads(select_heads(p.attention(stream, l), heads), head_fusion)[0])
        rows.append(sinklib.discount(fused, drop)[queries].mean(0))
    scores = torch.stack(rows).mean(0)
    params = {"layer": layer, "heads": heads, "head_fusion": head_fusion, "sinks": sinks}
    return base.make(model, inputs, p, stream, NAME, params, scores, extras={"queries": queries, "sinks": report.to_dict()})
