"""The one attention function attnscope registers in transformers' AttentionInterface.

For every original backend B (sdpa, eager, flash_attention_2, flex_attention, ...) the name `attnscope_B` is
registered with a dispatcher that always calls B itself, so outputs are those of B bit for bit, and with B's
mask builder, so the mask the model prepares is the one B expects. Modules that nobody attached a handler to
pay one dict lookup. Handlers (capture's recorders, steer's edits) are attached per module by `attach`.

A call on a module with handlers runs, in attach order:
  1. `handler.before(call)`   may change query/key/value/mask/kwargs (e.g. an additive logit bias as a mask);
  2. `handler.compute(call)`  the first one that returns an output replaces the backend (for edits that must
                              see probabilities); it may leave them in `call.probs` for later handlers;
  3. the original backend B, unless step 2 produced the output;
  4. `handler.after(call, output)` may change the output (e.g. scale heads);
  5. `handler.observe(call, output)` records (capture).
A module whose handlers all say `idle()` for the coming call runs the backend alone (VAR's decode steps in layers
where it chose no head)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import seam
from .probs import RowRun, as_index, attention_probs, index_on
from .sites import Site

PREFIX = "attnscope_"


@dataclass
class AttentionCall:
    """What the model passed to its attention function, plus the site it came from. `probs` is set by an
    edit that computed the full probabilities [B, H, Q, K] itself; `patches` by an edit that replaced only some
    (batch, query row, head) entries of the output with probabilities it computed: (heads [h], rows [r],
    where [B, h, r] bool, probs [B, h, r, K]). `probs_for` gives what the model really used either way."""

    site: Site
    module: nn.Module
    query: object
    key: object
    value: object
    attention_mask: object
    kwargs: dict
    probs: object = None
    patches: list = field(default_factory=list)

    def probs_for(self, heads: torch.Tensor | None, rows: torch.Tensor | RowRun, keys: torch.Tensor | None = None,
                  chunk: int = 256, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, len(heads), len(rows), keys] the model used for these heads (None: every head), query rows
        (indices into this call's queries, or a `RowRun`) and key columns: `probs` if an edit set it, else recomputed from q, k and the (possibly
        edited) mask, with any patched entries written over. `dtype` is the precision a recomputation stores its
        float32 chunks in (an edit's `probs` come as they are). `out`: where a plain recomputation writes its result
        (`attention_probs`); edited probabilities come in their own tensor."""
        if self.probs is not None:
            where = self.probs.device
            heads, rows = as_index(heads, self.query.shape[1], where), as_index(rows, self.query.shape[2], where)
            out = self.probs.index_select(1, heads).index_select(2, rows)
            return out if keys is None else out.index_select(-1, index_on(keys, out.device))
        if not self.patches:
            return attention_probs(self.module, self.query, self.key, self.attention_mask, self.kwargs,
                                   heads=heads, rows=rows, keys=keys, chunk=chunk, dtype=dtype, out=out)
        heads, rows = as_index(heads, self.query.shape[1], "cpu"), as_index(rows, self.query.shape[2], "cpu")
        out = attention_probs(self.module, self.query, self.key, self.attention_mask, self.kwargs, heads=heads,
                              rows=rows, chunk=chunk)
        for p_heads, p_rows, where, probs in self.patches:
            hi = (heads[:, None] == p_heads.to(heads.device)[None, :]).nonzero()  # (index in heads, index in patch)
            ri = (rows[:, None] == p_rows.to(rows.device)[None, :]).nonzero()
            if hi.numel() == 0 or ri.numel() == 0:
                continue
            sub_where = where[:, hi[:, 1]][:, :, ri[:, 1]]
            sub = probs[:, hi[:, 1]][:, :, ri[:, 1]].to(out.dtype)
            block = out[:, hi[:, 0]][:, :, ri[:, 0]]
            out[:, hi[:, 0][:, None], ri[:, 0][None, :]] = torch.where(sub_where[..., None], sub, block)
        return out if keys is None else out.index_select(-1, index_on(keys, out.device))


class Handler:
    """Base for what capture and steer attach to a module; every hook is optional. `idle()` True means the handler
    has nothing to do in the coming call (then, if all of a module's handlers say so, the backend runs untouched)."""

    def idle(self) -> bool:
        return False

    def before(self, call: AttentionCall) -> None:
        pass

    def compute(self, call: AttentionCall):
        return None

    def after(self, call: AttentionCall, output: tuple) -> tuple:
        return output

    def observe(self, call: AttentionCall, output: tuple) -> None:
        pass


_handlers: dict[nn.Module, list[tuple[Site, Handler]]] = {}
_registered: set[str] = set()
_sessions: list = []
_exclusive_local = threading.local()  # per thread: the viewer server runs other models in other threads


def _exclusive() -> list:
    """This thread's stack of `exclusive` blocks: while not empty, only the handlers of its last attachment run
    (none for None). Per thread, so a branch forward in one thread hides nothing from a capture running another
    model in another thread."""
    stack = getattr(_exclusive_local, "stack", None)
    if stack is None:
        stack = _exclusive_local.stack = []
    return stack


