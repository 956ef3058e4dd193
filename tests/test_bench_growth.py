"""The growth benchmark's small mode (bench/growth.py --small) runs end to end: one command writes the report,
the JSON and the plot, and its captured last rows equal eager's own last rows. No timing is asserted (a timed test
would fail on a busy machine, not on a regression); the peak-memory subprocesses are left out to keep it fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_growth_small_mode_writes_report_json_and_plot(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "growth.py"), "--small", "--lengths", "24",
                           "--threads", "1", "--skip-mem", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "growth-small.json").read_text())
    row = res["lengths"]["24"]
    assert row["values"]["layers"] == 30 and row["values"]["heads"] == 9
    assert row["values"]["last_vs_eager"] < 1e-4 and row["values"]["rowsum_err"] < 1e-5
    assert row["values"]["stored_bytes"] == 30 * 9 * 24 * 4  # one float32 row of 24 keys per layer and head
    assert len(row["time"]["ratios"]) == 3 and all(r > 0 for r in row["time"]["ratios"])
    assert (tmp_path / "growth-small.png").stat().st_size > 1000
    report = (tmp_path / "growth-small.md").read_text()
    assert "| 24 |" in report and "not measured" in report
