"""bench/launches.py counts the operators of a prefill on the LLaVA structure: the counts it reports must not depend on
the prompt's length (that is what makes them a structure's cost), and FastV's shared cut must add fewer kernels than
cutting at every layer."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import launches  # noqa: E402

ONLY = ["image: plain SDPA", "image: capture(queries='last')", "image: plain SDPA, use_cache",
        "image: FastV K=2 keep 50%", "image: FastV K=2 keep 50%, arguments cut per layer"]


def test_counts_are_the_same_at_two_prompt_lengths():
    short, long = (launches.run(True, n, only=ONLY) for n in (40, 90))
    for name in ONLY:
        a, b = short["counts"][name], long["counts"][name]
        assert (a["kernels"], a["copies"], a["reads"]) == (b["kernels"], b["copies"], b["reads"]), name
    c = short["counts"]
    calls = short["attention_calls"]["image"]
    added = c["image: capture(queries='last')"]["kernels"] - c["image: plain SDPA"]["kernels"]
    assert 0 < added <= 5 * calls + 2  # a handful per attention call, nothing per token
    base = c["image: plain SDPA, use_cache"]["kernels"]
    assert c["image: FastV K=2 keep 50%"]["kernels"] - base < c["image: FastV K=2 keep 50%, arguments cut per layer"]["kernels"] - base
