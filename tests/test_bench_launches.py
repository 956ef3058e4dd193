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
    assert 0 < added <= 4 * calls  # a handful per attention call, nothing per token
    base = c["image: plain SDPA, use_cache"]["kernels"]
    assert c["image: FastV K=2 keep 50%"]["kernels"] - base < c["image: FastV K=2 keep 50%, arguments cut per layer"]["kernels"] - base


def test_host_indices_are_counted_as_a_gpu_places_them():
    """On a GPU, `index_on` makes host-built indices on the device (an `arange` for a run, a `_to_copy` otherwise); on
    the CPU it returns them untouched. The counts are a GPU's cost, so they must include those: FastV's per-layer cut
    copies its kept positions at every layer. Capture's last row of every head needs no index at all (a view)."""
    res = launches.run(True, 40, only=ONLY)
    c, calls = res["counts"], res["attention_calls"]["image"]
    added = lambda kernel: (c["image: capture(queries='last')"]["by_kernel"].get(kernel, 0)  # noqa: E731
                            - c["image: plain SDPA"]["by_kernel"].get(kernel, 0))
    assert added("arange") == added("index_select") == 0 and added("bmm") == calls
    per_layer = c["image: FastV K=2 keep 50%, arguments cut per layer"]["copies"]
    shared = c["image: FastV K=2 keep 50%"]["copies"]
    layers_after = res["layers"]["language"] - 3  # the blocks after the pruning layer K=2
    assert per_layer - shared == 3 * layers_after  # cos, sin and position ids: the SDPA mask is None here
