"""Integrated gradients, computed with Captum (a baseline that does not read attention weights).

Paper: "Axiomatic Attribution for Deep Networks" (Sundararajan, Taly & Yan, 2017). Attribution of input x against a
baseline x': (x - x') ⊙ ∫_0^1 dy/dx(x' + a (x - x')) da, approximated by Captum's `IntegratedGradients` with the
Gauss-Legendre rule; completeness (Σ attributions = y(x) - y(x')) holds up to the approximation error, which Captum
reports and `extras["convergence_delta"]` keeps.

Inputs as in gradient x input: `pixel_values` for images (summed over channels into a pixel map and over patches
into token scores), token embeddings for text.

Defaults, and why: `steps=32` (Captum's default is 50; 32 keeps the completeness error of these models below a few
percent of the target - see extras["convergence_delta"] - at two thirds of the cost); `baseline="zero"`: zero in
normalised pixel space is the dataset-mean colour, and a zero embedding is the usual text baseline;
`baseline="blur"` uses a Gaussian-blurred image (sigma 8 px) instead; `batch=8` interpolation points per forward."""
from __future__ import annotations

import torch

from . import base, engine

NAME = "ig"
DEFAULTS = {"steps": 32, "baseline": "zero", "batch": 8}


def run(model, inputs, target, stream, steps=32, baseline="zero", batch=8):
    try:
        from captum.attr import IntegratedGradients
    except ImportError as err:  # pragma: no cover - captum is a dependency
        raise engine.MethodError("integrated gradients needs Captum: pip install captum") from err
    if baseline not in ("zero", "blur"):
        raise engine.MethodError(f"baseline must be 'zero' or 'blur'; got {baseline!r}")
    name, leaf, rest = base.input_leaf(model, inputs, stream)
    if baseline == "blur" and name != "pixel_values":
        raise engine.MethodError("baseline='blur' is for images; text uses baseline='zero' (zero embeddings)")
    with torch.no_grad():
        p = engine.run(model, inputs, target, streams=[], attention=False, grad=False)
    bound = p.target

    def forward(x):
        fed = base.expand(rest, x.shape[0]) | {name: x}
        return bound(model.hf(**fed), fed)

    if baseline == "blur":
        reference = base.blurred(leaf)
    else:
        reference = torch.zeros_like(leaf)
    with engine.no_model_grads(model.hf):
        attribution, delta = IntegratedGradients(forward).attribute(
            leaf, baselines=reference, n_steps=int(steps), internal_batch_size=int(batch), return_convergence_delta=True)
    tmap = model.token_maps(inputs)[stream][0]
    scores, pixels = base.reduce_to_tokens(model, inputs, stream, name, attribution.detach(), tmap)
    extras = {"convergence_delta": float(delta.abs().max())}
    return base.make(model, inputs, p, stream, NAME, {"steps": steps, "baseline": baseline, "batch": batch}, scores,
                     tmap=tmap, pixel_scores=pixels, extras=extras)
