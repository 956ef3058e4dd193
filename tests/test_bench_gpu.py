"""The GPU benchmark (bench/gpu.py) runs its whole code path on the CPU with tiny dimensions (`--small --run DIR`):
its captured last rows equal eager's, FastV keeps the expected cache lengths, and the split model (CPU + disk) equals
the unsplit one in every check. The report renders from the JSON a run writes. No timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_small_run_and_report(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--run", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    for row in res["growth"].values():
        assert row["values"]["last_vs_eager_max_abs"] < 1e-5 and row["values"]["rowsum_err"] < 1e-5
    assert res["exact"]["last_vs_eager_max_abs"] < 1e-5
    for row in res["fastv"].values():
        for check in row["checks"].values():
            assert check["cache_len_layers_2_on"] == [check["expected_2_on"]]
            assert check["cache_len_layers_0_1"] == [row["tokens"]] * 2
    host = res["host"]["host_bench"]  # bench/host.py's captures recorded one row per attention call
    assert host["records"] == {f"{k}: capture(queries='last')": n for k, n in host["attention_calls"].items()}
    assert res["host"]["fingerprint_s"] > 0 and res["host"]["tensors"] > 0
    split = res["split"]
    assert {"cpu", "disk"} <= set(split["devices"])
    assert split["capture_roles_equal"] and split["fastv_kept_equal"] and split["vcd_tokens_equal"]
    assert max(split[k] for k in ("capture_max_abs", "fastv_logits_max_abs", "vcd_logits_max_abs",
                                  "explain_scores_max_abs")) == 0.0  # the same CPU kernels: bit for bit
    for row in res["growth"].values():  # the report reads peak memory, which only a CUDA run measures
        row["peak_bytes"], row["peak_ratio"] = {"plain": 1, "last": 1}, 1.0
    for row in res["fastv"].values():
        row["peak_bytes"] = {k: 1 for k in row["median_s"]}
    (tmp_path / "in.json").write_text(json.dumps(res))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--report", str(tmp_path / "in.json"),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "gpu.md").read_text()
    assert all(f"| {t} |" in md for t in res["growth"]) and "FastV K=2 keep 50%" in md and "explain scores" in md
    assert "Host costs on this machine" in md
    assert (out / "gpu.png").stat().st_size > 1000


def test_profile_counts_each_kernel_once():
    """bench/profile_gpu.py's GPU time per call: the kernels' own rows, not also the operators that launched them (an
    aten::mm row repeats its kernels' device time; summing every row doubled the time, as in
    results/gpu-profile-before-read-fix.txt: 247.6 ms printed for 371.4 ms of kernels over 3 calls)."""
    from types import SimpleNamespace

    from bench_modules import load
    from torch.autograd import DeviceType

    rows = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=207999.0),  # aten::mm
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=112583.0),  # its kernels
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=95416.0),
            SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0)]  # cudaLaunchKernel
    assert abs(load("profile_gpu").kernel_ms(rows, 3) - (112583.0 + 95416.0) / 3 / 1e3) < 1e-9
