"""Gradient x attention relevance (self-attention rule and the bi-modal rule for LLaVA-style models).

Paper: "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
(Chefer, Gur & Wolf, ICCV 2021).

Self-attention rule, per stream: R starts as the identity (each token is its own source); for every layer l in
forward order, Ā_l = mean over heads of (dy/dA_l ⊙ A_l)^+ and R ← R + Ā_l R. The scores are Σ_q w_q R[q, :] over
the target's readout positions q. Gradients are taken with respect to the attention probabilities the output
really used (`engine.InGraphAttention`): one forward pass plus one backward pass.

Readout weights `queries`: "gradient" (default) weighs each position q by the positive part of Σ_d h_L[q,d]
dy/dh_L[q,d] at the last block's output - for a CLS-logit or next-token target that is exactly the one readout
position (the paper's R[CLS, :]), and for heads that pool several positions (mean-pooled embeddings; the canvas
classifier's [CLS ‖ mean patch] head) it weighs the positions the head actually reads. "declared" uses the
target's query positions uniformly, as raw/rollout do.

Bi-modal rule (LLaVA-style VLMs, `vision="auto"`): the language model's self-attention relevance gives the text
query's relevance over the image tokens, r_img = R_LM[q, image tokens]. The image tokens are the vision tower's
patch outputs, one LM token per tower patch (LLaVA) or one per p x p block of patches (a pooling projector such as
scene-vlm's 2x2 merge: LM image grid 8x8 over a 16x16 tower grid). r_img is spread over the tower patches each
token pools (equal shares), carried through the tower's own self-attention relevance R_V (computed from the same
backward pass), normalised as in the paper's rule for combining a modality's self-relevance:
R̄_V = rownorm(R_V - I) + I, then summed back over each token's block: the image part of the scores is
pool(spread(r_img) · R̄_V[patches, patches]), rescaled to keep the LM's total image relevance. The tower-resolution
map is kept in `extras["tower_map"]` (rows of the tower's grid). Towers whose patches are merged in an order that
is not a raster grid (Qwen2-VL's merger) have no such map: `vision=True` is refused for them and `vision="auto"`
falls back to the LM's relevance alone (`extras["bimodal_skipped"]` says why).

Defaults, and why: `start_layer=0` (all layers, as in the paper); `queries="gradient"` (above); `sinks="keep"`
("discount" zeroes the detected sinks' columns in every Ā_l before accumulation)."""
from __future__ import annotations

import torch

from . import base, engine, sinks as sinklib

NAME = "gradattn"
UNITS = ("accumulated gradient x attention relevance (Chefer et al.), positive part; the readout token keeps "
         "its own identity share")
DEFAULTS = {"start_layer": 0, "sinks": "keep", "queries": "gradient", "vision": "auto"}


def accumulate(attn: list[torch.Tensor], grads: list[torch.Tensor], n: int, drop=(), start_layer: int = 0) -> torch.Tensor:
    """R = I; R <- R + mean_h((g ⊙ A)^+) R over layers (each A, g: [H, N, N])."""
    rel = torch.eye(n)
    for l, (a, g) in enumerate(zip(attn, grads)):
        if l < start_layer:
            continue
        abar = (engine.on_host(g) * engine.on_host(a)).clamp_min(0).mean(0)
        if drop:
            abar[:, list(drop)] = 0
        rel = rel + abar @ rel
    return rel


