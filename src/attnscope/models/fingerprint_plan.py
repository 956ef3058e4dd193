"""The fast check of the weights fingerprint: has anything the kept key saw changed, without `state_dict()`?

`fingerprint.py` keys the weights on a walk of `weights` (`state_dict(keep_vars=True)`, then the buffers it leaves
out, non-persistent ones such as RoPE's `inv_freq`): names, tensor identities, write counters, layouts, a sample of each
tensor. That walk, the per-tensor sampling and the comparison cost about 10 ms of host time on a 7B model's 689
tensors, at the end of every capture block. A `Plan`, built on a full walk, tells in a few flat comparisons that the
same walk would give the same key:

- the structure `state_dict()` and the walk of the buffers it leaves out read, walked afresh from the root, breadth
  first: each module's class, the keys of its `_parameters`, `_buffers` and `_modules` in order, the identity of every
  parameter and buffer, its non-persistent buffer names, no state-dict hooks, the size of its `__dict__` (a method set
  on the instance adds a key), none of `state_dict`, `_save_to_state_dict` and `get_extra_state` set on the instance
  (where an attribute was removed, the size is the same), and no class that changes them. So `state_dict()` would
  give the same names, in the same order, for the same tensor objects, and leave out the same buffers (which of a
  module's `_buffers` it holds, its non-persistent names decide). The plan holds no module, so a kept plan never keeps
  a model alive;
- per tensor, non-persistent buffers included, its write counter (`_version`), its dtype and `is_set_to` an alias
  taken at the walk (same storage, offset, shape and strides): `p.data = other` and `p.data = p.data.t()` change no
  counter but fail `is_set_to`;
- the sample: the same strided views `_sample` gives, taken once of that storage (a view shares it, so a write
  through `.data` shows in it), concatenated once per device and dtype and compared as integers with the kept bytes
  (so NaN equals NaN).

Any difference returns False and the caller takes the full walk, which builds a new plan. No plan is built where the
check could not be trusted: offloaded (meta) or inference tensors (no write counter), a sample that is a copy rather
than a view, state-dict hooks, classes that change what `state_dict()` returns, a `None` submodule. A storage the
module let go of (moved by `.to()`, a replaced parameter) stays referenced by the plan until the next fingerprint
read, `forget` or `release` (which `placement.split` calls)."""
from __future__ import annotations

from itertools import chain, repeat
from operator import attrgetter, contains, is_, itemgetter

import torch
from torch import nn

_MODULES = itemgetter("_modules")  # from a module's __dict__
_FIELDS = itemgetter("_parameters", "_buffers", "_non_persistent_buffers_set", "_state_dict_hooks",
                     "_state_dict_pre_hooks")  # from a module's __dict__
