"""DeCoRe: "Decoding by Contrasting Retrieval Heads to Mitigate Hallucinations" (Gema et al., 2024).

What it changes, where: a second branch runs the same inputs with chosen heads masked (their outputs zeroed before
o_proj, only in that branch); at each step the next-token logits become (1 + w) * l_base - w * l_masked, with the
weight w = alpha * H(p_base) / log|V| growing with the base model's conditional entropy (uncertain steps are
corrected more, confident ones hardly at all), then a plausibility cutoff keeps tokens with
p_base >= beta * max p_base.

Defaults and why: the paper masks retrieval heads (heads that copy from the context); here the heads are given
(`heads=[(layer, head)]` or "3.1+5.2"; `heads.table(..., metrics=["ablation"])` on a copy task finds candidates).
alpha=1.0 with the entropy normalised to [0, 1] keeps w within the range the paper's entropy-guided variant
produces; beta=0.1 is the usual plausibility cutoff of contrastive decoding (VCD)."""
from __future__ import annotations

import math

import torch

from ..edits import Contrast, HeadScale, SameInputs, SteerError, lm_stream
from ._base import Method, parse_heads


class DeCoRe(Method):
    """DeCoRe: contrast the next-token logits with a branch whose chosen (retrieval) heads are masked, weighted by
    the base model's entropy (Gema et al., "Decoding by Contrasting Retrieval Heads to Mitigate Hallucinations",
    2024).

    Each step: l = (1 + w) * l_base - w * l_masked with w = alpha * H(p_base) / log|V| (or alpha when
    `entropy=False`), then tokens with p_base < beta * max p_base are dropped.

    Parameters:
        heads: [(layer, head), ...] or "10.3+12.5": heads masked in the branch; required.
        alpha: float >= 0, default 1.0 (0 is the identity). beta: float in [0, 1], default 0.1 (plausibility
            cutoff). entropy: bool, default True (entropy-guided weight).

    Raises `SteerError` without heads or for alpha/beta out of range. Costs a second forward per token."""

    name = "decore"
    paper = "DeCoRe: Decoding by Contrasting Retrieval Heads (Gema et al., 2024)"

    def __init__(self, heads, alpha: float = 1.0, beta: float = 0.1, entropy: bool = True):
        self.heads = parse_heads(heads)
        if not self.heads:
            raise SteerError("DeCoRe needs the heads to mask in its branch, e.g. heads='10.3+12.5'")
        self.alpha, self.beta, self.entropy = float(alpha), float(beta), bool(entropy)
        Contrast(SameInputs(), self.alpha, self.beta)  # validates

    def edits(self, model):
        alpha = self.alpha

        def entropy_weight(step, logits):
            p = logits.float().softmax(-1)
            h = -(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True)
            return alpha * h / math.log(logits.shape[-1])

        branch = SameInputs()
        branch.name = f"decore_{id(self)}"
        mask = HeadScale({pair: 0.0 for pair in self.heads}, stream=lm_stream(model))
        contrast = Contrast(branch, alpha, self.beta, "contrast", weight=entropy_weight if self.entropy else None,
                            edits=[mask])
        return self._tag([contrast])


_ = torch  # torch is used through the weight closure's tensors
