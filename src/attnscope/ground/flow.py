"""Head-aggregated attention flow, turned into point prompts (VL-SAM).

Paper: "Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts" (VL-SAM, Lin et al.,
NeurIPS 2024): aggregate each layer's heads with weights (head aggregation), propagate the aggregated maps through
the layers with a regularised attention flow, read the query's row over the image tokens, and sample positive
points from its peaks as prompts for SAM.

Here, our reading of the two steps:
- head aggregation: head h of a layer is weighted by w_h = mean over query rows of max over keys of A_h (a head that
  concentrates its attention counts more), Ā = Σ_h w_h A_h / Σ_h w_h;
- regularised flow: a causal mask lets early tokens be seen by more queries, so their accumulated flow grows with
  depth whatever the content; each column k of Ā is divided by the number of queries that can see it (N - k) and
  rows are renormalised, then the residual is added as in rollout (Abnar & Zuidema, 2020): R ← (½Ā + ½I) R, rows
  renormalised. The map is R[query rows, image tokens], averaged over the query rows.
Points (`Grounding.points`) are the map's peaks with a minimum separation: VL-SAM's positive point prompts.
Cost: one forward capturing every row of the chosen layers (only the language model's; backend untouched).

Defaults, and why: `layers="all"` (flow propagates through the whole stack, as in the paper).

On scene-vlm it does not localise (bench/results/grounding.md: pointing below the random map). On 13 val objects the
map's peak is decided by position, not content: without the regularisation it sits on the first image tokens (the
causal accumulation the regularisation is meant to remove), with it on the last image token (overcorrected); keeping
image tokens' own rows as identity (flow only through text tokens) moves it to image token 2, an attention sink.
The paper's exact regulariser may do better; this file is the place to change it."""
from __future__ import annotations

import torch

from . import common

NAME = "flow"
DEFAULTS = {"layers": "all"}
FORWARDS = 1


def aggregate_heads(probs: torch.Tensor) -> torch.Tensor:
    """[H, N, N] -> [N, N]: heads weighted by their mean row maximum."""
    weights = probs.max(-1).values.mean(-1)
    return (weights[:, None, None] * probs).sum(0) / weights.sum().clamp_min(1e-12)


def regularise(agg: torch.Tensor) -> torch.Tensor:
    """Divide column k by the number of causal queries that see it (N - k); renormalise rows."""
    n = agg.shape[-1]
    seen = torch.arange(n, 0, -1, dtype=agg.dtype)
    out = agg / seen
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def run(model, inputs, photo, question, queries, layers="all"):
    chosen = common.layer_range(layers, model.streams["language"])
    positions, _ = common.image_positions(model, inputs)
    probs = common.full_attention(model, inputs, chosen)
    n = probs[0].shape[-1]
    eye = torch.eye(n)
    rel = eye.clone()
    for a in probs:
        step = 0.5 * regularise(aggregate_heads(a)) + 0.5 * eye
        rel = (step / step.sum(-1, keepdim=True)) @ rel
    return rel[queries][:, positions].mean(0), {"layers": chosen}
