"""The summaries benchmark's quick mode runs end to end (the answers under capture must equal the uncaptured ones,
or it raises) and writes its report; no timing is asserted."""
import importlib.util
import json
from pathlib import Path

import pytest


def test_summaries_bench_small(tmp_path):
    pytest.importorskip("attnscope.models.scene_vlm")
    path = Path(__file__).resolve().parents[1] / "bench" / "summaries.py"
    spec = importlib.util.spec_from_file_location("bench_summaries", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        assert bench.main(["--small", "--n", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
    except FileNotFoundError as err:  # scene-vlm's weights are not here
        pytest.skip(str(err))
    doc = json.loads((tmp_path / "summaries.json").read_text())
    assert set(doc["timing"]) == set(bench.TIMED) and doc["config"]["small"]
    assert all(row["ratio"] > 0 for row in doc["timing"].values())
    assert "time ratio" in (tmp_path / "summaries.md").read_text()
