"""Vision-aware Head Divergence ("Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
He et al., 2024): per language-model head, the L2 distance between its attention output at the last prompt position
with the image and without it (image tokens removed; or any `drop` role/positions, e.g. a text context span)."""
from __future__ import annotations

import torch

from ..steer.edits import Observe, lm_stream
from ..steer.methods.vhr import forward_inputs
from ..steer.session import as_model, remove_positions, steer


def vhd(model, inputs: dict, drop="image", layers=None) -> dict[tuple[str, int, int], float]:
    """{(stream, layer, head): VHD}, averaged over batch rows."""
    model = as_model(model)
    stream = lm_stream(model)
    runs: list[dict[int, torch.Tensor]] = [{}, {}]
    which = [0]

    def record(ctx, call, output, heads):
        runs[which[0]][ctx.site.layer] = output[0][:, -1].detach().float().cpu()

    layer_sel = layers.get(stream) if isinstance(layers, dict) else layers
    without = remove_positions(model, inputs, drop)
    with torch.no_grad(), steer(model, Observe(record, stream=stream, layers=layer_sel)):
        model.hf(**forward_inputs(inputs))
        which[0] = 1
        model.hf(**forward_inputs(without))
    out = {}
    for layer, a in runs[0].items():
        d = (a - runs[1][layer]).norm(dim=-1).mean(0)
        out.update({(stream, layer, h): float(v) for h, v in enumerate(d)})
    return out