_VERSION, _DTYPE = attrgetter("_version"), attrgetter("dtype")
_METHODS = ("state_dict", "_save_to_state_dict", "get_extra_state")  # what decides `state_dict()`'s contents
_WIDEST = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _as_integers(data: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as the widest integers that tile them (a faster comparison than bytes)."""
    raw = data.reshape(-1).view(torch.uint8)
    width = next(w for w in _WIDEST if raw.numel() % w == 0)
    return raw.view(_WIDEST[width])


def _tree(hf: nn.Module, most: int) -> tuple[list[nn.Module], list[dict], list[dict]] | None:
    """Every module under `hf` breadth first (a module's children follow, in order, those of the module before it),
    their `__dict__`s and `_modules` dicts; None past `most` modules (a cycle)."""
    modules, attributes, children, level = [], [], [], [hf]
    while level:
        found = list(map(vars, level))
        dicts = list(map(_MODULES, found))
        modules += level
        attributes += found
        children += dicts
        if len(modules) > most:
            return None
        level = list(chain.from_iterable(map(dict.values, dicts)))
    return modules, attributes, children


def _picker(indices: list[int]):
    """A function giving the items at `indices` of a sequence, as a tuple."""
    if len(indices) == 1:
        return lambda sequence: (sequence[indices[0]],)
    return itemgetter(*indices) if indices else lambda sequence: ()


def _methods(cls: type) -> tuple:
    return tuple(getattr(cls, name, None) for name in _METHODS)


class Plan:
    """What `unchanged` compares, taken on a full walk (`build`). It holds no module: a kept plan never keeps a model
    alive."""

    def __init__(self, modules: list[nn.Module], attributes: list[dict], children: list[dict],
                 tensors: list[torch.Tensor], views: dict[tuple, list[torch.Tensor]]):
        self.classes = list(map(type, modules))
        self.methods = {cls: _methods(cls) for cls in set(self.classes)}
        self.sizes = list(map(len, attributes))  # a method set on an instance adds a key
        parameters, buffers, skipped, _, _ = zip(*map(_FIELDS, attributes))
        dicts = [*parameters, *buffers, *children]
        self.lengths = list(map(len, dicts))
        # once the lengths are the same, only the dicts that were not empty hold keys and values to compare
        self.filled = _picker([i for i, d in enumerate(dicts) if d])
        self.filled_states = _picker([i for i, d in enumerate(parameters + buffers) if d])
        self.keys = list(chain.from_iterable(self.filled(dicts)))
        self.values = list(chain.from_iterable(map(dict.values, self.filled_states(parameters + buffers))))
        self.skipped = tuple(map(frozenset, skipped))
        self.tensors = tensors
        self.aliases = [t.detach() for t in tensors]
        self.versions = list(map(_VERSION, tensors))
        self.dtypes = list(map(_DTYPE, tensors))
        self.views = views
        self.sampled = {where: _as_integers(torch.cat(parts)) for where, parts in views.items()}

    def uncounted(self) -> bool:
        """True if sampled bytes changed in a storage none of whose tensors has a new write counter or layout since the
        plan was built: a write PyTorch did not count (through `.data`, or memory shared with NumPy). A counted write
        through one of two tensors over one storage (tied weights) is not one."""
        counted = {alias.untyped_storage().data_ptr() for t, alias, version in zip(self.tensors, self.aliases,
                                                                                   self.versions)
                   if t._version != version or not t.is_set_to(alias)}
        for where, parts in self.views.items():
            now, kept, start = torch.cat(parts).reshape(-1).view(torch.uint8), self.sampled[where].view(torch.uint8), 0
            for view in parts:
                end = start + view.numel() * view.element_size()
                uncounted = view.untyped_storage().data_ptr() not in counted
                if uncounted and not torch.equal(now[start:end], kept[start:end]):
                    return True
                start = end
        return False

    def unchanged(self, hf: nn.Module, sampled: bool = True) -> bool:
        """True only if `weights` (`state_dict(keep_vars=True)` and the buffers it leaves out) would give the same names
        and tensor objects, with the same write counters, layouts and sampled bytes (not compared with
        `sampled=False`), as when the plan was built."""
        tree = _tree(hf, len(self.classes))
        if tree is None:
            return False
        modules, attributes, children = tree
        if list(map(type, modules)) != self.classes:
            return False
        if any(self.methods[cls] != _methods(cls) for cls in self.methods):
            return False
        if list(map(len, attributes)) != self.sizes:
            return False
        # a method set on an instance where another attribute was removed leaves the size alone
        if any(any(map(contains, attributes, repeat(name))) for name in _METHODS):
            return False
        parameters, buffers, skipped, hooks, pre_hooks = zip(*map(_FIELDS, attributes))
        if any(hooks) or any(pre_hooks) or skipped != self.skipped:  # a set equals a frozenset of the same names
            return False
        dicts = [*parameters, *buffers, *children]
        if list(map(len, dicts)) != self.lengths or list(chain.from_iterable(self.filled(dicts))) != self.keys:
            return False
        states = self.filled_states(parameters + buffers)
        if not all(map(is_, chain.from_iterable(map(dict.values, states)), self.values)):  # tensors (or None)
            return False
        if list(map(_VERSION, self.tensors)) != self.versions or list(map(_DTYPE, self.tensors)) != self.dtypes:
            return False
        if not all(map(torch.Tensor.is_set_to, self.tensors, self.aliases)):
            return False
        return not sampled or all(torch.equal(_as_integers(torch.cat(parts)), self.sampled[where])
                                  for where, parts in self.views.items())


def build(hf: nn.Module, state: dict, views: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]]) -> Plan | None:
    """A plan for the weights `state` (this walk's `weights`: `state_dict(keep_vars=True)` and the buffers it leaves
    out) and their sample views (per device and dtype, each with its tensor); None where the fast check could not be
    trusted (see the module docstring)."""
    try:
        tree = _tree(hf, 1 << 20)
    except TypeError:  # a None submodule (`vars(None)`): `unchanged` would read it as a change each time
        return None
    if tree is None:
        return None
    reference = _methods(nn.Module)
    for module in tree[0]:
        if module._state_dict_hooks or module._state_dict_pre_hooks or any(name in vars(module) for name in _METHODS):
            return None
        if _methods(type(module)) != reference:
            return None
    tensors = list(state.values())
    if any(t.device.type == "meta" or t.is_inference() for t in tensors):
        return None
    for pairs in views.values():
        for t, view in pairs:  # a copy (a layout `_sample` reads on a grid) would not see later writes
            if view.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                return None
    return Plan(*tree, tensors, {where: [view for _, view in pairs] for where, pairs in views.items()})
