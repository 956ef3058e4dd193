"""Gradient x input (a baseline that does not read attention weights).

Paper: "Learning Important Features Through Propagating Activation Differences" (Shrikumar et al., 2017) introduced
gradient x input as a baseline; Chefer et al. (2021) compare against it.

Computes x ⊙ dy/dx at the model input: for images x = `pixel_values` (normalised pixels), summed over colour
channels into a pixel map and over each patch's pixels into token scores; for text x = the token embeddings
(`inputs_embeds`), summed over the width. For a VLM the image part is attributed (pixels).

Defaults, and why: `absolute=False` (signed, as defined; `True` gives |x ⊙ g|, often used for display).
Cost: one forward + one backward."""
from __future__ import annotations


from . import base, engine

NAME = "gradinput"
DEFAULTS = {"absolute": False}


def run(model, inputs, target, stream, absolute=False):
    name, leaf, rest = base.input_leaf(model, inputs, stream)
    leaf = leaf.clone().requires_grad_()
    fed = rest | {name: leaf}
    with engine.no_model_grads(model.hf):
        p = engine.run(model, fed, target, streams=[], attention=False, grad=True)
        (g,) = engine.gradients(p.value, [leaf], f"`{name}`")
    attribution = engine.on_host(leaf) * engine.on_host(g)
    if absolute:
        attribution = attribution.abs()
    tmap = model.token_maps(inputs)[stream][0]
    scores, pixels = base.reduce_to_tokens(model, inputs, stream, name, attribution, tmap)
    return base.make(model, inputs, p, stream, NAME, {"absolute": absolute}, scores, tmap=tmap, pixel_scores=pixels)
