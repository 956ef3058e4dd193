"""`attnscope.capture`: record attention probabilities inside a `with` block into a `Trace`.

    with attnscope.capture(model, streams="text", layers=[0, -1], queries="last") as trace:
        model(**inputs)

The package is callable: `attnscope.capture(...)` is `attnscope.capture.capture(...)` (the context manager in
`session.py`), and `import attnscope.capture as cap` gives the package (`cap.Trace`, `cap.Selection`, ...)."""
from __future__ import annotations

import inspect
import sys
import types

from .selection import Selection
from .session import capture
from .trace import Record, Run, Trace, TraceFileError


class _Package(types.ModuleType):
    """Calling the package opens a capture block (see the module docstring)."""

    def __call__(self, model, *args, **kwargs) -> capture:
        return capture(model, *args, **kwargs)


__signature__ = inspect.signature(capture)
sys.modules[__name__].__class__ = _Package

__all__ = ["capture", "Trace", "Run", "Record", "TraceFileError", "Selection"]
