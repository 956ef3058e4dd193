"""Attention sinks: detection from hidden-state norms and attention mass, and the discount used by the
sink-aware maps.

Papers: "Massive Activations in Large Language Models" (Sun et al., 2024): very few activations are 100-10,000x
larger than the median, sit on a few tokens (the first token, delimiters), act as fixed biases and draw attention
to those tokens. "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et al., 2025):
the same happens to a few visual tokens in LMMs; they receive high attention though irrelevant, and removing
them does not change the output, so their attention can be discounted.

What it computes, per position i of one sequence (pad excluded):
  - `norm_ratio`    max over layers of ||h_l[i]|| / median_j ||h_l[j]||          (high-norm tokens);
  - `massive_ratio` max over layers of max_d |h_l[i, d]| / median |h_l|          (massive activations);
  - `mass_ratio`    max over layers of the attention i receives (mean over heads, summed over the queries that
                    can see it) divided by what uniform attention would give it  (attention mass); keys seen by
                    fewer than max(3, a tenth of the) query rows (the end of a causal sequence) count 0;
and a position is a sink if `norm_ratio >= 4` or `massive_ratio >= 100` or `mass_ratio >= 20`.

This is attnscope's one sink definition: `explain` (sink-aware maps, the report in `extras["sinks"]`), the head
table's `sink_mass` and the viewer's sink chips all take their positions from `sink_rows`/`from_tensors`
(`DEFINITION` is the sentence they show). A trace file has no hidden states, so the viewer applies the attention-mass
criterion alone there and says so. (VAR's steering keeps its paper's own massive-activation rule, `steer/methods`.)

Defaults, and why: 100x the median is Sun et al.'s order of magnitude for a massive activation; 4x the median
norm separates the high-norm outliers of "Vision Transformers Need Registers" from ordinary tokens (their
outliers are ~3-10x); 20x the uniform share catches the sinks we measured while leaving ordinary salient tokens
(<= 15x) alone. Measured on the bundled photos with dinov2-small: no patch has a massive activation (max
|activation| ratio <= 32, CLS ~70-80) and no patch is high-norm (<= 2x), but in layer 0 one patch per photo takes
22-43x the uniform share of every query's attention (all heads) - the single artifact patch plain rollout lights
up. On smollm2-135m the first token has a massive activation (~10^4x) and a 150x norm, as Sun et al. report.

Discount ("sink-aware" maps): the columns of sink positions are zeroed in every layer's attention and the rows
renormalised, before the method aggregates (rollout, flow, raw), or zeroed in the gradient-weighted maps
(gradattn). The readout token (role cls) is never discounted: it is where the answer is read, not an artifact."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NORM_RATIO, MASSIVE_RATIO, MASS_RATIO = 4.0, 100.0, 20.0
DEFINITION = (f"sink: a token whose hidden state has a norm >= {NORM_RATIO:g}x the median or an activation >= "
              f"{MASSIVE_RATIO:g}x the median in some layer, or that receives >= {MASS_RATIO:g}x a uniform share of "
              "attention (mean over heads, summed over the queries that see it) in some layer")
MASS_ONLY = (f"sink (attention mass only, no hidden states in a trace): a token that receives >= {MASS_RATIO:g}x a "
             "uniform share of attention (mean over heads, summed over the queries that see it) in some layer")


@dataclass
class SinkReport:
    positions: list[int]
    norm_ratio: list[float]
    massive_ratio: list[float]
    mass_ratio: list[float]
    mass_layer: list[int]
    reasons: dict[int, list[str]] = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"positions": self.positions, "reasons": {str(k): v for k, v in self.reasons.items()},
                "thresholds": self.thresholds,
                "norm_ratio": [round(v, 3) for v in self.norm_ratio],
                "massive_ratio": [round(v, 2) for v in self.massive_ratio],
                "mass_ratio": [round(v, 2) for v in self.mass_ratio], "mass_layer": self.mass_layer}


def _valid(tmap) -> torch.Tensor:
    return torch.tensor([r != "pad" for r in tmap.roles])


def statistics(hidden: list[torch.Tensor], probs: list[torch.Tensor], tmap) -> tuple:
    """Per-position (norm_ratio, massive_ratio, mass_ratio, mass_layer) from block outputs [N, D] and attention
    [H, N, N] of one sequence (row 0 already taken), reduced on the CPU (the layers of a split model live on several
    devices)."""
    valid = _valid(tmap)
    n = len(tmap)
    norm = torch.zeros(n)
    massive = torch.zeros(n)
    for h in hidden:
        h = h.detach()[:n].float().cpu()
        norms = h.norm(dim=-1)
        norm = torch.maximum(norm, norms / norms[valid].median().clamp_min(1e-12))
        absmax = h.abs().max(-1).values
        massive = torch.maximum(massive, absmax / h[valid].abs().median().clamp_min(1e-12))
    mass = torch.zeros(n)
    layer_of = torch.zeros(n, dtype=torch.long)
    for layer, a in enumerate(probs):
        a = a.detach().float().mean(0).cpu()  # [Q, K] mean over heads
        visible = (a > 0) & valid[: a.shape[0], None] & valid[None, : a.shape[1]]
        a = a * visible
        uniform = (visible / visible.sum(-1, keepdim=True).clamp_min(1)).sum(0)  # what uniform attention gives each key
        ratio = a.sum(0) / uniform.clamp_min(1e-12)
        ratio = torch.where(uniform > 0, ratio, torch.zeros_like(ratio))
        # a key seen by only a few query rows (the end of a causal sequence) is not called a sink on their word
        rows = int(visible.any(-1).sum())
        ratio = torch.where(visible.sum(0) >= min(rows, max(3, rows // 10)), ratio, torch.zeros_like(ratio))
        better = ratio > mass[: ratio.numel()]
        mass[: ratio.numel()] = torch.where(better, ratio, mass[: ratio.numel()])
        layer_of[: ratio.numel()] = torch.where(better, torch.full_like(layer_of[: ratio.numel()], layer), layer_of[: ratio.numel()])
    return norm * valid, massive * valid, mass * valid, layer_of


def from_tensors(hidden, probs, tmap, norm_ratio: float = NORM_RATIO, massive_ratio: float = MASSIVE_RATIO,
                 mass_ratio: float = MASS_RATIO, write: bool = True) -> SinkReport:
    """Detect sinks of one sequence; with `write`, store them in `tmap.sinks`."""
    norm, massive, mass, layer_of = statistics(hidden, probs, tmap)
    reasons: dict[int, list[str]] = {}
    for i in range(len(tmap)):
        why = []
        if norm[i] >= norm_ratio:
            why.append(f"norm {float(norm[i]):.1f}x median")
        if massive[i] >= massive_ratio:
            why.append(f"massive activation {float(massive[i]):.0f}x median")
        if mass[i] >= mass_ratio:
            why.append(f"attention mass {float(mass[i]):.1f}x uniform in layer {int(layer_of[i])}")
        if why:
            reasons[i] = why
    report = SinkReport(sorted(reasons), norm.tolist(), massive.tolist(), mass.tolist(), layer_of.tolist(), reasons,
                        {"norm_ratio": norm_ratio, "massive_ratio": massive_ratio, "mass_ratio": mass_ratio})
    if write:
        tmap.sinks = list(report.positions)
    return report


def from_pass(p, stream: str, **thresholds) -> SinkReport:
    """Sinks of row 0 of `stream` from an engine `Pass` that kept the stream's blocks and attention."""
    tmap = p.tokens[stream][0]
    layers = sorted(layer for s, layer in p.block_out if s == stream)
    hidden = [p.block_out[(stream, layer)][0] for layer in layers]
    probs = [p.attention(stream, layer)[0] for layer in p.layers(stream)]
    return from_tensors(hidden, probs, tmap, **thresholds)


