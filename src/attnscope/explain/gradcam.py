"""Grad-CAM on transformer tokens (a baseline that does not read attention weights).

Paper: "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization" (Selvaraju et al., 2017),
applied to ViT tokens as Chefer et al. (2021) do for their baselines: the token sequence at one block plays the
role of a convolutional feature map (channels = hidden width, positions = tokens).

Computes, at the input of block `layer` (hidden states h [N, D]): channel weights α_d = mean over the explained
positions (image patches for images, non-pad tokens for text) of dy/dh[:, d], then cam_i = ReLU(Σ_d α_d h[i, d]).

Defaults, and why: `layer=-1`, the input of the last block - the analogue of Grad-CAM's last convolutional layer,
and the layer pytorch-grad-cam recommends for ViTs (the normalised input of the last block's attention); `relu=True`
as in the paper. The model runs with its own attention backend (no attention recomputation). Cost: one forward +
one backward."""
from __future__ import annotations


from . import base, engine, raw

NAME = "gradcam"
DEFAULTS = {"layer": -1, "relu": True}


def run(model, inputs, target, stream, layer=-1, relu=True):
    n_layers = model.streams[stream]
    (chosen,) = raw.layer_list(layer, n_layers)
    with engine.no_model_grads(model.hf):
        p = engine.run(model, inputs, target, streams=[stream], attention=False, keep_blocks=[stream], grad=True)
        h = p.block_in[(stream, chosen)]
        (g,) = engine.gradients(p.value, [h], f"block {chosen}'s input")
    tmap = p.tokens[stream][0]
    h, g = engine.on_host(h[0])[: len(tmap)], engine.on_host(g[0])[: len(tmap)]
    explained = tmap.positions("image") or [i for i, r in enumerate(tmap.roles) if r != "pad"]
    alpha = g[explained].mean(0)
    cam = h @ alpha
    scores = cam.clamp_min(0) if relu else cam
    return base.make(model, inputs, p, stream, NAME, {"layer": layer, "relu": relu}, scores)
