"""Random map: uniform random scores, the baseline every faithfulness and localisation number is read against.

Not from a paper of its own; Chefer et al. (2021) and RISE (Petsiuk et al., 2018) compare against it. Scores are
drawn from U(0, 1) with `seed` (default 0, so results are reproducible). The model runs once, under no_grad, only
to bind the target (so `.faithfulness()` scores the same class/token/reference)."""
from __future__ import annotations

import torch

from . import base, engine

NAME = "random"
DEFAULTS = {"seed": 0}


def run(model, inputs, target, stream, seed=0):
    p = engine.run(model, inputs, target, streams=[], attention=False, grad=False)
    tmap = p.tokens[stream][0]
    scores = torch.rand(len(tmap), generator=torch.Generator().manual_seed(int(seed)))
    return base.make(model, inputs, p, stream, NAME, {"seed": seed}, scores)
