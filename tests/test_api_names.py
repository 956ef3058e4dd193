"""Public names: `attnscope.explain`, `attnscope.steer`, `attnscope.capture` and `attnscope.check` are their packages
and are callable (no function shadows a subpackage); every steering method documents itself in its own class
docstring (paper, parameters, errors), which `help()` and the viewer's form show."""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import types

import pytest
import torch

import attnscope


@pytest.mark.parametrize("name, member", [("explain", "METHODS"), ("steer", "PAI"), ("capture", "Trace"), ("check", "CheckResult"),
                                          ("ground", "Grounding")])
def test_packages_are_reachable_and_callable(name, member):
    package = importlib.import_module(f"attnscope.{name}")
    assert getattr(attnscope, name) is package is sys.modules[f"attnscope.{name}"]
    assert isinstance(package, types.ModuleType) and callable(package)
    assert hasattr(package, member)
    alias = importlib.import_module(f"attnscope.{name}")  # what `import attnscope.<name> as x` binds
    assert getattr(alias, member) is getattr(package, member)
    assert inspect.signature(package) == inspect.signature(getattr(package, name))


def test_calling_the_packages_does_what_the_functions_do(minilm):
    x = minilm.encode("The cat sat on the mat.")
    a = attnscope.explain(minilm, x, method="raw", layer=-1)
    b = attnscope.explain.explain(minilm, x, method="raw", layer=-1)
    assert torch.equal(a.scores, b.scores)
    with torch.no_grad(), attnscope.capture(minilm, layers=[0]) as t1:
        minilm(**x)
    with torch.no_grad(), attnscope.capture.capture(minilm, layers=[0]) as t2:
        minilm(**x)
    assert torch.equal(t1.attention("text", 0), t2.attention("text", 0))
    with attnscope.steer(minilm, attnscope.steer.HeadMask("0.1")) as session:
        assert isinstance(session, attnscope.steer.steer)


def test_every_steering_method_documents_itself():
    from attnscope.steer import METHODS
    from attnscope.steer.methods._base import Method
    from attnscope.viz.integrations import steer_methods

    shown = steer_methods()
    for name, cls in METHODS.items():
        doc = cls.__doc__
        assert doc and doc != Method.__doc__, name  # help(cls) shows the class, not the base
        assert re.search(r"\(\w[\w .,&-]*\d{4}\)|\d{4}\)", doc), f"{name}: no paper and year"
        params = [p for p in inspect.signature(cls).parameters]
        for p in params:
            assert p in doc, f"{name}: parameter {p!r} undocumented"
        assert "SteerError" in doc, f"{name}: errors undocumented"
        if name in shown:  # the viewer's form shows the class's own summary, whole
            summary = " ".join(doc.strip().split("\n\n")[0].split())
            assert shown[name]["doc"] == summary and summary.endswith((".", ")"))
