"""VAR: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang, Kim, Kim, Kim, ICLR 2025).

What it changes, where: in the language model's self-attention, for the query row that predicts the next token,
in image-centric heads only, a fraction `p` of the attention that goes to sink tokens is moved onto the image's
non-sink tokens in proportion to their current attention (`Redistribute`, explicit probabilities for those rows;
the other heads and rows keep SDPA). Sink tokens are found from massive activations (Sun et al. 2024): a token
whose largest |activation| entering a decoder layer is at least `tau` times that layer input's median |activation|
is a sink from that layer on (measured by decoder-layer pre-hooks, for the prompt and each generated token).
A head is image-centric for a row when the share of its non-sink attention that lands on (non-sink) image tokens
is at least `rho`.

Defaults and why: p=0.6 and rho=0.5 follow the paper's reported setting as we read it. VAR detects sinks with a
fixed threshold (tau=20) on the values of LLaVA's sink dimensions; that number depends on the model's hidden size
and normalisation, so we use a scale-free criterion instead: tau=100 times the typical activation, which
separates SmolLM2's first-token sink (>=120x at layers 2-8, >=1500x from layer 12 on) from ordinary tokens (<=50x). Layers 2..L-1: the
first two have not formed massive activations yet. `keys` is the target (a role or positions; "image" by
default), `queries="last"` the generating row (`queries="text"` also edits the prompt's text rows, at the cost
of explicit probabilities for them at prefill)."""
from __future__ import annotations

import torch

from ..edits import Redistribute, SteerError, lm_stream
from ._base import Method, default_layers


class VAR(Method):
    """VAR: move attention from visual sink tokens onto the image in image-centric heads (Kang et al., "See What You
    Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025).

    For the `queries` rows of language layers `layers` (default 2..L-1), in heads whose non-sink attention puts at
    least `rho` on image tokens, a fraction `p` of the attention on sink tokens is redistributed over the
    non-sink `keys` in proportion to their attention (`Redistribute`, explicit probabilities for those rows).

    Parameters:
        p: float in [0, 1], default 0.6. Share of the sinks' attention moved (0 is the identity).
        rho: float in [0, 1], default 0.5. Image-centric head threshold (share of non-sink attention on image).
        tau: float > 1, default 100. A token is a sink from the layer where its largest |activation| reaches tau x
            the layer input's median |activation| (massive activations, Sun et al. 2024).
        layers: int, list, slice or None (2..L-1). keys: role or positions ("image"). queries: "last" or a role.
        stream: the language stream (default: the model's).

    Raises `SteerError` for p, rho or tau out of range or layers out of range."""

    name = "var"
    paper = "See What You Are Told: Visual Attention Sink in Large Multimodal Models (Kang et al., ICLR 2025)"

    def __init__(self, p: float = 0.6, rho: float = 0.5, tau: float = 100.0, layers=None, keys="image",
                 queries="last", stream=None):
        Redistribute(p, source=None)  # validates p
        if not 0 <= float(rho) <= 1:
            raise SteerError(f"rho must be in [0, 1]; got {rho}")
        if float(tau) <= 1:
            raise SteerError(f"tau must be > 1 (a multiple of the median activation); got {tau}")
        self.p, self.rho, self.tau, self.layers, self.keys, self.queries, self.stream = \
            float(p), float(rho), float(tau), layers, keys, queries, stream

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        layers = default_layers(model, stream, self.layers, start=2)
        rho = self.rho
        target = self.keys

        def sinks(ctx):
            found = ctx.state.sink.get((ctx.site.stream, ctx.site.layer))
            if found is None:
                return torch.zeros(ctx.B, ctx.K, dtype=torch.bool)
            return ctx._select(found, ctx.pos_k, ctx.K, 0)

        sinks.__name__ = "massive_activation_sinks"
        # image-centric heads: rows whose target share of the non-sink attention is >= rho (Redistribute.min_share)
        edit = Redistribute(self.p, source=sinks, min_share=rho, stream=stream, layers=layers, queries=self.queries,
                            keys=target)
        if isinstance(target, str):
            edit.roles_needed = {target}
        edit.tau = self.tau
        edit.sink_layers = lambda m, s=stream, top=max(layers): {s: list(range(0, top + 1))}
        return self._tag([edit])
