"""Attention rollout.

Paper: "Quantifying Attention Flow in Transformers" (Abnar & Zuidema, 2020). Attention weights mix information
across layers, so raw attention of one layer under-states where information came from; rollout multiplies the
per-layer attention graphs, with the residual connection added as an identity.

Computes, for layers l = start..L-1: Â_l = normalise_rows((1 - residual) * fuse_heads(A_l) + residual * I), then
R = Â_{L-1} ... Â_start, and the scores are R[q, :] averaged over the target's query positions q.

Defaults, and why: `residual=0.5` (the paper's 0.5 A + 0.5 I); `head_fusion="mean"` (the paper averages heads;
"max"/"min" as in the widely used vit-explain code); `discard_ratio=0.0` (the paper discards nothing);
`start_layer=0`; `sinks="keep"` ("discount" zeroes attention to detected sinks in every layer before the product -
on DINOv2 the layer-0 sink patch otherwise dominates the map, see `sinks.py`).

`discard_ratio` zeroes the lowest entries of each head-fused matrix before the residual is added, to sharpen maps
(vit-explain's option, not the paper's). Two conventions, chosen by `discard_over`; the same ratio gives different
maps under them (Spearman 0.75 on chelsea, 0.91 on astronaut and coffee, at 0.9 with min fusion on DINOv2-S):
* "row" (default): the lowest `ratio` fraction of each query row (int(N * ratio) entries per row), the diagonal
  always kept, so every token keeps some attention to discard;
* "matrix": vit-explain's rule: the lowest int(N * N * ratio) entries of the whole matrix, every entry except
  [0, 0] (the first token's self-attention; vit-explain's CLS) may go, so some rows can lose everything but the
  residual. Rows are renormalised after the residual in both (vit-explain's `a.sum(dim=-1)` without keepdim
  divides columns; the row normalisation it means is used here)."""
from __future__ import annotations

import torch

from . import base, engine, sinks as sinklib

NAME = "rollout"
UNITS = ("share of the readout row's information traced back to each input token through all layers (rows sum "
         "to 1)")
DEFAULTS = {"head_fusion": "mean", "discard_ratio": 0.0, "discard_over": "row", "residual": 0.5, "start_layer": 0,
            "sinks": "keep"}
DISCARD_OVER = ("row", "matrix")


def discard_lowest(a: torch.Tensor, ratio: float, over: str = "row") -> torch.Tensor:
    """Zero the lowest `ratio` fraction of a [Q, K] matrix: per row with the diagonal kept (`over="row"`), or over
    the whole matrix with only [0, 0] kept, as vit-explain does (`over="matrix"`). Raises MethodError for a ratio
    outside [0, 1) or an unknown `over`."""
    if over not in DISCARD_OVER:
        raise engine.MethodError(f"discard_over must be one of {DISCARD_OVER}; got {over!r}")
    if ratio <= 0:
        return a
    if not 0 <= ratio < 1:
        raise engine.MethodError(f"discard_ratio must be in [0, 1); got {ratio}")
    if over == "matrix":
        flat = a.reshape(-1)
        low = flat.topk(int(flat.numel() * ratio), largest=False).indices
        low = low[low != 0]
        return flat.clone().index_fill_(0, low, 0.0).view_as(a)
    k = int(a.shape[-1] * ratio)
    if k == 0:
        return a
    low = a.topk(k, dim=-1, largest=False).indices
    out = a.clone().scatter_(-1, low, 0.0)
    eye = torch.eye(a.shape[-2], a.shape[-1], dtype=torch.bool)
    return torch.where(eye, a, out)


def mixed(a: torch.Tensor, residual: float) -> torch.Tensor:
    """(1 - residual) * A + residual * I, rows renormalised: the residual-mixed attention graph of one layer."""
    if not 0 <= residual <= 1:
        raise engine.MethodError(f"residual must be in [0, 1]; got {residual}")
    eye = torch.eye(a.shape[-2], a.shape[-1], dtype=a.dtype)
    out = (1 - residual) * a + residual * eye
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def layer_graphs(p, stream, head_fusion, discard_ratio, residual, start_layer, drop, discard_over="row") -> list[torch.Tensor]:
    """The residual-mixed per-layer matrices [N, N] used by rollout and flow."""
    layers = p.layers(stream)
    start = layers[start_layer % len(layers)] if layers else 0
    out = []
    for l in layers:
        if l < start:
            continue
        a = engine.on_host(engine.fuse_heads(p.attention(stream, l), head_fusion)[0])
        a = sinklib.discount(discard_lowest(a, discard_ratio, discard_over), drop)
        out.append(mixed(a, residual))
    return out


def run(model, inputs, target, stream, head_fusion="mean", discard_ratio=0.0, residual=0.5, start_layer=0, sinks="keep",
        discard_over="row"):
    sinklib.check_mode(sinks)
    discard_lowest(torch.zeros(1, 1), 0.0, discard_over)  # checks discard_over before the model runs
    p = engine.run(model, inputs, target, streams=[stream], keep_blocks=[stream], grad=False)
    tmap = p.tokens[stream][0]
    report = sinklib.from_pass(p, stream)
    drop = sinklib.discount_positions(tmap) if sinks == "discount" else []
    graphs = layer_graphs(p, stream, head_fusion, discard_ratio, residual, start_layer, drop, discard_over)
    rolled = torch.eye(len(tmap))
    for a in graphs:
        rolled = a @ rolled
    queries = p.target.queries(tmap)
    scores = rolled[queries].mean(0)
    params = {"head_fusion": head_fusion, "discard_ratio": discard_ratio, "discard_over": discard_over, "residual": residual,
              "start_layer": start_layer, "sinks": sinks}
    return base.make(model, inputs, p, stream, NAME, params, scores, extras={"queries": queries, "sinks": report.to_dict()})
