"""Head masking and scaling ("Are Sixteen Heads Really Better than One?", Michel, Levy, Neubig, NeurIPS 2019).

What it changes, where: the attention output of chosen heads, after the attention function and before the output
projection, is multiplied by `scale` (0 masks the head, as in the paper's ablations; >1 reinforces it). Works
with any backend (the backend's output is scaled).

Defaults and why: scale=0 (masking, the paper's experiment). Heads are given as [(layer, head), ...] or
"3.1+5.2"; `heads.table(..., metrics=["ablation"])` ranks them."""
from __future__ import annotations

from ..edits import HeadScale, SteerError, lm_stream
from ._base import Method, parse_heads


class HeadMask(Method):
    """Mask or scale chosen attention heads' outputs (Michel et al., "Are Sixteen Heads Really Better than One?",
    NeurIPS 2019).

    The attention output of each chosen head, after the attention function and before the output projection, is
    multiplied by `scale`; any backend.

    Parameters:
        heads: [(layer, head), ...] or "3.1+5.2" (layer.head joined by '+'); required (`SteerError` if empty).
        scale: float >= 0, default 0.0 (masking, the paper's ablation; 1 is the identity, > 1 reinforces).
        stream: default the language/text stream, else the model's first.

    `heads.table(..., metrics=["ablation"])` ranks heads to choose from."""

    name = "heads"
    paper = "Are Sixteen Heads Really Better than One? (Michel et al., NeurIPS 2019)"

    def __init__(self, heads, scale: float = 0.0, stream=None):
        self.heads = parse_heads(heads)
        if not self.heads:
            raise SteerError("HeadMask needs heads, e.g. heads=[(3, 1), (5, 2)] or '3.1+5.2'")
        HeadScale(scale)  # validates the scale
        self.scale, self.stream = float(scale), stream

    def edits(self, model):
        stream = self.stream or (lm_stream(model) if any(s in model.streams for s in ("language", "text"))
                                 else next(iter(model.streams)))
        return self._tag([HeadScale({pair: self.scale for pair in self.heads}, stream=stream)])