@contextmanager
def exclusive(attachment: Attachment | None):
    """Within the block only `attachment`'s handlers run (the others' modules call the backend untouched; with None,
    no handler runs): for the extra forwards an edit makes itself (a contrastive branch), which other sessions must
    not record."""
    stack = _exclusive()
    stack.append(attachment)
    try:
        yield
    finally:
        stack.pop()


def excluded(attachment: Attachment | None) -> bool:
    """Whether a forward running now belongs to another attachment's `exclusive` block (a branch `attachment` must
    not see: its hooks ignore it as its handlers do)."""
    stack = _exclusive()
    return bool(stack) and (stack[-1] is None or stack[-1] is not attachment)


def original_backend(backend: str, module: nn.Module) -> Callable:
    """The attention function the model would have called for `backend`."""
    return seam.backend_function(backend, module)


def _dispatcher(backend: str) -> Callable:
    def attnscope_attention(module, query, key, value, attention_mask, **kwargs):
        entries = _handlers.get(module)
        stack = _exclusive() if entries else None
        if stack:
            owner = stack[-1]
            entries = [] if owner is None else [e for e in entries if e is owner.handlers.get(module)]
        if entries:
            for _, handler in entries:
                if not handler.idle():
                    break
            else:  # every handler idle: the backend alone
                entries = None
        if not entries:
            return original_backend(backend, module)(module, query, key, value, attention_mask, **kwargs)
        call = AttentionCall(entries[0][0], module, query, key, value, attention_mask, kwargs)
        for _, handler in entries:
            handler.before(call)
        output = None
        for _, handler in entries:
            output = handler.compute(call)
            if output is not None:
                break
        if output is None:
            output = original_backend(backend, module)(
                module, call.query, call.key, call.value, call.attention_mask, **call.kwargs
            )
        for _, handler in entries:
            output = handler.after(call, output)
        for _, handler in entries:
            handler.observe(call, output)
        return output

    return attnscope_attention


def _register(backend: str) -> str:
    name = PREFIX + backend
    if name not in _registered:
        seam.register_attention(name, _dispatcher(backend), mask_like=backend)
        _registered.add(name)
    return name


def _unregister_all() -> None:
    for name in _registered:
        seam.unregister_attention(name)
    _registered.clear()


def registered_names() -> list[str]:
    """Names attnscope currently holds in the global interfaces (empty when nothing is attached)."""
    return sorted(n for n in seam.registered_attention() if n.startswith(PREFIX))


def _configs(model: nn.Module, sites: dict[nn.Module, Site]) -> list:
    seen, todo, out = set(), [model.config, *(m.config for m in sites)], []
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        todo.extend(seam.sub_configs(cfg))
    return out


class Attachment:
    """Handlers attached to one model's sites; `detach()` removes them, and the last detach of a model restores
    its attention implementation exactly. Several attachments may share a model (a capture inside a steer)."""

    def __init__(self, model: nn.Module, handlers: dict[nn.Module, tuple[Site, Handler]]):
        self.model = model
        self.handlers = handlers

    def detach(self) -> None:
        if self not in _sessions:
            return
        for module, entry in self.handlers.items():
            remaining = [e for e in _handlers.get(module, []) if e is not entry]
            if remaining:
                _handlers[module] = remaining
            else:
                _handlers.pop(module, None)
        _sessions.remove(self)
        if not any(s.model is self.model for s in _sessions):
            for cfg, impl in _saved.pop(id(self.model), []):
                seam.set_implementation(cfg, impl)
        if not _sessions:
            _unregister_all()


_saved: dict[int, list[tuple[object, object]]] = {}


def _switch(model: nn.Module, modules) -> None:
    saved = []
    try:
        for cfg in _configs(model, modules):
            impl = seam.get_implementation(cfg)
            backend = impl or "eager"
            if backend.startswith(PREFIX):
                raise RuntimeError("this model's attention is already routed through attnscope by another copy of it")
            saved.append((cfg, impl))
            seam.set_implementation(cfg, _register(backend))
    except BaseException:
        for cfg, impl in saved:
            seam.set_implementation(cfg, impl)
        if not _sessions:
            _unregister_all()
        raise
    _saved[id(model)] = saved


def attach(model: nn.Module, handlers: dict[nn.Module, tuple[Site, Handler]]) -> Attachment:
    """Route `model`'s attention through attnscope and add one handler per selected module."""
    if not any(s.model is model for s in _sessions):
        _switch(model, handlers)
    attachment = Attachment(model, handlers)
    for module, entry in handlers.items():
        _handlers.setdefault(module, []).append(entry)
    _sessions.append(attachment)
    return attachment


def attachments(model: nn.Module) -> list[Attachment]:
    """The attachments currently open on `model`."""
    return [s for s in _sessions if s.model is model]
