"""What to capture: streams, layers, heads, and query/key positions by index or token role."""
from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..core.sites import Site
from ..core.tokens import TokenMap

Positions = None | int | slice | str | list  # None = all; str = a role or "last"; list of ints or roles


def _as_list(value, n: int, what: str) -> list[int]:
    """Resolve an int / list / slice / None against range(n), with negative indices; raise if out of range."""
    if value is None or isinstance(value, str) and value == "all":
        return list(range(n))
    if isinstance(value, str):
        raise TypeError(f"{what}: expected an int, a list of ints, a slice, None or 'all'; got the string {value!r}")
    if isinstance(value, Mapping) or isinstance(value, bool):  # list() of a dict is its keys, True is 1: wrong silently
        raise TypeError(f"{what}: expected an int, a list of ints, a slice, None or 'all'; got {value!r}"
                        + (" (a dict is taken by layers= only, as {stream: layers}; heads= applies to every "
                           "selected layer: capture the layers that need other heads in another block)"
                           if isinstance(value, Mapping) else ""))
    if isinstance(value, slice):
        return list(range(n))[value]
    if not isinstance(value, (int, Iterable)):
        raise TypeError(f"{what}: expected an int, a list of ints, a slice, None or 'all'; got {value!r} "
                        f"({type(value).__name__})")
    items = [value] if isinstance(value, int) else list(value)
    out = []
    for i in items:
        if not isinstance(i, int) or isinstance(i, bool):  # True is 1, np.int64(0) is no int: named, not "out of range"
            other = hasattr(i, "__index__") and not isinstance(i, bool)  # a NumPy or torch integer
            raise TypeError(f"{what} {i!r} is a {type(i).__name__}, not an int: give plain ints"
                            + (" (int(i) of a NumPy or torch integer)" if other else ""))
        if not -n <= i < n:
            raise IndexError(f"{what} {i!r} is out of range: there are {n} (use 0..{n - 1} or negative indices)")
        out.append(i % n)
    return sorted(set(out))


def _index(bound):
    """A slice bound as a plain int where it is an integer of another kind (np.int64, a 0-d integer tensor: indexing
    takes them as Python's ints): the slice is recorded in the provenance, which a file must give back as itself."""
    if bound is None or isinstance(bound, int) and not isinstance(bound, bool) or not hasattr(bound, "__index__"):
        return bound
    try:
        return operator.index(bound)
    except TypeError:
        return bound


