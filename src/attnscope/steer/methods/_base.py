"""What every method shares: a name for the CLI, its hyper-parameters, and `edits(model)`."""
from __future__ import annotations

import operator

from ..edits import SteerError, lm_stream


class Method:
    """A paper's method as a plain object: `edits(model)` returns the primitives it is made of (validated), so it
    can be passed to `attnscope.steer` or built from a CLI string (`pai:alpha=0.2`)."""

    name = "method"
    paper = ""
    generate_kwargs: dict = {}  # what `generate` must be called with for this method (FastVRerank: no KV cache)

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def edits(self, model) -> list:
        raise NotImplementedError

    def _tag(self, edits: list) -> list:
        for e in edits:
            e.method = type(self).__name__
        return edits


def generate_kwargs(items) -> dict:
    """The `generate` keyword arguments the given methods need (merged; conflicting values raise SteerError)."""
    out: dict = {}
    for item in items or ():
        for key, value in getattr(item, "generate_kwargs", {}).items():
            if key in out and out[key] != value:
                raise SteerError(f"the methods need conflicting generate arguments: {key}={out[key]!r} and {value!r}")
            out[key] = value
    return out


def default_layers(model, stream: str | None, layers, start: int = 0, end: int | None = None) -> list[int]:
    """`layers` as given, or start..end of the stream (negative end counts from the top)."""
    stream = stream or lm_stream(model)
    n = model.streams.get(stream)
    if n is None:
        raise SteerError(f"unknown stream {stream!r}; this model has {sorted(model.streams)}")
    if layers is None:
        stop = n if end is None else (end if end >= 0 else n + end)
        out = list(range(min(start, n), max(min(stop, n), 0)))
        if not out:
            raise SteerError(f"the default layers {start}..{stop - 1} do not exist in stream '{stream}' ({n} layers); "
                             "pass layers=... explicitly")
        return out
    if isinstance(layers, bool):  # an int in Python: True would be layer 1
        raise SteerError(f"layers must be ints, a range or a slice; got {layers!r}")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, (slice, range)):
        layers = list(range(n))[layers] if isinstance(layers, slice) else list(layers)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):  # int(20.7) would be layer 20, without a word
            raise SteerError(f"layer {layer!r} is not an int (stream '{stream}' has layers 0..{n - 1})")
        layer = operator.index(layer)
        if not -n <= layer < n:
            raise SteerError(f"layer {layer} is out of range: stream '{stream}' has {n} layers (0..{n - 1})")
        out.append(layer % n)
    return sorted(set(out))


def parse_heads(spec) -> list[tuple[int, int]]:
    """[(layer, head)] from a list of pairs or a string "3.1+5.2" (layer.head joined by '+')."""
    if spec is None:
        return []
    if isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split("+"):
            if not part:
                continue
            try:
                layer, head = part.split(".")
                out.append((int(layer), int(head)))
            except ValueError as err:
                raise SteerError(f"heads are written layer.head joined by '+', e.g. 3.1+5.2; got {part!r}") from err
        return out
    return [(int(a), int(b)) for a, b in spec]
