"""VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., 2024).

What it changes, where: the image tokens are ranked by the attention the vision tower's CLS token pays to each
patch (mean over heads, averaged over the chosen tower layers: the paper's layer ensemble), and only the top
`keep` fraction enters the language model: they are dropped before its first layer (`DropTokens` at K=0), so no
language layer or cache ever holds them. Position ids of the kept tokens stay as they were.

Defaults and why: keep=1/3 (192 of LLaVA-1.5's 576 tokens, the middle of the budgets the paper reports);
`layers=None` uses the tower layer whose output the projector reads (`vision_feature_layer`), pass several for the
ensemble. Needs a tower with a CLS token (CLIP, DINOv2)."""
from __future__ import annotations

from ..edits import DropTokens
from ...capture.selection import listed
from ._base import Method


class VTCCLS(Method):
    """VTC-CLS: keep only the image tokens the vision tower's CLS attends to most, before the language model
    (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", 2024).

    Patches are ranked by the tower CLS token's attention (mean over heads, averaged over `layers`); the top
    `keep` fraction enters the language model (`DropTokens` at K=0).

    Parameters:
        keep: float in [0, 1], default 1/3 (1 is the identity). layers: int, list or None (the tower layer the
            projector reads, `vision_feature_layer`); several form the paper's ensemble. role: "image".

    Raises `SteerError` for a tower without a CLS token, layers out of range or keep out of range."""

    name = "vtc_cls"
    paper = "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS, Wang et al., 2024)"

    def __init__(self, keep: float = 1 / 3, layers=None, role: str = "image"):
        self.keep, self.layers, self.role = float(keep), listed(layers), role  # a generator made a list once
        DropTokens({0: self.keep}, role=role, rank="vision_cls")  # validates keep

    def edits(self, model):
        layers = None if self.layers is None else ([self.layers] if isinstance(self.layers, int) else list(self.layers))
        return self._tag([DropTokens({0: self.keep}, role=self.role, rank="vision_cls", vision_layers=layers)])
