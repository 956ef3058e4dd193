"""`python bench/flow.py --small` (what CI runs) writes its report, data and figure, with the papers' claims
checked against the numbers it measured."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flow.py"


def test_small_bench_writes_report_json_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_flow", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--small", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "flow-small.json").read_text())
    assert doc["small"] and len(doc["verdicts"]) >= 4
    for key in ("scene_vlm", "smollm2"):
        curve = doc[key]["curve"]
        assert curve["windows"] == [[0, 14], [15, 29]]
        assert doc[key]["kept"] == len(curve["base"]) > 0
        for flow in curve["flows"]:
            assert all(-1 <= v for row in curve["changes"][flow] for v in row)  # a probability stays >= 0
    text = (tmp_path / "flow-small.md").read_text()
    assert "not for quoting" in text and "| layers |" in text
    assert (tmp_path / "flow-small.png").stat().st_size > 10_000
