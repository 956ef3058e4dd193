"""M3ID: "Multi-Modal Hallucination Control by Visual Information Grounding" (Favero et al., CVPR 2024).

What it changes, where: a second branch runs the prompt without the image tokens (the language prior). At decoding
step t the logits become l_c + w_t * (l_c - l_u) with w_t = (1 - g_t) / g_t and g_t = exp(-lam * t): no
correction on the first token, growing as generation goes on, because the paper finds reliance on the image fades
with the number of generated tokens. A plausibility cutoff (beta) then drops unlikely tokens.

Defaults and why: lam=0.02 as we read the paper's setting; beta=0.1 as in VCD (0 disables it). `drop` is what the
unconditioned branch leaves out: "image" for a VLM, or positions for a text model's context span."""
from __future__ import annotations

import math

import torch

from ..edits import Contrast, SteerError, WithoutTokens
from ._base import Method


class M3ID(Method):
    """M3ID: contrast with the image-free language prior, more as generation goes on (Favero et al., "Multi-Modal
    Hallucination Control by Visual Information Grounding", CVPR 2024).

    Step t: l_c + w_t * (l_c - l_u), w_t = (1 - g_t) / g_t, g_t = exp(-lam * t), where l_u comes from a branch
    without the `drop` tokens; then the plausibility cutoff `beta`. No correction on the first token.

    Parameters:
        lam: float >= 0, default 0.02 (per generated token; 0 is the identity). beta: float in [0, 1], default 0.1
            (0 disables the cutoff). drop: "image" (default) or positions (a text model's context span).

    Raises `SteerError` for lam < 0 or beta out of range. Costs a second forward per token."""

    name = "m3id"
    paper = "Multi-Modal Hallucination Control by Visual Information Grounding (Favero et al., CVPR 2024)"

    def __init__(self, lam: float = 0.02, beta: float = 0.1, drop="image"):
        if float(lam) < 0:
            raise SteerError(f"lam must be >= 0 (a decay rate); got {lam}")
        self.lam, self.beta, self.drop = float(lam), float(beta), drop
        Contrast(WithoutTokens(drop), 1.0, self.beta)  # validates beta and drop

    def edits(self, model):
        lam = self.lam

        def decay_weight(step, logits):
            g = math.exp(-lam * step)
            return torch.full((logits.shape[0], 1), (1 - g) / g)

        branch = WithoutTokens(self.drop)
        contrast = Contrast(branch, 1.0, self.beta, "contrast", weight=decay_weight if lam > 0 else None)
        if lam == 0:
            contrast.alpha = 0.0  # no correction at any step: the identity
        if self.drop == "image":
            contrast.roles_needed = {"image"}
        return self._tag([contrast])
