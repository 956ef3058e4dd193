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
    name = "ritual"
    paper = "RITUAL: Random Image Transformations as a Universal Anti-hallucination Lever (Woo et al., 2024)"

    def __init__(self, alpha: float = 3.0, beta: float = 0.1, seed: int = 0):
        self.alpha, self.beta, self.seed = float(alpha), float(beta), int(seed)
        Contrast(TransformedImage(self.seed), self.alpha, self.beta, "complement")  # validates

    def edits(self, model):
        return self._tag([Contrast(TransformedImage(self.seed), self.alpha, self.beta, "complement")])
