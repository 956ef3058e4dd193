"""Numbers a user can read: a faithfulness result prints a short table (direction, random baseline, verdict, the
normalisation, a note when an AUC leaves [0, 1]) with the curves on request; bootstrap intervals over too few
resampling units come with a warning, in the API and as one `warning:` line from `attnscope eval`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from attnscope.evaluate.bootstrap import FewUnitsWarning, bootstrap
from attnscope.evaluate.faithfulness import BETTER, Curve, FaithfulnessResult
from attnscope.explain import explain


def result_with(deletion: float, deletion_random: float, insertion: float, insertion_random: float) -> FaithfulnessResult:
    f = [0.0, 0.5, 1.0]
    c = lambda auc: Curve(f, [1.0, 0.5, 0.0], [1.0, 0.5, 0.0], auc)  # noqa: E731
    return FaithfulnessResult({"deletion": c(deletion), "insertion": c(insertion)},
                              {"deletion": c(deletion_random), "insertion": c(insertion_random)},
                              clean=2.0, removed=1.9, units=196, baseline="deletion=mean,insertion=blur", steps=2)


def test_faithfulness_prints_a_short_table_with_direction_and_random(dinov2):
    e = explain(dinov2, image="chelsea", method="gradattn")
    res = e.faithfulness(steps=4)
    text = repr(res)
    assert len(text) < 900 and text == str(res) == res.table()
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.split()[0] in BETTER}
    assert set(lines) == {"deletion", "insertion", "negative"}
    summary = res.summary()
    for name, line in lines.items():
        assert f"{summary[name]:7.3f}" in line and f"{summary[name + '_random']:7.3f}" in line
        assert f"({BETTER[name]} is better)" in line
        beats = summary[name] < summary[name + "_random"] if BETTER[name] == "lower" else summary[name] > summary[name + "_random"]
        assert ("does not beat random" not in line) == beats
    assert "(f - f_removed) / (f_clean - f_removed)" in text
    assert len(res.curves["deletion"].normalised) == 5  # the curves are still there on request


def test_faithfulness_verdict_and_out_of_range_note():
    good = result_with(0.2, 0.5, 0.8, 0.5)
    assert "deletion" in good.table() and good.table().count(" beats random") == 2 and "left [0, 1]" not in good.table()
    bad = result_with(4.99, 0.5, -0.78, 0.5)
    text = bad.table()
    assert text.count("does not beat random") == 2
    assert "deletion, insertion left [0, 1]" in text and "span f_clean - f_removed = 0.1" in text


def test_bootstrap_warns_about_too_few_units():
    items = [1.0, 0.0] * 10
    with pytest.warns(FewUnitsWarning, match="only 2 image"):
        bootstrap(items, np.mean, groups=["a", "b"] * 10, n=50, unit="image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bootstrap(items, np.mean, n=50)  # 20 independent items: no warning


def test_eval_pope_warns_once_per_message(capsys):
    from attnscope.cli import main

    assert main(["eval", "pope", "--n", "4", "--split", "random", "--boot", "50", "--new-tokens", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warn = [line for line in err if line.startswith("warning:")]
    assert len(warn) == 1 and "bootstrapped over only" in warn[0] and "image" in warn[0]
