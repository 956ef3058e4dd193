"""`attnscope.check`: what a researcher runs before trusting attnscope's numbers on a model it has never seen.

    result = attnscope.check(model)          # or: attnscope check MODEL
    print(result); result.ok; result.rows; result.to_markdown()

On a probe (built from the model's tokenizer / processor / config when `inputs` is None), captured rows are compared
with the model's own eager attention for every stream and layer, in a forward and over a greedy generate; token maps
are checked against the keys; strength-0 edits must be the identity bit for bit; the model must be restored exactly.
The package is callable: `attnscope.check(...)` is `attnscope.check.check(...)`."""
from __future__ import annotations

from .._package import make_callable
from .result import FAIL, PASS, REFUSED, CheckResult, Row
from .runner import check


make_callable(__name__, check)

__all__ = ["check", "CheckResult", "Row", "PASS", "FAIL", "REFUSED"]
