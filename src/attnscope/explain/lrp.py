"""LRP-style relevance propagation with conserved total relevance.

Paper: "Transformer Interpretability Beyond Attention Visualization" (Chefer, Gur & Wolf, CVPR 2021), which
propagates relevance by Deep-Taylor/LRP rules through attention and skip connections with a formulation that keeps
the total relevance across layers. This file implements that idea with the conservative rules of Ali et al.
("XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022), which make the
propagation exact and cheap; it does not reproduce Chefer et al.'s final step of multiplying the attention-map
relevance by gradients and rolling it out (that gradient-weighted rollout is `gradattn`).

Rules (`engine.Linearizer` and `engine.InGraphAttention(detach=True)`):
  - attention: the softmax probabilities are constants, so relevance flows through the values only (AH-rule);
  - LayerNorm / RMSNorm: the normalising scale is a constant (LN-rule);
  - activations: f(x) = x * (f(x)/x) with the ratio constant; a gated MLP's gate is a constant;
  - linear layers, residual additions, layer scales: LRP-0 (relevance split in proportion to contributions),
    which for the network linearised this way is exactly gradient x input.
Relevance of token i is R_i = Σ_d h0[i, d] dy/dh0[i, d] at the input of the first block (token embeddings, or
patch embeddings + position embeddings). Conservation: with the rules above the network is affine in h0, so
Σ_i R_i + (relevance absorbed by biases) = y, exactly; with every bias set to zero, Σ_i R_i = y (tested). The
remainder `y - Σ R_i` is reported as `extras["bias_relevance"]`. For a target that is not affine in the last
hidden state (a log-probability, a cosine), conservation holds for the first-order relevance entering the model
at the top, Σ_q h_L[q]·dy/dh_L[q], reported as `extras["top_relevance"]`.

Defaults: none to choose beyond the rules above (ε = 0: the rules are exact; no stabiliser is needed because no
division by pre-activations happens - the denominators are the detached scales). Cost: one forward + one backward."""
from __future__ import annotations

from . import base, engine

NAME = "lrp"
DEFAULTS: dict = {}


def run(model, inputs, target, stream):
    with engine.no_model_grads(model.hf):
        p = engine.run(model, inputs, target, streams=list(model.streams), detach_attention=True, linearize=True,
                       keep_blocks=[stream], grad=True)
        layers = sorted(layer for s, layer in p.block_out if s == stream)
        h0 = p.block_in[(stream, 0)]
        h_top = p.block_out[(stream, layers[-1])]
        g0, g_top = engine.gradients(p.value, [h0, h_top], "the token embeddings")
    tmap = p.tokens[stream][0]
    scores = (engine.on_host(h0[0]) * engine.on_host(g0[0])).sum(-1)[: len(tmap)]
    total = float(scores.sum())
    value = float(p.value.detach()[0])
    top = float((engine.on_host(h_top[0]) * engine.on_host(g_top[0])).sum())
    extras = {"total_relevance": total, "target_value": value, "bias_relevance": value - total, "top_relevance": top}
    return base.make(model, inputs, p, stream, NAME, {}, scores, extras=extras)