def detect_sinks(model, inputs: dict | None = None, stream: str | None = None, *, image=None, text=None,
                 **thresholds) -> SinkReport:
    """Run the model once and detect the sinks of `stream` (row 0); the report's positions are also written to
    the returned pass's TokenMap, available as `report.tokens`."""
    from ..capture.session import as_model
    from . import engine
    from .targets import Custom

    model = as_model(model)
    if inputs is None:
        inputs = model.encode(text=text, image=image)
    stream = stream or engine.default_stream(model, inputs)
    p = engine.run(model, inputs, Custom(lambda out, x: torch.zeros(1)), streams=[stream], keep_blocks=[stream], grad=False)
    report = from_pass(p, stream, **thresholds)
    report.tokens = p.tokens[stream][0]
    return report


def sink_rows(model, inputs: dict, stream: str) -> list[SinkReport]:
    """One `SinkReport` per batch row of `stream` (one forward pass, no gradients): the sinks the head table's
    `sink_mass` and the viewer use."""
    from . import engine
    from .targets import Custom

    p = engine.run(model, inputs, Custom(lambda out, x: torch.zeros(1)), streams=[stream], keep_blocks=[stream], grad=False)
    layers = sorted(layer for s, layer in p.block_out if s == stream)
    out = []
    for b, tmap in enumerate(p.tokens[stream]):
        hidden = [p.block_out[(stream, layer)][b] for layer in layers]
        probs = [p.attention(stream, layer)[b] for layer in p.layers(stream)]
        out.append(from_tensors(hidden, probs, tmap, write=False))
    return out


def discount_positions(tmap) -> list[int]:
    """The sinks a sink-aware map discounts: all detected sinks except the readout (cls) token."""
    return [i for i in tmap.sinks if tmap.roles[i] != "cls"]


def discount(attention: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Zero the key columns `positions` of row-stochastic attention [..., Q, K] and renormalise each row."""
    if not positions:
        return attention
    out = attention.clone()
    out[..., positions] = 0
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-12), out)


def check_mode(sinks: str) -> str:
    if sinks not in ("keep", "discount"):
        from .engine import MethodError

        raise MethodError(f"sinks must be 'keep' or 'discount'; got {sinks!r}")
    return sinks
