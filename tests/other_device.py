"""A CPU stand-in for "a tensor on another device" (a GPU, or another GPU of a split model), for machines without
one: `OtherDevice` tensors behave as ordinary tensors except that an operation mixing one with an ordinary tensor
of one or more dimensions raises, as CUDA does ("Expected all tensors to be on the same device"); `.cpu()` and
`.to("cpu")` give ordinary tensors back. Zero-dimensional tensors mix freely, as CPU scalars do with CUDA tensors."""
from __future__ import annotations

import torch
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
