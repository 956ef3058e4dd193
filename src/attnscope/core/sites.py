"""The map of attention sites: which modules call the attention function, and their (stream, layer).

Vision modules carry no `layer_idx`, so the map is built once, by module path, when a model is wrapped."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from . import seam


class NoAttentionError(RuntimeError):
    """A model with no module that routes attention through transformers' AttentionInterface."""


@dataclass(frozen=True)
class Site:
    """One attention module: its path, stream, layer within the stream, and head counts."""

    path: str
    stream: str
    layer: int
    num_heads: int
    num_kv_heads: int


def _routes_through_interface(module: nn.Module) -> bool:
    modeling = sys.modules.get(type(module).__module__)
    return (
        type(module).__name__.endswith("Attention")
        and modeling is not None
        and seam.uses_attention_interface(modeling)
        and hasattr(module, "config")
    )


def _head_counts(module: nn.Module) -> tuple[int, int]:
    config = module.config
    heads = None
    for owner, name in ((module, "num_heads"), (module, "num_attention_heads"), (config, "num_attention_heads"),
                        (config, "num_heads"), (config, "n_head")):
        heads = getattr(owner, name, None)
        if isinstance(heads, int):
            break
    if not isinstance(heads, int):
        raise NoAttentionError(f"cannot read the head count of {type(module).__name__}; pass `attention_modules=`")
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    return heads, int(kv)


def find_sites(model: nn.Module, streams: dict[str, str], attention_modules: list[str] | None = None,
               cross: tuple[str, ...] = ()) -> dict[nn.Module, Site]:
    """Map each attention module of `model` to its Site.

    `streams` maps a module-path prefix to a stream name (longest prefix wins; "" matches everything).
    `attention_modules`, when given, lists the module paths to use instead of the automatic search
    (innermost modules of a class named *Attention in a modeling file that uses the AttentionInterface).
    Modules whose own name is in `cross` (an encoder-decoder's cross-attention) form the stream "cross"."""
    named = dict(model.named_modules())
    if attention_modules is not None:
        missing = [p for p in attention_modules if p not in named]
        if missing:
            raise NoAttentionError(f"no modules at {missing}; names look like {list(named)[1:4]}")
        paths = list(attention_modules)
    else:
        candidates = [p for p, m in named.items() if _routes_through_interface(m)]
        paths = [p for p in candidates if not any(c.startswith(p + ".") for c in candidates)]
    if not paths:
        raise NoAttentionError(
            f"{type(model).__name__} has no module that calls transformers' AttentionInterface; "
            "pass `attention_modules=[...]` with the paths of its attention modules, or load a transformers>=5 "
            "model class that uses the attention interface"
        )
    prefixes = sorted(streams, key=len, reverse=True)
    counters: dict[str, int] = {}
    sites = {}
    for path in paths:
        prefix = next((p for p in prefixes if p == "" or path == p or path.startswith(p + ".")), None)
        if prefix is None:
            continue
        stream = "cross" if path.rsplit(".", 1)[-1] in cross else streams[prefix]
        layer = counters.get(stream, 0)
        counters[stream] = layer + 1
        heads, kv = _head_counts(named[path])
        sites[named[path]] = Site(path, stream, layer, heads, kv)
    return sites