def normalise_self(rel: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s R̄ = rownorm(R - I) + I for a modality's self-relevance."""
    eye = torch.eye(rel.shape[0])
    hat = rel - eye
    total = hat.sum(-1, keepdim=True)
    return torch.where(total > 0, hat / total.clamp_min(1e-12), torch.zeros_like(hat)) + eye


def supports_vision(model) -> str | None:
    if model.spec.kind != "vlm":
        return "the model is not a vision-language model"
    if model.spec.vision_order != "raster":
        return (f"{model.spec.family}'s tower merges patches before the language model, so its image tokens are not one "
                "per tower patch; the bi-modal rule needs LLaVA-style one-to-one image tokens")
    return None


def run(model, inputs, target, stream, start_layer=0, sinks="keep", queries="gradient", vision="auto"):
    sinklib.check_mode(sinks)
    if queries not in ("gradient", "declared"):
        raise engine.MethodError(f"queries must be 'gradient' or 'declared'; got {queries!r}")
    why_not = supports_vision(model) if inputs.get("pixel_values") is not None else "there is no image input"
    if vision is True and why_not:
        raise engine.MethodError(f"the bi-modal rule is not defined here: {why_not}")
    use_vision = vision in (True, "auto") and why_not is None and stream != "vision"
    streams = [stream] + (["vision"] if use_vision else [])
    with engine.no_model_grads(model.hf):
        p = engine.run(model, inputs, target, streams=streams, keep_blocks=[stream], grad=True)
        layers = {s: p.layers(s) for s in streams}
        attn = {s: [p.attention(s, l) for l in layers[s]] for s in streams}
        last = p.block_out[(stream, max(layers[stream]))]
        flat = [a for s in streams for a in attn[s]] + [last]
        grads = engine.gradients(p.value, flat)
    g = {}
    i = 0
    for s in streams:
        g[s] = grads[i : i + len(attn[s])]
        i += len(attn[s])
    g_last = grads[-1]
    tmap = p.tokens[stream][0]
    report = sinklib.from_pass(p, stream)
    drop = sinklib.discount_positions(tmap) if sinks == "discount" else []
    rel = accumulate([a[0] for a in attn[stream]], [x[0] for x in g[stream]], len(tmap), drop, start_layer)
    if queries == "gradient":
        w = (engine.on_host(last[0]) * engine.on_host(g_last[0])).sum(-1).clamp_min(0)[: len(tmap)]
    if queries == "declared" or float(w.sum()) <= 0:
        w = torch.zeros(len(tmap))
        w[p.target.queries(tmap)] = 1.0
    w = w / w.sum()
    scores = w @ rel
    extras = {"readout_weights": {int(k): round(float(w[k]), 4) for k in torch.nonzero(w > 0.01).flatten()},
              "sinks": report.to_dict(), "bimodal": use_vision}
    if vision == "auto" and why_not and model.spec.kind == "vlm":
        extras["bimodal_skipped"] = why_not
    if use_vision:
        scores = _bimodal(p, attn["vision"], g["vision"], tmap, scores, start_layer, extras)
    params = {"start_layer": start_layer, "sinks": sinks, "queries": queries, "vision": vision}
    return base.make(model, inputs, p, stream, NAME, params, scores, extras=extras)


def pooling(lm_grid: tuple[int, int], tower_grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tower patches each LM image token pools: 1x1 for LLaVA, 2x2 for scene-vlm's projector."""
    (lr, lc), (tr, tc) = lm_grid, tower_grid
    if not lr or not lc or tr % lr or tc % lc:
        raise engine.MethodError(f"the LM's {lr}x{lc} image-token grid does not tile the tower's {tr}x{tc} patch grid; "
                                 "the bi-modal rule needs each image token to pool a block of patches")
    return tr // lr, tc // lc


def _bimodal(p, attn, grads, tmap, scores, start_layer, extras):
    """Carry the LM's image-token relevance to the tower's input patches through the tower's self-relevance."""
    scores = scores.clone()
    vision_maps = p.tokens["vision"]
    tower_maps = []
    for k in range(len(tmap.grids)):
        if k >= len(vision_maps):
            break
        lm_pos = tmap.image_positions(k)
        vis_map = vision_maps[k]
        vis_pos = vis_map.image_positions(0)
        pr, pc = pooling(tmap.grids[k], vis_map.grids[0])
        if len(lm_pos) * pr * pc != len(vis_pos):
            raise engine.MethodError(f"image {k}: {len(lm_pos)} image tokens in the LM cannot pool {len(vis_pos)} tower "
                                     f"patches in {pr}x{pc} blocks")
        lm_index = {tmap.patch[q][1:]: i for i, q in enumerate(lm_pos)}
        owner = torch.tensor([lm_index[(vis_map.patch[v][1] // pr, vis_map.patch[v][2] // pc)] for v in vis_pos])
        rel_v = accumulate([a[k] for a in attn], [g[k] for g in grads], len(vis_map), (), start_layer)
        sub = normalise_self(rel_v)[vis_pos][:, vis_pos]
        r_img = scores[lm_pos]
        carried = (r_img[owner] / (pr * pc)) @ sub  # over tower patches
        if float(carried.sum()) > 0:
            carried = carried * (r_img.sum() / carried.sum())
        scores[lm_pos] = torch.zeros(len(lm_pos)).index_add_(0, owner, carried)
        rows, cols = vis_map.grids[0]
        tower_maps.append(carried.reshape(rows, cols).tolist() if rows * cols == len(vis_pos) else carried.tolist())
    if tower_maps and any(g != vg.grids[0] for g, vg in zip(tmap.grids, vision_maps)):
        extras["tower_map"] = [[[round(v, 6) for v in row] for row in m] for m in tower_maps]
    return scores
