"""Gradient-weighted attention: attention to image tokens weighted by how much the answer depends on it.

Paper: "MLLMs Know Where to Look" (Zhang et al., ICLR 2025), their "grad-att": Â = A ⊙ ReLU(∂ log p(answer)/∂A),
heads and layers averaged, read at the answer position's row over the image tokens. The answer is the greedy next
token (`explain.targets.NextToken`).

Here: one forward and one backward through `explain.engine` (attention computed in the graph so its gradient is the
one the answer really has: the backend is replaced for this pass, outputs equal it to float rounding; the model's
parameters get no .grad). The rows are the query positions (the last prompt position, or the tokens of `target=`).

Defaults, and why: `layers="all"` (the paper averages every layer: the gradient already weighs the layers down where
the answer does not depend on the attention)."""
from __future__ import annotations

from ..explain import engine
from ..explain.targets import NextToken
from . import common

NAME = "gradattn"
DEFAULTS = {"layers": "all"}
FORWARDS, BACKWARDS = 1, 1


def run(model, inputs, photo, question, queries, layers="all"):
    chosen = common.layer_range(layers, model.streams["language"])
    positions, _ = common.image_positions(model, inputs)
    with engine.no_model_grads(model.hf):
        p = engine.run(model, inputs, NextToken(), streams=["language"], grad=True)
        attn = [p.attention("language", l) for l in chosen]
        grads = engine.gradients(p.value, attn)
    maps = [(engine.on_host(a[0]) * engine.on_host(g[0]).clamp_min(0))[:, queries][..., positions].mean(dim=(0, 1))
            for a, g in zip(attn, grads)]
    answer = p.target.describe()
    return sum(maps) / len(maps), {"layers": chosen, "answer_token": answer.get("text")}
