"""Code of bench/ that tests share with the benchmarks, loaded by path (bench/ is a folder of scripts, not a package):
`eager_anchor`, the anchors' way of editing attention, and `var_last_row`, VAR's rule on its weights
(bench/anchors.py): the independent reference of the steering tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """bench/<name>.py as the module `bench_<name>` (loaded once)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


eager_anchor, var_last_row = load("anchors").eager_anchor, load("anchors").var_last_row
