"""bench/stream.py --small runs end to end (CI): the results files are written and hold what the report needs;
its value check (streamed trace read back from disk vs eager output_attentions) holds at layer 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stream_bench_small(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stream.py"), "--small", "--threads", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "stream-small.json").read_text())
    assert (tmp_path / "stream-small.md").read_text().startswith("# Full matrices streamed")
    (n, cells), = res["memory"].items()
    assert "peak_increase_kb" in cells["eager+oa"] and "peak_increase_kb" in cells["stream fp16"], cells
    assert cells["stream fp16"]["stored_bytes"] > 0
    assert set(res["time"][n]["vs_eager"]) == {"sdpa", "eager+oa", "eager+oa+save", "stream fp32", "stream fp16"}
    assert res["values"]["stream fp32"]["layer0"] < 1e-5  # same q and k as eager at layer 0
    assert res["values"]["stream fp16"]["all_layers"] < 2e-3
