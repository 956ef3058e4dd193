"""VCD: "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive Decoding"
(Leng et al., CVPR 2024).

What it changes, where: a second branch sees the image after forward diffusion noise; at each decoding step the
logits become (1 + alpha) * l(image) - alpha * l(noised image), restricted to tokens with
p(image) >= beta * max p(image) (the adaptive plausibility cutoff). Acts on the top model's last-position logits.

Defaults and why: alpha=1, beta=0.1 and noise step 500 of 1000 (linear beta schedule 1e-4..0.02) are the paper's
settings as we read them."""
from __future__ import annotations

from ..edits import Contrast, NoisedImage
from ._base import Method


class VCD(Method):
    """VCD: contrast the next-token logits with those of a noised image (Leng et al., "Mitigating Object
    Hallucinations in Large Vision-Language Models through Visual Contrastive Decoding", CVPR 2024).

    Each step: (1 + alpha) * l(image) - alpha * l(noised image), restricted to tokens with
    p(image) >= beta * max p(image).

    Parameters:
        alpha: float >= 0, default 1.0 (0 is the identity). beta: float in [0, 1], default 0.1.
        noise_step: int in 0..1000, default 500: forward-diffusion step of the noise (linear schedule
            1e-4..0.02 over 1000 steps). seed: int, default 0 (the noise).

    Raises `SteerError` for values out of range, or on a model without pixel inputs. Costs a second forward per
    token."""

    name = "vcd"
    paper = "Visual Contrastive Decoding (Leng et al., CVPR 2024)"

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0):
        self.alpha, self.beta, self.noise_step, self.seed = float(alpha), float(beta), int(noise_step), int(seed)
        Contrast(NoisedImage(self.noise_step), self.alpha, self.beta)  # validates

    def edits(self, model):
        return self._tag([Contrast(NoisedImage(self.noise_step, seed=self.seed), self.alpha, self.beta)])
