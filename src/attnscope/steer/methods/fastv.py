"""FastV: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (Chen et al., ECCV 2024).

What it changes, where: after layer K of the language model, the image tokens that received the least attention
from the last query row (the last prompt token, mean over heads) at layer K-1 are dropped from the hidden states,
so layers K.. and their KV cache never hold them (`DropTokens`, decoder-layer pre-hooks; position ids, RoPE and
masks of the kept tokens stay as they were). Layers 0..K-1 see every token.

Defaults and why: K=2 and keep=0.5 (R=50%) are the paper's headline setting. The ranking uses the last query row,
not the average over all rows, so only one explicit probability row is computed (the backend keeps running)."""
from __future__ import annotations

from ..edits import DropTokens, SteerError
from ._base import Method


class FastV(Method):
    name = "fastv"
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, Chen et al., ECCV 2024)"

    def __init__(self, k: int = 2, keep: float = 0.5, role: str = "image", stream=None):
        if int(k) < 1:
            raise SteerError(f"FastV ranks with the attention of layer K-1, so K must be >= 1; got {k}")
        self.k, self.keep, self.role, self.stream = int(k), float(keep), role, stream
        DropTokens({self.k: self.keep}, role=role)  # validates keep

    def edits(self, model):
        return self._tag([DropTokens({self.k: self.keep}, role=self.role, rank="attention", stream=self.stream)])
