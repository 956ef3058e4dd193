"""A keep schedule the user gives: token dropping at chosen layers, FastV/PyramidDrop's mechanism with any
schedule (FastV: "An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024).

What it changes, where: {layer K: fraction of the role's original tokens kept from layer K on}; at each K the
tokens are ranked by the attention of the last query row at layer K-1 (or by the vision tower's CLS attention,
`rank="vision_cls"`, which also allows K=0) and the rest are dropped from hidden states and the KV cache.

Defaults and why: none for the schedule (it is the user's); rank="attention" as in FastV. As a CLI string:
`keep:schedule=2@0.5+16@0.25`."""
from __future__ import annotations

from ..edits import DropTokens, SteerError
from ._base import Method


class KeepSchedule(Method):
    """A user-given token-dropping schedule: FastV's mechanism at any layers (Chen et al., "An Image is Worth 1/2
    Tokens After Layer 2", ECCV 2024).

    Parameters:
        schedule: {layer K: fraction of the role's tokens kept from layer K on}, or "2@0.5+16@0.25". Layers may be
            negative (from the top); fractions in [0, 1] must not grow with depth.
        rank: "attention" (default: the last prompt row's attention at layer K-1) or "vision_cls" (the tower's
            CLS attention; allows K=0). role: "image" (default). stream: the language stream (default: the model's).

    Raises `SteerError` for a malformed schedule, growing fractions, or layers out of range."""

    name = "keep"
    paper = "FastV's token dropping with a user schedule"

    def __init__(self, schedule, rank: str = "attention", role: str = "image", stream=None):
        if isinstance(schedule, str):
            try:
                schedule = {int(k): float(v) for k, v in (p.split("@") for p in schedule.split("+") if p)}
            except ValueError as err:
                raise SteerError(f"schedule is written layer@fraction joined by '+', e.g. 2@0.5+16@0.25; got {schedule!r}") from err
        self.schedule, self.rank, self.role, self.stream = dict(schedule), rank, role, stream
        DropTokens(self.schedule, role=role, rank=rank)  # validates

    def edits(self, model):
        return self._tag([DropTokens(self.schedule, role=self.role, rank=self.rank, stream=self.stream)])
