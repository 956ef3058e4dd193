"""`attnscope.capture`: record attention probabilities inside a `with` block into a `Trace`.

    with attnscope.capture(model, streams="text", layers=[0, -1], queries="last") as trace:
        model(**inputs)

The package is callable: `attnscope.capture(...)` is `attnscope.capture.capture(...)` (the context manager in
`session.py`), and `import attnscope.capture as cap` gives the package (`cap.Trace`, `cap.Selection`, ...)."""
from __future__ import annotations

from .._package import make_callable
from .selection import Selection
from .session import capture
from .summaries import SUMMARIES, Summaries, SummaryRecord
from .trace import Record, Run, Trace, TraceFileError


make_callable(__name__, capture)

__all__ = ["capture", "Trace", "Run", "Record", "TraceFileError", "Selection", "Summaries", "SummaryRecord", "SUMMARIES"]
