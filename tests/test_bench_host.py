"""bench/host.py in its small mode (the tiny structure, 2 rounds, no files): every configuration runs, the capture
rows record the last row of every attention call, and the report states the command that gives it."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import host  # noqa: E402


def test_the_small_bench_runs_every_configuration(tmp_path):
    res = host.run(small=True, n_rounds=2)
    assert set(res["ratios"]) == {name for name, _, _ in host.PAIRS}
    assert all(r["ratio"] > 0 for r in res["ratios"].values()) and res["fingerprint_ms"] > 0
    assert res["records"]["text: capture(queries='last')"] == res["attention_calls"]["text"]
    assert res["records"]["image: capture(queries='last')"] == res["attention_calls"]["image"]
    host.report(res, tmp_path / "host.md")
    text = (tmp_path / "host.md").read_text()
    assert "Command: `python bench/host.py --rounds 2`" in text and "(fingerprint apart)" in text
