"""Attention flow: maximum flow from the target's query to each input token through the layered attention graph.

Paper: "Quantifying Attention Flow in Transformers" (Abnar & Zuidema, 2020). The attention graph has one node per
(level, token), levels 0 (inputs) .. L (outputs of the last layer); an edge from (l+1, i) to (l, j) has capacity
Â_l[i, j], the residual-mixed attention of layer l (0.5 A + 0.5 I, rows renormalised, heads fused). The flow
score of input token j is the value of a maximum flow from the query node(s) at level L to (0, j). Flow treats
the graph as a network of pipes; rollout multiplies paths instead.

Implementation: SciPy's `scipy.sparse.csgraph.maximum_flow` (Dinic's algorithm, in C), a maintained graph library.
It needs integer capacities, so capacities are scaled by 10^6 and rounded (edges below 5e-7 vanish; scores are
accurate to ~1e-6 per edge). Several query positions (a mean-pooled embedding, an answer span) hang from a super
source with capacities equal to their weights (1/len(queries) each).

Cost: one max-flow problem per input token, N problems on a graph of V = (L+1)N + 1 nodes and up to E = L N^2
edges; Dinic is O(V^2 E) in the worst case, and in practice grows roughly like N^3 L here. Measured on 2 CPU
cores (dense random graphs, the worst case): 16 tokens x 6 layers 0.03 s; 65 x 12 0.25 s; 129 x 12 1.7 s;
257 x 12 (DINOv2-S at 224 px) ~15 s; by the N^3 trend 1,370 tokens (518 px) would take ~40 min. `max_tokens=300`
(default) refuses larger sequences with a message naming the alternatives (rollout; a smaller image via
`size=`) - pass `max_tokens=None` to run anyway.

Defaults: `head_fusion="mean"`, `residual=0.5`, `discard_ratio=0.0` with `discard_over="row"`, `sinks="keep"` (as
rollout, and why; `discard_over="matrix"` is vit-explain's convention, see `rollout.py`)."""
from __future__ import annotations

import numpy as np
import torch

from . import base, engine, rollout, sinks as sinklib

NAME = "flow"
UNITS = ("maximum flow (Abnar & Zuidema) from the readout node to each input token, in units of the readout's "
         "capacity 1: many tokens can receive most of it, so the colours span the smallest to the largest "
         "value")
DEFAULTS = {"head_fusion": "mean", "residual": 0.5, "discard_ratio": 0.0, "discard_over": "row", "sinks": "keep",
            "max_tokens": 300}
SCALE = 1_000_000


class FlowTooLargeError(engine.MethodError):
    """The flow graph is larger than `max_tokens` allows."""


def check_size(n_tokens: int, n_layers: int, max_tokens: int | None) -> None:
    if max_tokens is not None and n_tokens > max_tokens:
        raise FlowTooLargeError(
            f"attention flow on {n_tokens} tokens x {n_layers} layers means {n_tokens} max-flow problems on a graph of "
            f"{(n_layers + 1) * n_tokens + 1} nodes and up to {n_layers * n_tokens ** 2:,} edges (roughly N^3 L work: "
            f"minutes or more on a CPU); the limit is max_tokens={max_tokens}. Use method='rollout', explain a smaller "
            f"image (encode with size={{'height': 112, 'width': 112}}), or pass max_tokens=None to run it anyway")


def graph(mats: list[np.ndarray], queries: list[int]):
    """CSR capacity matrix of the layered graph plus a super source; returns (csr, source, n_tokens)."""
    from scipy.sparse import csr_matrix

    n = mats[0].shape[0]
    levels = len(mats)
    source = (levels + 1) * n
    rows, cols, caps = [], [], []
    for l, a in enumerate(mats):  # layer l maps level l -> level l+1; edges point down, from (l+1, i) to (l, j)
        cap = np.rint(a * SCALE).astype(np.int64)
        i, j = np.nonzero(cap)
        rows.append((l + 1) * n + i)
        cols.append(l * n + j)
        caps.append(cap[i, j])
    weight = np.full(len(queries), SCALE // len(queries), dtype=np.int64)
    weight[: SCALE - int(weight.sum())] += 1  # the weights sum to exactly SCALE
    rows.append(np.full(len(queries), source))
    cols.append(levels * n + np.asarray(queries))
    caps.append(weight)
    size = source + 1
    csr = csr_matrix((np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                     shape=(size, size))
    csr.sum_duplicates()
    return csr, source, n


def max_flows(mats: list[np.ndarray], queries: list[int], sinks: list[int] | None = None) -> np.ndarray:
    """Max-flow value from the query node(s) at the top to each input node (level 0), as a fraction of 1."""
    from scipy.sparse.csgraph import maximum_flow

    csr, source, n = graph(mats, queries)
    out = np.zeros(n)
    for j in range(n) if sinks is None else sinks:
        out[j] = maximum_flow(csr, source, j, method="dinic").flow_value / SCALE
    return out


def run(model, inputs, target, stream, head_fusion="mean", residual=0.5, discard_ratio=0.0, sinks="keep", max_tokens=300,
        discard_over="row"):
    sinklib.check_mode(sinks)
    tmap_len = len(model.token_maps(inputs)[stream][0])
    check_size(tmap_len, model.streams[stream], max_tokens)
    p = engine.run(model, inputs, target, streams=[stream], keep_blocks=[stream], grad=False)
    tmap = p.tokens[stream][0]
    report = sinklib.from_pass(p, stream)
    drop = sinklib.discount_positions(tmap) if sinks == "discount" else []
    mats = [a.numpy().astype(np.float64) for a in rollout.layer_graphs(p, stream, head_fusion, discard_ratio, residual, 0, drop,
                                                                                  discard_over)]
    queries = p.target.queries(tmap)
    scores = torch.from_numpy(max_flows(mats, queries)).float()
    params = {"head_fusion": head_fusion, "residual": residual, "discard_ratio": discard_ratio,
              "discard_over": discard_over, "sinks": sinks,
              "max_tokens": max_tokens}
    return base.make(model, inputs, p, stream, NAME, params, scores, extras={"queries": queries, "sinks": report.to_dict()})
