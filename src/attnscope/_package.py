"""Callable subpackages: `attnscope.capture(...)`, `attnscope.explain(...)`, `attnscope.steer(...)` and
`attnscope.check(...)` call the package's main function, while `import attnscope.steer as st; st.PAI` still
reaches the package itself (no function shadows a subpackage)."""
from __future__ import annotations

import inspect
import sys
import types


class _CallablePackage(types.ModuleType):
    """A package module whose call forwards to its `__call_target__`."""

    def __call__(self, *args, **kwargs):
        return self.__call_target__(*args, **kwargs)


def make_callable(name: str, target) -> None:
    """Make the package `name` (pass `__name__`) callable as `target`, with `target`'s signature for help()."""
    module = sys.modules[name]
    module.__call_target__ = target
    module.__signature__ = inspect.signature(target)
    module.__class__ = _CallablePackage
