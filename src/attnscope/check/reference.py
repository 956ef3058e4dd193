"""The model's own eager attention, the reference every captured row is compared with.

The model is switched to eager (`set_attn_implementation("eager")`) and run with `output_attentions=True`; the
probabilities each attention site's eager function returns are collected per (stream, layer, part), `part`
counting repeated calls of one module in the forward (Qwen2-VL's vision tower: once per image). Every config's
attention implementation is put back exactly afterwards, also when the forward raises."""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from ..core import seam


def configs(hf) -> list:
    """The model's config, its sub-configs (recursively) and every module's config, each once."""
    seen, out = set(), []
    todo = [hf.config] + [m.config for m in hf.modules() if hasattr(m, "config")]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen.add(id(cfg))
        out.append(cfg)
        todo.extend(seam.sub_configs(cfg))
    return out


def implementations(hf) -> list[tuple[object, str | None]]:
    return [(cfg, seam.get_implementation(cfg)) for cfg in configs(hf)]


@contextmanager
def eager(hf):
    """The model in eager attention inside the block; every config's implementation restored exactly after."""
    saved = implementations(hf)
    try:
        try:
            hf.set_attn_implementation("eager")
        except (ValueError, TypeError, AttributeError):  # a model that refuses the switch: set the configs directly
            pass
        for cfg, _ in saved:  # and every config it did not reach (T5's stacks keep their own copy before 5.24)
            if seam.get_implementation(cfg) != "eager":
                seam.set_implementation(cfg, "eager")
        yield
    finally:
        for cfg, impl in saved:
            seam.set_implementation(cfg, impl)


def _accepts(hf, name: str) -> bool:
    params = inspect.signature(hf.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def eager_attention(model, inputs: dict) -> tuple[dict[tuple[str, int, int], torch.Tensor], object]:
    """((stream, layer, part) -> float32 probabilities [B, H, Q, K], the eager forward's output) for `inputs`.

    Sites whose modeling file has no `eager_attention_forward` fall back to the weights their module returns
    (its output's second element), which is what `output_attentions=True` collects."""
    hf, sites = model.hf, model.sites
    spied: dict[tuple[str, int], list[torch.Tensor]] = {}
    returned: dict[tuple[str, int], list[torch.Tensor]] = {}

    def from_eager(module, weights):
        site = sites[module]
        spied.setdefault((site.stream, site.layer), []).append(weights.detach().float())

    def from_output(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(weights, torch.Tensor) and weights.ndim == 4:
            site = sites[module]
            returned.setdefault((site.stream, site.layer), []).append(weights.detach().float())

    kwargs = {"output_attentions": True} if _accepts(hf, "output_attentions") else {}
    hooks = [m.register_forward_hook(from_output) for m in sites]
    with eager(hf), torch.no_grad():
        undo = seam.eager_weights(sites, from_eager)
        try:
            out = hf(**inputs, **kwargs)
        finally:
            undo()
            for h in hooks:
                h.remove()
    ref = {}
    for key in set(spied) | set(returned):
        for part, probs in enumerate(spied.get(key) or returned[key]):
            ref[(*key, part)] = probs
    return ref, out
