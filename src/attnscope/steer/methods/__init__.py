"""Paper methods, one file each, composed from `steer.edits` primitives; `parse("pai:alpha=0.2")` builds one
from a CLI string."""
from __future__ import annotations

from ..edits import SteerError
from .decore import DeCoRe
from ._base import generate_kwargs
from .fastv import FastV, FastVRerank
from .head_scale import HeadMask
from .imbalance import ImbalanceFix
from .knockout import Knockout
from .m3id import M3ID
from .pai import PAI
from .pyramiddrop import PyramidDrop
from .ritual import RITUAL
from .schedule import KeepSchedule
from .var import VAR
from .vcd import VCD
from .vhr import VHR
from .vtc_cls import VTCCLS

METHODS = {cls.name: cls for cls in (PAI, VAR, VHR, ImbalanceFix, HeadMask, DeCoRe, VCD, M3ID, RITUAL, FastV, FastVRerank,
                                      PyramidDrop, VTCCLS, KeepSchedule, Knockout)}


SYNTAX = ("values as on the command line: numbers, true/false, none; a position 3 or -1 (the last, as in Python); "
          "positions 0/5/9 or [0, 5, 9]; a range 2:30 (end excluded); roles by name (image, text, last, ...); "
          "heads as layer.head joined by + (3.1+5.2)")


def value(key: str, text: str):
    """One parameter from its text (`SYNTAX`): what `parse` and the viewer's steering form use."""
    text = text.strip()
    if key == "heads" and "." in text and not text.startswith("["):
        return text  # layer.head pairs ("3.10" is head 10 of layer 3, never the float 3.1)
    if text.startswith("["):
        import json

        try:
            return json.loads(text)
        except ValueError as err:
            raise SteerError(f"{key}={text!r} is not a list such as [0, 5, 9]") from err
    return _value(text)


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if ":" in text and all(p.strip().lstrip("-").isdigit() or not p.strip() for p in text.split(":")):
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        return slice(*parts)
    if "/" in text:  # a list of ints or roles: 0/5/9 or text/generated
        return [_value(p) for p in text.split("/") if p]
    return text


def parse(spec: str):
    """A method from "name" or "name:key=value,key=value" (lists with '/', ranges as 2:30, heads as 3.1+5.2)."""
    name, _, rest = spec.strip().partition(":")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise SteerError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    kwargs = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = part.partition("=")
        if not eq:
            raise SteerError(f"method parameters are key=value; got {part!r} in {spec!r}")
        kwargs[key.strip()] = value(key.strip(), text)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise SteerError(f"{cls.__name__}: {err}") from err


__all__ = ["METHODS", "parse", "value", "SYNTAX", "generate_kwargs", "PAI", "VAR", "VHR", "ImbalanceFix", "HeadMask", "DeCoRe",
           "VCD", "M3ID", "RITUAL", "FastV", "FastVRerank", "PyramidDrop", "VTCCLS", "KeepSchedule", "Knockout"]
