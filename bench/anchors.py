"""The anchors' way of editing attention, as the papers' reference code does it: the model switched to eager attention
and its modeling file's `eager_attention_forward` replaced by one that computes the full attention weights and
lets an edit change them. bench/steer.py times attnscope against it; tests/test_steer_edits.py and
tests/test_steer_var.py use it as the independent reference for attnscope's edits. `var_last_row` is VAR's rule
written on those weights, shared by the benchmark and the test.

    with eager_anchor(model.hf, layers={3, 4}, probs=lambda module, p: edited(p)):
        model.hf.generate(...)
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

Edit = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def eager_anchor(hf, layers, scores: Edit | None = None, probs: Edit | None = None, heads: Edit | None = None):
    """While in the block, `hf` runs eager attention, and in `layers` (layer indices) attention is computed here:
    `scores(module, w)` edits the scaled logits q.k [B, H, Q, K] before the mask, `probs(module, p)` the
    probabilities after the softmax (Q > 1 at a prefill, 1 at a decode step), `heads(module, o)` each head's output
    [B, H, Q, D] before o_proj. Other layers run the modeling file's own function. The function and SDPA are put
    back on exit, also when the block raises."""
    modeling = sys.modules[type(hf).__module__]
    original = modeling.eager_attention_forward

    def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if module.layer_idx not in layers:
            return original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        k = modeling.repeat_kv(key, module.num_key_value_groups)
        v = modeling.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if scores is not None:
            w = scores(module, w)
        if attention_mask is not None:
            w = w + attention_mask[..., : k.shape[-2]]
        p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        if probs is not None:
            p = probs(module, p)
        out = torch.matmul(p, v)
        if heads is not None:
            out = heads(module, out)
        return out.transpose(1, 2).contiguous(), p

    hf.set_attn_implementation("eager")
    modeling.eager_attention_forward = patched
    try:
        yield
    finally:
        modeling.eager_attention_forward = original
        hf.set_attn_implementation("sdpa")


def var_last_row(probs: torch.Tensor, sink, span, p: float, rho: float, heads: torch.Tensor | None = None):
    """VAR ("See What You Are Told: Visual Attention Sink in Large Multimodal Models", Kang et al., ICLR 2025) on the
    last row of probabilities [B, H, Q, K]: in heads whose `span` keys hold at least `rho` of the attention not on
    the `sink` keys (or in the [B, H, 1] mask `heads`, such as the prefill's choice), a fraction `p` of the sinks'
    mass moves to the span keys in proportion to their attention. Sinks inside the span (VAR's visual sinks are image
    tokens) are no target: the span means its non-sink keys, in the test and in the move. Returns (probabilities,
    this row's heads test)."""
    sink = torch.as_tensor(sink, dtype=torch.long)
    span = torch.as_tensor(span, dtype=torch.long)
    span = span[~torch.isin(span, sink)]
    row = probs[:, :, -1]
    sink_mass = row[..., sink].sum(-1, keepdim=True)
    tgt = row[..., span]
    tgt_mass = tgt.sum(-1, keepdim=True)
    test = tgt_mass >= rho * (1 - sink_mass).clamp_min(1e-9)  # [B, H, 1]
    new = row.clone()
    new[..., sink] = row[..., sink] * (1 - p)
    new[..., span] = tgt + p * sink_mass * tgt / tgt_mass.clamp_min(1e-30)
    new = new / new.sum(-1, keepdim=True)
    probs = probs.clone()
    probs[:, :, -1] = torch.where((test if heads is None else heads) & (tgt_mass > 0), new, row)
    return probs, test
