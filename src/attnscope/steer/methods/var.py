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
of explicit probabilities for them at prefill).

When the image-centric heads are chosen (`heads_at`): the paper calls them heads that "innately" focus on the
image, a property of the head for this input, so by default (`heads_at="prefill"`) they are chosen once per
sequence, from the last prompt row at prefill (the first forward of the sequence), and every decode step
redistributes in those heads (where its target still has mass) without measuring the share again. Decode steps
then need explicit probabilities only in the chosen heads; the other heads stay on SDPA, and layers with none chosen
do not enter attnscope's handler at all (`skips`). Rows the edit leaves alone (a head that fails the test at
prefill) keep SDPA's output, so a sequence where no head is chosen is the unsteered model bit for bit.
(The abstract does not say whether the paper re-selects per generated token; the full text is not here.)
Values: the prefill is unchanged; at decode steps a head chosen at prefill is edited even if this step's share
fell below rho, and a head not chosen is left alone even if it rose above (on SmolLM2 with a 100-token span of
1,024, rho=0.1: 7 of 252 heads chosen at prefill, 8 at the next step, with a different set).
`heads_at="step"` is the earlier form: every step computes all heads explicitly and applies the rho test to
its own row. Cost (bench/results/steer-var.md, SmolLM2, 1,024 + 64 tokens, 5 of 28 layers with a chosen head):
"prefill" 1.09x of unsteered generation (1.08x in two other runs), "step" 1.12x in the same run. What is left, per decode step
(profiled): the explicit rows of the chosen heads (about 40 small tensor operations per layer), the massive-activation
test in every decoder layer (a few operations per layer; its threshold is stored at prefill and a map with no new
sink is left as it is), and the handler's dispatch in the layers that have a chosen head."""
from __future__ import annotations

import torch

from ..edits import Redistribute, SteerError, lm_stream
from ...capture.selection import listed
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
        heads_at: "prefill" (default) or "step": choose the image-centric heads once from the last prompt row and
            reuse them at every decode step, or test every step's row anew (see the module notes). Only with
            queries="last"; other query rows are always tested row by row.
        stream: the language stream (default: the model's).

    Raises `SteerError` for p, rho or tau out of range, layers out of range or an unknown heads_at."""

    name = "var"
    paper = "See What You Are Told: Visual Attention Sink in Large Multimodal Models (Kang et al., ICLR 2025)"

    def __init__(self, p: float = 0.6, rho: float = 0.5, tau: float = 100.0, layers=None, keys="image",
                 queries="last", heads_at: str = "prefill", stream=None):
        Redistribute(p, source=None)  # validates p
        if not 0 <= float(rho) <= 1:
            raise SteerError(f"rho must be in [0, 1]; got {rho}")
        if float(tau) <= 1:
            raise SteerError(f"tau must be > 1 (a multiple of the median activation); got {tau}")
        if heads_at not in ("prefill", "step"):
            raise SteerError(f"heads_at must be 'prefill' or 'step'; got {heads_at!r}")
        self.p, self.rho, self.tau, self.layers, self.keys, self.queries, self.heads_at, self.stream = \
            float(p), float(rho), float(tau), listed(layers), keys, queries, heads_at, stream  # read at every use

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
        kind = ChosenAtPrefill if self.heads_at == "prefill" and self.queries == "last" else Redistribute
        edit = kind(self.p, source=sinks, min_share=rho, stream=stream, layers=layers, queries=self.queries,
                    keys=target)
        if isinstance(target, str):
            edit.roles_needed = {target}
        edit.tau = self.tau
        edit.sink_layers = lambda m, s=stream, top=max(layers): {s: list(range(0, top + 1))}
        return self._tag([edit])


class ChosenAtPrefill(Redistribute):
    """`Redistribute` on the last row whose heads are chosen once per sequence: at the sequence's first forward the
    `min_share` test picks them, per batch row ([B, h] in `state.per_row`, which follows beam reorders); later
    forwards edit only those heads and skip the test (the target must still have mass). What a decode step needs
    from the choice (the heads, the per-row choice over them) is derived once per choice, not per step and layer."""

    def slot(self, site, what: str = "var_heads") -> tuple:
        """Where this edit keeps its choice for `site` in `state.per_row` (and what it derives from it in
        `state.data`): per edit, so two VAR edits in one block (other keys, overlapping layers) each keep their own."""
        return (what, site.stream, site.layer, id(self))

    def _chosen(self, ctx, heads):
        """(heads chosen in some batch row, chosen [B, h, 1, 1] over them) at a decode step, or None when this layer
        has no stored choice; derived once while the stored choice is the same tensor (a beam reorder replaces it)."""
        site = ctx.site
        chosen = ctx.state.per_row.get(self.slot(site))
        if chosen is None:
            return None
        hit = ctx.state.data.get(self.slot(site, "var_heads_used"))
        if hit is None or hit[0] is not chosen or hit[1] is not heads:
            used = chosen.any(0)
            hit = (chosen, heads, heads[used.to(heads.device)], chosen[:, used][:, :, None, None])
            ctx.state.data[self.slot(site, "var_heads_used")] = hit
        return hit[2:]

    def skips(self, state, site):
        """A decode step in a layer where no head was chosen (in any batch row): the backend runs alone."""
        if state.step == 0:
            return False
        chosen = state.per_row.get(self.slot(site))
        if chosen is None:
            return True
        hit = state.data.get(self.slot(site, "var_heads_any"))
        if hit is None or hit[0] is not chosen:
            hit = state.data[self.slot(site, "var_heads_any")] = (chosen, bool(chosen.any()))
        return not hit[1]

    def heads_for(self, ctx, heads):
        if ctx.state.step == 0:
            return heads
        chosen = self._chosen(ctx, heads)
        return chosen[0] if chosen is not None else heads[:0]

    def apply(self, ctx, probs):
        new, src_mass, tgt_mass = self.moved(ctx, probs)
        if ctx.state.step == 0:
            ok = self.passes(src_mass, tgt_mass)
            ctx.state.per_row[self.slot(ctx.site)] = ok[:, :, -1, 0]
        else:
            ok = (tgt_mass > 0) & self._chosen_rows(ctx).to(tgt_mass.device)
        return self.changed(ctx, ok, new, probs)

    def _chosen_rows(self, ctx):
        """chosen [B, h, 1, 1] over the heads `heads_for` returned for this call."""
        site = ctx.site
        chosen = ctx.state.per_row[self.slot(site)]
        hit = ctx.state.data.get(self.slot(site, "var_heads_used"))
        return hit[3] if hit is not None and hit[0] is chosen else chosen[:, chosen.any(0)][:, :, None, None]
