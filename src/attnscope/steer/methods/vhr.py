"""VHR: "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (He et al., 2024).

What it changes, where: before the prompt is processed, two observation forwards (no edits, only recording) give
each language-model head's output at the last prompt position with the image and without it (image tokens
removed). The Vision-aware Head Divergence of a head is the L2 distance between the two outputs; the heads with the
highest VHD (the vision-aware heads) have their outputs multiplied by `alpha` (before o_proj) for the whole
generation, so the model leans on them rather than on its language prior.

Defaults and why: alpha=2.0 and the top 5% of heads (over all layers, per batch row) are our choice: the paper
reinforces a small set of high-VHD heads; the abstract gives no numbers, so treat both as knobs. VHD is measured
once per sequence (from the prompt), not at every generated token, so decoding stays at one forward per token.
`drop` is what the reference pass leaves out: "image", or positions (a context span on a text model)."""
from __future__ import annotations

import torch

from ..edits import HeadScale, Observe, SteerError, lm_stream
from ...capture.selection import listed
from ._base import Method, default_layers


def record_last_outputs(ctx, call, output, heads):
    """Observer: each head's attention output at the last query row, [B, H, D], by layer."""
    ctx.state.data.setdefault("head_outputs", {})[ctx.site.layer] = output[0][:, -1].detach().float().cpu()


def forward_inputs(inputs: dict) -> dict:
    keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids",
            "token_type_ids")
    return {k: v for k, v in inputs.items() if k in keep and v is not None}


def head_divergence(session, name: str, inputs: dict, drop, state) -> dict[int, torch.Tensor]:
    """VHD [B, H] per layer from two observation passes of a running steer session."""
    from ..session import SeqState, remove_positions

    with_image, without = SeqState(name), SeqState(name)
    session.run_forward(with_image, forward_inputs(inputs), use_cache=False)
    session.run_forward(without, forward_inputs(remove_positions(session.model, inputs, drop, state)), use_cache=False)
    a, b = with_image.data.get("head_outputs", {}), without.data.get("head_outputs", {})
    return {layer: (a[layer] - b[layer]).norm(dim=-1) for layer in a if layer in b}


class _Gates(HeadScale):
    """Per-row head gates filled at each new sequence by the method's `prepare`."""

    def __init__(self, table, stream, alpha):
        super().__init__(table, stream=stream)
        self.alpha = alpha

    @property
    def identity(self):
        return self.alpha == 1.0


class VHR(Method):
    """VHR: reinforce the vision-aware heads, those whose output changes most without the image (He et al.,
    "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", 2024).

    Two observation forwards of the prompt (with and without the `drop` tokens) give each language head's output at
    the last prompt position; the L2 distance between them is its VHD. The top `top` fraction of heads by VHD have
    their outputs multiplied by `alpha` (before o_proj) for the whole generation.

    Parameters:
        alpha: float >= 0, default 2.0. Scale of the chosen heads' outputs (1 is the identity).
        top: float in (0, 1], default 0.05. Fraction of heads reinforced (over all `layers`, per batch row).
        layers: int, list, slice or None (all language layers). drop: "image" (default) or positions: what the
            reference pass leaves out. stream: the language stream (default: the model's).

    Raises `SteerError` for `top` outside (0, 1] or when no attention call could be recorded."""

    name = "vhr"
    paper = "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (He et al., 2024)"

    def __init__(self, alpha: float = 2.0, top: float = 0.05, layers=None, drop="image", stream=None):
        HeadScale(alpha)  # alpha >= 0
        if not 0 < float(top) <= 1:
            raise SteerError(f"top is the fraction of heads reinforced, in (0, 1]; got {top}")
        # layers read at every use: a generator made a list once
        self.alpha, self.top, self.layers, self.drop, self.stream = float(alpha), float(top), listed(layers), drop, stream

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        layers = default_layers(model, stream, self.layers)
        heads = {layer: model.site(stream, layer).num_heads for layer in layers}
        gates = _Gates({layer: torch.ones(n) for layer, n in heads.items()}, stream, self.alpha)
        name = f"_vhr_{id(self)}"
        record = Observe(record_last_outputs, stream=stream, layers=layers, branch=name)
        alpha, top, drop = self.alpha, self.top, self.drop

        def prepare(session, state, inputs):
            vhd = head_divergence(session, name, inputs, drop, state)
            if not vhd:
                raise SteerError("VHR could not measure head divergence (no attention call recorded)")
            order = sorted(vhd)
            flat = torch.cat([vhd[layer] for layer in order], 1)  # [B, all heads]
            k = max(1, round(top * flat.shape[1]))
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen.scatter_(1, flat.topk(k, dim=1).indices, True)
            start = 0
            for layer in order:
                n = vhd[layer].shape[1]
                gates.table[layer] = torch.where(chosen[:, start: start + n], alpha, 1.0)
                start += n
            state.data["vhd"] = vhd

        gates.prepare = prepare
        if drop == "image":
            gates.roles_needed = {"image"}
        return self._tag([gates, record])
