"""One forward pass for the explanation methods: attention probabilities that the output really depends on,
block inputs/outputs, and the bound target value.

Why not `capture(grad=True)`: captured probabilities are recomputed *beside* the backend, so the output does not
depend on them and d(target)/d(attention) would be zero. Here a handler attached through `core.dispatch` computes
the attention itself (softmax(q k^T) v with `core.probs.attention_probs`, float32, GQA expanded), so the probabilities
sit on the path from input to output and gradients with respect to them are the ones Chefer et al. use. Outputs
equal the backend's to float rounding (tested). `detach=True` makes them constants in the backward pass (the
AH-rule used by the LRP-style method).

`Linearizer` freezes LayerNorm/RMSNorm scales and activation ratios in the backward pass (values unchanged), so
gradient x input on the block-0 input equals LRP relevance with conservation (see `lrp.py`)."""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.dispatch import AttentionCall, Handler, attach
from ..core.probs import attention_probs
from ..models.placement import resident
from .targets import Target, TargetError


class MethodError(ValueError):
    """A method that is unknown, or not defined for this model / input (the message says why)."""


def default_stream(model, inputs: dict) -> str:
    kind = model.spec.kind
    if kind == "vlm":
        return "language"
    if kind == "dual":
        return "vision" if inputs.get("pixel_values") is not None else "text"
    streams = list(model.streams)
    return streams[0]


def blocks(model, stream: str) -> list[nn.Module]:
    """The transformer blocks of `stream` in layer order: for each attention site, its nearest ancestor whose path
    ends in a list index (`encoder.layer.3`, `model.layers.3`)."""
    named = dict(model.hf.named_modules())
    out = []
    for site in sorted((s for s in model.sites.values() if s.stream == stream), key=lambda s: s.layer):
        parts = site.path.split(".")
        path = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if re.fullmatch(r"\d+", parts[i - 1])), None)
        if path is None:
            raise MethodError(f"cannot find the block of attention module {site.path}: no ancestor in a module list")
        out.append(named[path])
    return out


class InGraphAttention(Handler):
    """Compute attention as softmax(q k^T * scale + mask) v, keeping the probabilities in the autograd graph."""

    def __init__(self, store: dict, detach: bool = False):
        self.store, self.detach = store, detach

    def compute(self, call: AttentionCall):
        probs = attention_probs(call.module, call.query, call.key, call.attention_mask, call.kwargs)
        if self.detach:
            probs = probs.detach()
        value = call.value
        groups = call.query.shape[1] // value.shape[1]
        if groups > 1:
            value = value.repeat_interleave(groups, dim=1)
        out = torch.matmul(probs.to(value.dtype), value)
        call.probs = probs
        self.store.setdefault((call.site.stream, call.site.layer), []).append(probs)
        return out.transpose(1, 2).contiguous(), probs


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


NORM_TYPES = ("LayerNorm", "RMSNorm")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(NORM_TYPES)


def _is_activation(module: nn.Module) -> bool:
    name = type(module).__name__
    return type(module).__module__.startswith("transformers.activations") or isinstance(
        module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)) or name.endswith("Activation")


class Linearizer:
    """Forward hooks that keep every value and make the backward pass that of a linear network:
      - LayerNorm: (x - mean) / std, std a constant; RMSNorm: x / rms, rms a constant (the LN-rule);
      - activation in a gated MLP (a module with `up_proj`, e.g. Llama's SiLU gate): the gate is a constant;
      - other activations f: x * (f(x) / x), the ratio a constant (identity-like rule).
    Unknown normalisation modules (anything else named *Norm) are refused, since they would break conservation."""

    def __init__(self, hf: nn.Module):
        self.hf, self.hooks = hf, []

    def __enter__(self):
        gated = {id(getattr(m, "act_fn", None)) for m in self.hf.modules() if hasattr(m, "up_proj") and hasattr(m, "act_fn")}
        for name, module in self.hf.named_modules():
            if _is_norm(module):
                self.hooks.append(module.register_forward_hook(self._norm))
            elif "Norm" in type(module).__name__ and not list(module.children()):
                self.close()
                raise MethodError(f"the LRP-style rules know LayerNorm and RMSNorm, not {type(module).__name__} ({name})")
            elif _is_activation(module):
                self.hooks.append(module.register_forward_hook(self._gate if id(module) in gated else self._ratio))
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @staticmethod
    def _norm(module, args, output):
        x = args[0]
        xf = x.float()
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        if isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + eps).detach()
            y = centred / scale
            if getattr(module, "weight", None) is not None:
                y = y * resident(module, "weight", x.device).float()
            if getattr(module, "bias", None) is not None:
                y = y + resident(module, "bias", x.device).float()
        else:
            scale = torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
            y = xf / scale
            if getattr(module, "weight", None) is not None:
                w = resident(module, "weight", x.device).float()  # offloaded: back on meta after its forward
                y = y * (1 + w if getattr(module, "_offset_one", False) else w)
        y = y.to(output.dtype)
        # keep the exact forward value; only the backward path changes
        return output.detach() + (y - y.detach())

    @staticmethod
    def _ratio(module, args, output):
        x = args[0]
        ratio = torch.where(x.abs() > 1e-6, output / torch.where(x.abs() > 1e-6, x, torch.ones_like(x)), torch.full_like(x, 0.5))
        y = x * ratio.detach()
        return output.detach() + (y - y.detach())

    @staticmethod
    def _gate(module, args, output):
        return output.detach()


