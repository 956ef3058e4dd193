"""Imbalanced-attention fix: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model" (2025).

What it changes, where: one observation forward of the prompt (no edits) measures, per language-model head, its
visual sensitivity: the share of the last prompt row's attention on image tokens, normalised by the largest in its
layer (0..1). Dual-stream token selection then picks image tokens that are (a) locally informative: the most
attended by the last prompt row, averaged over heads and layers, and (b) spatially significant: the most attended
by the vision tower's CLS token (when the tower has one). In layers `start`..L-1, for the generating row, the
logits of the selected tokens get +log(1 + alpha * s_h), so a head's attention to them grows by up to (1 + alpha)
in proportion to its visual sensitivity s_h (head-specific modulation): deep layers, where the paper finds visual
grounding degrades, are pushed back toward the image. As an additive mask this keeps SDPA.

Defaults and why: alpha=1.0 (at most doubling a head's attention to a selected token), select=0.1 (10% of the
image tokens from each stream), start = half the depth. The abstract gives no numbers; these are our choices."""
from __future__ import annotations

import math

import torch

from ..edits import AttentionEdit, Observe, SteerError, lm_stream
from ._base import Method, default_layers
from .vhr import forward_inputs


class _Modulated(AttentionEdit):
    """+log(1 + alpha * s_h) on the selected tokens' logits; s_h and the selection come from `prepare`."""

    per_head = True

    def __init__(self, alpha, **kw):
        super().__init__(**kw)
        self.alpha = alpha

    @property
    def identity(self):
        return self.alpha == 0.0

    def bias(self, ctx, logits):
        table = ctx.state.data.get("imbalance_bias")
        if table is None or ctx.site.layer not in table:
            return torch.zeros(())
        return table[ctx.site.layer][:, :, None, None]  # [B, H, 1, 1]: every head of the layer is selected


class ImbalanceFix(Method):
    """Imbalanced-attention fix: raise the generating row's attention to selected image tokens in deep layers, per
    head by its visual sensitivity ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
    Vision-Language Model", 2025).

    An observation pass measures each head's visual sensitivity s_h in [0, 1] and selects image tokens by two
    streams (most attended by the last prompt row; most attended by the tower's CLS). In layers `start`..L-1 the
    generating row's logits to them get +log(1 + alpha * s_h).

    Parameters:
        alpha: float >= 0, default 1.0. At most (1 + alpha)x attention to a selected token (0 is the identity).
        select: float in (0, 1], default 0.1. Fraction of the image tokens picked by each stream.
        start: int or None (half the depth). First modulated layer (negative counts from the top).
        keys: "image" (default) or positions. stream: the language stream (default: the model's).

    Raises `SteerError` for alpha < 0, select outside (0, 1], or a start beyond the stream."""

    name = "imbalance"
    paper = "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model (2025)"

    def __init__(self, alpha: float = 1.0, select: float = 0.1, start: int | None = None, keys="image", stream=None):
        if float(alpha) < 0:
            raise SteerError(f"alpha must be >= 0 (it amplifies); got {alpha}")
        if not 0 < float(select) <= 1:
            raise SteerError(f"select is a fraction of the image tokens, in (0, 1]; got {select}")
        self.alpha, self.select, self.start, self.keys, self.stream = float(alpha), float(select), start, keys, stream

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        n = model.streams[stream]
        start = n // 2 if self.start is None else self.start
        layers = default_layers(model, stream, None, start=start)
        if not layers:
            raise SteerError(f"start={start} leaves no layer of the {n} in stream '{stream}'")
        name = f"_imb_{id(self)}"
        alpha, frac, target = self.alpha, self.select, self.keys

        def record_probs(ctx, call, output, heads):
            if ctx.Q < 1:
                return
            p = call.probs_for(torch.arange(ctx.H), torch.tensor([ctx.Q - 1]))[:, :, 0].float().cpu()  # [B, H, K]
            L = ctx.state.length(ctx.site.stream)
            full = torch.zeros(ctx.B, ctx.H, L)
            full.scatter_(2, ctx.positions()[:, None, :].expand(-1, ctx.H, -1), p)
            ctx.state.data.setdefault("last_row", {})[ctx.site.layer] = full

        def record_cls(ctx, call, output, heads):
            codes = ctx.state.codes.get("vision")
            if codes is None:
                return
            cls = (codes[0] == 0).nonzero()[:, 0]  # role code 0 is "cls"
            if cls.numel():
                p = call.probs_for(torch.arange(ctx.H), cls[:1]).mean(1)[:, 0].float().cpu()
                ctx.state.data.setdefault("cls", []).append(p[:, ctx.state.tmaps["vision"][0].image_positions(0)])

        observers = [Observe(record_probs, stream=stream, branch=name)]
        if "vision" in model.streams:
            vfl = getattr(model.hf.config, "vision_feature_layer", -1)
            vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
            nv = model.streams["vision"]
            observers.append(Observe(record_cls, stream="vision", layers=[(nv + vfl) % nv if vfl < 0 else vfl - 1],
                                     branch=name))

        def selected(ctx):
            sel = ctx.state.data.get("imbalance_keys")
            if sel is None:
                return torch.zeros(ctx.B, ctx.K, dtype=torch.bool)
            return ctx._select(sel, ctx.pos_k, ctx.K, 0)

        selected.__name__ = "dual_stream_selection"
        edit = _Modulated(alpha, stream=stream, layers=layers, queries="last", keys=selected)
        if isinstance(target, str):
            edit.roles_needed = {target}

        def prepare(session, state, inputs):
            from ..session import SeqState, vision_scores_to_positions

            obs = SeqState(name)
            session.run_forward(obs, forward_inputs(inputs), use_cache=False)
            rows = obs.data.get("last_row", {})
            if not rows:
                raise SteerError("the observation pass recorded no attention")
            img = state.position_mask(target, stream, 1, "keys")  # [B, L]
            L = img.shape[1]
            stacked = torch.stack([rows[layer][..., :L] for layer in sorted(rows)])  # [layers, B, H, L]
            chosen = torch.zeros_like(img)
            n_img = int(img.sum(-1).min())
            k = max(1, round(frac * n_img)) if n_img else 0
            if k:
                informative = stacked.mean((0, 2)).masked_fill(~img, float("-inf"))
                chosen.scatter_(1, informative.topk(k, dim=1).indices, True)
                cls = obs.data.get("cls")
                if cls and stream == "language":
                    spatial = vision_scores_to_positions(state, stream, torch.stack(cls).mean(0))
                    chosen.scatter_(1, spatial.topk(k, dim=1).indices, True)
            chosen &= img
            state.data["imbalance_keys"] = chosen
            bias = {}
            for layer in layers:
                mass = (rows[layer][..., :L] * img[:, None, :]).sum(-1)  # [B, H]
                s = mass / mass.amax(-1, keepdim=True).clamp_min(1e-9)
                bias[layer] = torch.log1p(alpha * s)
            state.data["imbalance_bias"] = bias
            state.data["visual_sensitivity"] = {layer: (rows[layer][..., :L] * img[:, None, :]).sum(-1) for layer in rows}

        edit.prepare = prepare
        _ = math
        return self._tag([edit, *observers])
