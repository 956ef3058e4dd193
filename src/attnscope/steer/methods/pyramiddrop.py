"""PyramidDrop: "Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
(Xing et al., 2024).

What it changes, where: the language model is split into `stages` equal stages; at the end of each stage but the
last, a fraction `ratio` of the remaining image tokens is kept, ranked by the attention of the last instruction
token (the last prompt row) at the stage's last layer. With 4 stages and ratio 0.5 the image tokens go
100% -> 50% -> 25% -> 12.5% (a pyramid). Implemented as one `DropTokens` schedule {layer: fraction of the original
image tokens kept}.

Defaults and why: stages=4 and ratio=0.5 are the paper's LLaVA-1.5 setting (drops after layers 8, 16, 24 of 32)."""
from __future__ import annotations

from ..edits import DropTokens, SteerError, lm_stream
from ._base import Method


class PyramidDrop(Method):
    """PyramidDrop: drop image tokens in stages through the language model (Xing et al., "Accelerating Your Large
    Vision-Language Models via Pyramid Visual Redundancy Reduction", 2024).

    The language model is cut into `stages` equal stages; at the end of each stage but the last a fraction `ratio`
    of the remaining image tokens is kept, ranked by the last prompt row's attention at that layer (one
    `DropTokens` schedule; kept positions keep their position ids). The kept sets are chosen at the prompt and
    kept in the KV cache.

    Parameters:
        stages: int >= 2, default 4. ratio: float in [0, 1], default 0.5 (1 is the identity).
        role: the dropped tokens' role ("image"). stream: the language stream (default: the model's).

    Raises `SteerError` for fewer than 2 stages, more stages than layers, or ratio out of range."""

    name = "pyramiddrop"
    paper = "PyramidDrop (Xing et al., 2024)"

    def __init__(self, stages: int = 4, ratio: float = 0.5, role: str = "image", stream=None):
        if int(stages) < 2:
            raise SteerError(f"PyramidDrop needs at least 2 stages; got {stages}")
        self.stages, self.ratio, self.role, self.stream = int(stages), float(ratio), role, stream
        DropTokens({1: self.ratio}, role=role)  # validates ratio

    def schedule(self, n_layers: int) -> dict[int, float]:
        if self.stages > n_layers:
            raise SteerError(f"{self.stages} stages do not fit in {n_layers} layers")
        return {round(n_layers * i / self.stages): self.ratio ** i for i in range(1, self.stages)}

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        return self._tag([DropTokens(self.schedule(model.streams[stream]), role=self.role, rank="attention", stream=stream)])
