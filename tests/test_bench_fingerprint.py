"""bench/fingerprint.py times the fingerprint of unchanged weights against the full walk it replaced: in its small
mode (no files) every read it times is answered by the fast check, with the fingerprint the full walk gives."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fingerprint  # noqa: E402


def test_the_small_bench_times_the_fast_check_and_the_walk():
    (result,) = fingerprint.run(small=True).values()
    assert result["tensors"] > 0 and result["sampled elements"] > 0
    assert set(result["ms"]) == {"full walk", "fast check", "its Python part"}
    assert all(ms > 0 for ms in result["ms"].values())
    assert "| speed-up |" in fingerprint.report({"small": result})
