"""RITUAL: "Random Image Transformations as a Universal Anti-hallucination Lever in LVLMs" (Woo et al., 2024).

What it changes, where: a second branch sees a randomly transformed copy of the image (flip, rotation, crop,
brightness); its logits complement the original's: l' = l(image) + alpha * l(T(image)), then the plausibility
cutoff keeps tokens with p(image) >= beta * max p(image). Acts on the top model's last-position logits.

Defaults and why: alpha=3 and beta=0.1 as we read the paper's setting (tune alpha on held-out data; the abstract
gives none). One transform is drawn per sequence from `seed`, so runs are reproducible."""
from __future__ import annotations

from ..edits import Contrast, TransformedImage
from ._base import Method


class RITUAL(Method):
    """RITUAL: complement the next-token logits with those of a randomly transformed image (Woo et al., "Random
    Image Transformations as a Universal Anti-hallucination Lever in LVLMs", 2024).

    Each step: l(image) + alpha * l(T(image)) with T one of flip / rotation / crop / brightness, drawn once per
    sequence from `seed`; then tokens with p(image) < beta * max p(image) are dropped.

    Parameters:
        alpha: float >= 0, default 3.0 (0 is the identity). beta: float in [0, 1], default 0.1. seed: int, default 0.

    Raises `SteerError` for values out of range or a model without pixel inputs. Costs a second forward per
    token."""

    name = "ritual"
    paper = "RITUAL: Random Image Transformations as a Universal Anti-hallucination Lever (Woo et al., 2024)"

    def __init__(self, alpha: float = 3.0, beta: float = 0.1, seed: int = 0):
        self.alpha, self.beta, self.seed = float(alpha), float(beta), int(seed)
        Contrast(TransformedImage(self.seed), self.alpha, self.beta, "complement")  # validates

    def edits(self, model):
        return self._tag([Contrast(TransformedImage(self.seed), self.alpha, self.beta, "complement")])