def listed(value):
    """`value` with every iterable but a str or dict made a list, once (a tuple, range, set or generator): a generator
    would be spent by the first layer that reads it, and a trace file stores JSON, where only a list comes back as
    itself (`Selection.to_dict` is the trace's provenance). A set becomes a sorted list; a dict keeps its keys and has
    its values listed; anything else is left for the checks to name."""
    if isinstance(value, slice):
        return slice(_index(value.start), _index(value.stop), _index(value.step))
    if value is None or isinstance(value, (str, int, list)):
        return value
    if isinstance(value, Mapping):
        return {k: listed(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):  # ints, then role names: one order in every process (str hashes vary)
        try:
            return sorted(value, key=lambda v: (isinstance(v, str), v))
        except TypeError:
            return list(value)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        return list(value)
    return value


@dataclass
class Selection:
    """What to capture (or edit). Tuples, ranges, sets and generators are kept as lists (`listed`), so `to_dict` holds
    only what a trace file gives back as itself."""

    streams: str | list[str] | None = None
    layers: int | list[int] | slice | dict | None = None
    heads: int | list[int] | slice | None = None
    queries: Positions = None
    keys: Positions = None

    def __post_init__(self) -> None:
        for name in ("streams", "layers", "heads", "queries", "keys"):
            setattr(self, name, listed(getattr(self, name)))

    def sites(self, sites: dict) -> dict:
        """The selected subset of a module→Site map, validating every part of the selection."""
        streams: dict[str, int] = {}
        for site in sites.values():
            streams[site.stream] = max(streams.get(site.stream, 0), site.layer + 1)
        wanted = list(streams) if self.streams is None else [self.streams] if isinstance(self.streams, str) else list(self.streams)
        unknown = [s for s in wanted if s not in streams]
        if unknown:
            raise ValueError(f"unknown stream(s) {unknown}; this model has {sorted(streams)}")
        if isinstance(self.layers, dict):  # {stream: layers}: another key would select nothing, without a word
            unknown = [s for s in self.layers if s not in streams]
            if unknown:
                per_layer = any(isinstance(s, int) for s in unknown)  # {layer: heads} is not a form capture takes
                raise ValueError(f"layers= as a dict maps a stream name to its layers ({{stream: layers}}); "
                                 f"{unknown} {'is not a stream' if len(unknown) == 1 else 'are not streams'} of this "
                                 f"model, which has {sorted(streams)}" + (
                                     ". heads= applies to every selected layer: capture the layers that need other "
                                     "heads in another block" if per_layer else ""))
        layers = {}
        for stream in wanted:
            spec = self.layers.get(stream) if isinstance(self.layers, dict) else self.layers
            if isinstance(self.layers, dict) and stream not in self.layers:
                continue
            layers[stream] = set(_as_list(spec, streams[stream], f"layer of stream '{stream}'"))
        chosen = {m: s for m, s in sites.items() if s.stream in layers and s.layer in layers[s.stream]}
        for site in chosen.values():
            if not self.head_indices(site):  # an empty list (or a spent generator) failed inside the forward
                raise ValueError(f"heads={self.heads!r} selects no head of {site.stream} layer {site.layer}: name at "
                                 "least one head, or leave heads=None for all")
        self._check_positions(self.queries, "queries")
        self._check_positions(self.keys, "keys")
        return chosen

    def head_indices(self, site: Site) -> list[int]:
        return _as_list(self.heads, site.num_heads, f"head of {site.stream} layer {site.layer}")

    @staticmethod
    def _check_positions(value, what: str) -> None:
        # a bool is an int (True would select position 1) and list() of a dict is its keys (taken as role names): both
        # were captured as something else without a word
        if isinstance(value, (bool, Mapping)) or not (value is None or isinstance(value, (str, int, slice, list, tuple))):
            raise TypeError(f"{what}= takes None, an int, a role name, a slice or a list of ints and role names; got "
                            f"{value!r:.80} ({type(value).__name__})"
                            + (" (a dict is taken by layers= only, as {stream: layers})" if isinstance(value, Mapping)
                               else ""))
        items = [value] if isinstance(value, (str, int)) else value if isinstance(value, (list, tuple)) else []
        for item in items:
            if isinstance(item, str):
                TokenMap.unknown(0).positions(item)  # raises on an unknown role
            elif not isinstance(item, int) or isinstance(item, bool):
                raise TypeError(f"{what} entries must be ints or role names; got {item!r} ({type(item).__name__})")

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, slice):
                return {"slice": [v.start, v.stop, v.step]}
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {k: plain(getattr(self, k)) for k in ("streams", "layers", "heads", "queries", "keys")}


def resolve_positions(spec: Positions, tmaps: list[TokenMap] | None, length: int, what: str) -> list[int] | None:
    """Absolute positions in a sequence of `length` chosen by `spec`; None means all.

    Role names need token maps; with a batch, every row must give the same positions."""
    if spec is None:
        return None
    if isinstance(spec, slice):
        return list(range(length))[spec]
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    out: set[int] = set()
    for item in items:
        if isinstance(item, int):
            if -length <= item < length:
                out.add(item % length)
            continue
        if item == "last":
            out.add(length - 1)
            continue
        if not tmaps:
            raise ValueError(f"{what}={item!r} needs token roles, which this input has none of; select by index instead")
        per_row = [tuple(p for p in t.positions(item) if p < length) for t in tmaps]
        if len(set(per_row)) > 1:
            raise ValueError(f"{what}={item!r} falls on different positions across the batch; capture rows one at a time or select by index")
        out.update(per_row[0])
    return sorted(out)
