"""A CPU stand-in for "a tensor on another device" (a GPU, or another GPU of a split model), for machines without
one: `OtherDevice` tensors behave as ordinary tensors except that an operation mixing one with an ordinary tensor
of one or more dimensions raises, as CUDA does ("Expected all tensors to be on the same device"); `.cpu()` and
`.to("cpu")` give ordinary tensors back. Zero-dimensional tensors mix freely, as CPU scalars do with CUDA tensors.

`second_device()` makes the stand-in a device of its own (the second device of a split model): its tensors report
`SECOND` as their `.device`, and a tensor made or moved there is one of them."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


class OtherDevice(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        ours = [t for t in tensors if isinstance(t, cls)]
        plain = [t for t in tensors if not isinstance(t, cls) and t.dim() > 0]
        if ours and plain:
            raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__} got a tensor on the "
                               "other device and one on the CPU)")
        to_cpu = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu")
            for a in list(args[1:]) + [kwargs.get("device")] if a is not None))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if to_cpu:
            return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t, out)
        return tree_map(lambda t: t.as_subclass(cls) if isinstance(t, torch.Tensor) and not isinstance(t, cls) else t, out)


def elsewhere(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(OtherDevice)


SECOND = torch.device("cpu", 1)  # an `OtherDevice` tensor's `.device` inside `second_device()`


def _is_second(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value) == SECOND


def _wrap(out):
    moved = lambda t: elsewhere(t) if isinstance(t, torch.Tensor) and not isinstance(t, OtherDevice) else t  # noqa: E731
    return tree_map(moved, out)


class second_device(TorchFunctionMode):
    """Inside this block an `OtherDevice` tensor reports `SECOND` as its `.device`, and a tensor made or moved there
    (`torch.arange(..., device=t.device)`, `x.to(t.device)`, `x.to(t)`) is an `OtherDevice` tensor; mixing still
    raises. Code that groups tensors by `.device`, or makes its tensors on a call's device, then meets the stand-in as
    it would meet a second GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__self__", None) is torch.Tensor.device:  # reading `.device`
            return SECOND if isinstance(args[0], OtherDevice) else func(*args)
        there = _is_second(kwargs.get("device"))
        if there:
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            moved = [a for a in args[1:] if _is_second(a) or isinstance(a, OtherDevice)]
            if moved:
                there = True
                args = (args[0],) + tuple(a.dtype if isinstance(a, OtherDevice) else "cpu" if _is_second(a) else a
                                          for a in args[1:])
        if not there:
            return func(*args, **kwargs)
        if isinstance(args[0] if args else None, OtherDevice):  # already there: its own handler keeps it there
            args = (args[0].as_subclass(torch.Tensor),) + tuple(args[1:])
        return _wrap(func(*args, **kwargs))
