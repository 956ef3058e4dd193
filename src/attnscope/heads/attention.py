"""Metrics read from attention probabilities, in one forward (nothing stored beyond per-head sums):

- entropy: mean over query rows of -sum p log p (nats) of each head's attention row;
- role_mass: mean attention mass on each token role (`mass_image` is the image ratio of a VLM's text queries);
- sink_mass: mean mass on sink tokens, found by attnscope's one sink detector (`explain.sinks`: high-norm or
  massive-activation tokens, or tokens receiving >= 20x a uniform share of attention in some layer), run once on
  the same inputs before the metrics pass; the same positions the viewer and `explain` report.

Query rows: `queries` (a role, "last", positions; default every non-pad row), over every batch row."""
from __future__ import annotations

import torch

from ..core.tokens import ROLES
from ..steer.edits import Observe
from ..steer.session import CODE, as_model, steer


def attention_metrics(model, inputs: dict, streams=None, layers=None, queries=None, tau: float = 100.0,
                      chunk: int = 128) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """{(stream, layer): {"entropy": [H] (nats), "mass_<role>": [H], "sink_mass": [H]}} averaged over query rows.
    `tau` is kept for compatibility; sinks come from `explain.sinks` (its `massive_ratio` is the same idea)."""
    from ..explain import sinks as sinklib

    model = as_model(model)
    sink_masks: dict[str, torch.Tensor] = {}
    sums: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    pad = CODE["pad"]

    def reduce(ctx, call, output, heads):
        st = ctx.state
        qm = ctx.query_mask(queries)
        codes = st.codes.get(ctx.site.stream)
        if codes is not None and ctx.known:
            cols = ctx.positions()
            kcodes = codes[: ctx.B].gather(1, cols) if ctx.pos_k is not None else codes[: ctx.B, : ctx.K]
            qm = qm & (kcodes[:, ctx.K - ctx.Q:] != pad)
        else:
            kcodes = torch.full((ctx.B, ctx.K), CODE["unknown"])
        found = sink_masks.get(ctx.site.stream)
        if found is not None:
            cols = ctx.positions()
            sink = found[: ctx.B].gather(1, cols.clamp_max(found.shape[1] - 1)) & (cols < found.shape[1])
            sink = sink.float()
        else:
            sink = torch.zeros(ctx.B, ctx.K)
        rows = qm.any(0).nonzero()[:, 0]
        acc = sums.setdefault((ctx.site.stream, ctx.site.layer), {})
        onehot = torch.nn.functional.one_hot(kcodes, len(ROLES)).float()  # [B, K, roles]
        for start in range(0, rows.numel(), chunk):
            r = rows[start: start + chunk]
            with torch.no_grad():
                p = call.probs_for(torch.arange(ctx.H), r).float().cpu()  # [B, H, r, K]
            w = qm[:, r].float()[:, None, :]  # [B, 1, r]
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
            roles = torch.einsum("bhrk,bkc->bhrc", p, onehot)
            sm = (p * sink[:, None, None, :]).sum(-1)
            for name, val in (("entropy", (ent * w).sum((0, 2))), ("sink_mass", (sm * w).sum((0, 2))),
                              ("roles", (roles * w[..., None]).sum((0, 2))), ("count", w.sum((0, 2)).expand(ctx.H))):
                acc[name] = acc[name] + val if name in acc else val

    if isinstance(streams, (list, tuple)):  # observe all, keep the chosen ones (the table's rows do)
        streams = streams[0] if len(streams) == 1 else None
    edit = Observe(reduce, stream=streams if streams is not None else "*", layers=layers)
    chosen = edit.sites(model)
    by_stream: dict[str, list[int]] = {}
    for site, _ in chosen.values():
        by_stream.setdefault(site.stream, []).append(site.layer)
    for stream in by_stream:
        reports = sinklib.sink_rows(model, inputs, stream)
        mask = torch.zeros(len(reports), max(len(r.norm_ratio) for r in reports), dtype=torch.bool)
        for b, r in enumerate(reports):
            mask[b, r.positions] = True
        sink_masks[stream] = mask
    with torch.no_grad(), steer(model, edit):
        model.hf(**inputs)
    out = {}
    for key, acc in sums.items():
        n = acc["count"].clamp_min(1)
        res = {"entropy": acc["entropy"] / n, "sink_mass": acc["sink_mass"] / n}
        for i, role in enumerate(ROLES):
            mass = acc["roles"][:, i] / n
            if bool((acc["roles"][:, i] > 0).any()):
                res[f"mass_{role}"] = mass
        out[key] = res
    return out