@dataclass
class Pass:
    output: object
    value: torch.Tensor  # [B], in the graph when grad was on
    target: Target  # bound
    tokens: dict = field(default_factory=dict)  # stream -> list[TokenMap]
    probs: dict = field(default_factory=dict)  # (stream, layer) -> [B, H, Q, K]
    block_in: dict = field(default_factory=dict)  # (stream, layer) -> [B, N, D]
    block_out: dict = field(default_factory=dict)

    def layers(self, stream: str) -> list[int]:
        return sorted(layer for s, layer in self.probs if s == stream)

    def attention(self, stream: str, layer: int) -> torch.Tensor:
        found = self.probs[(stream, layer)]
        if len(found) != 1:
            raise MethodError(f"({stream}, layer {layer}) ran attention {len(found)} times in one pass (one call per image, "
                              "as in Qwen2-VL's tower); this method needs one attention matrix per layer")
        return found[0]


def run(model, inputs: dict, target: Target, *, streams: list[str] | None = None, attention: bool = True,
        detach_attention: bool = False, linearize: bool = False, keep_blocks: list[str] | None = None,
        grad: bool = True) -> Pass:
    """Run the model once and return a `Pass`. `streams`: whose attention runs in-graph and is kept (default all);
    `keep_blocks`: streams whose block inputs/outputs are kept. The target is bound on this pass's output."""
    hf = model.hf
    chosen = [s for s in model.streams if streams is None or s in streams]
    store: dict = {}
    kept_in: dict = {}
    kept_out: dict = {}
    hooks = []

    def pre(key, first):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if first and grad and hidden is not None and not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_()  # something must require grad for the backward pass
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs = dict(kwargs, hidden_states=hidden)
                kept_in[key] = hidden
                return args, kwargs
            kept_in[key] = hidden
            return None
        return hook

    def post(key):
        def hook(module, args, kwargs, output):
            kept_out[key] = _first(output)
        return hook

    block_streams = set(keep_blocks or []) | set(chosen)
    for stream in block_streams:
        for layer, block in enumerate(blocks(model, stream)):
            if layer == 0 or stream in (keep_blocks or []):
                hooks.append(block.register_forward_pre_hook(pre((stream, layer), layer == 0), with_kwargs=True))
            if stream in (keep_blocks or []):
                hooks.append(block.register_forward_hook(post((stream, layer)), with_kwargs=True))
    handlers = {}
    if attention:
        handler = InGraphAttention(store, detach=detach_attention)
        handlers = {m: (s, handler) for m, s in model.sites.items() if s.stream in chosen}
    attachment = None
    linearizer = Linearizer(hf) if linearize else None
    try:
        if linearizer is not None:
            linearizer.__enter__()
        if handlers:
            attachment = attach(hf, handlers)
        with torch.set_grad_enabled(grad):
            output = hf(**inputs)
    finally:
        if attachment is not None:
            attachment.detach()
        if linearizer is not None:
            linearizer.close()
        for h in hooks:
            h.remove()
    bound = target.bind(model, inputs, output)
    with torch.set_grad_enabled(grad):
        value = bound(output, inputs)
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise TargetError(f"the target must return a tensor of shape [batch]; got {getattr(value, 'shape', type(value))}")
    tokens = model.token_maps(inputs)
    return Pass(output, value, bound, tokens, store, kept_in, kept_out)


def on_host(t: torch.Tensor) -> torch.Tensor:
    """A tensor of the pass, detached, as float32 on the CPU, where the methods combine layers (the layers of a model
    on a GPU, or split over several devices, live on their own devices)."""
    return t.detach().float().cpu()


def gradients(value: torch.Tensor, tensors: list[torch.Tensor], what: str = "the attention") -> list[torch.Tensor]:
    """d(sum of value)/d(tensors); zeros where a tensor is unused. Refuses a target with no path to the inputs."""
    if not value.requires_grad:
        raise TargetError("the target does not depend on the inputs: its value has no gradient path to the forward "
                          "pass (a constant, or computed under torch.no_grad / from detached tensors)")
    grads = torch.autograd.grad(value.sum(), tensors, allow_unused=True, retain_graph=False)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    if all(float(g.abs().max()) == 0.0 for g in grads):
        raise TargetError(f"the target does not depend on the inputs: its gradient with respect to {what} is exactly zero")
    return grads


def fuse_heads(probs: torch.Tensor, how: str) -> torch.Tensor:
    """[B, H, Q, K] -> [B, Q, K] by mean, max or min over heads."""
    if how == "mean":
        return probs.mean(1)
    if how == "max":
        return probs.max(1).values
    if how == "min":
        return probs.min(1).values
    raise MethodError(f"head_fusion must be 'mean', 'max' or 'min'; got {how!r}")


@contextmanager
def no_model_grads(hf: nn.Module):
    """Parameters need no .grad while explaining; autograd.grad never writes them, this only saves memory."""
    flags = [p.requires_grad for p in hf.parameters()]
    try:
        for p in hf.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(hf.parameters(), flags):
            p.requires_grad_(f)
