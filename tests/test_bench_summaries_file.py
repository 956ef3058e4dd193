"""The summaries-file benchmark's quick mode runs end to end (each file must read back bit for bit before it is
timed, or it raises) and writes its report; no timing is asserted."""
import importlib.util
import json
from pathlib import Path


def test_summaries_file_bench_small(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "summaries_file.py"
    spec = importlib.util.spec_from_file_location("bench_summaries_file", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--small", "--reps", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "summaries_file.json").read_text())
    assert doc["config"]["small"] and len(doc["cases"]) == 2
    for case in doc["cases"].values():
        assert set(case["median_s"]) == set(bench.TIMED) and set(case["ratios"]) == set(bench.RATIOS)
        assert all(q["ratio"] > 0 for q in case["ratios"].values())
        assert case["tensors"]["/2"] <= 30 * 6 < case["tensors"]["/1"]  # packed: per layer and summary
    assert "/1 time over /2 time" in (tmp_path / "summaries_file.md").read_text()
