"""Attention knockout (`steer.Knockout`, `attnscope.flow`): the edit equals an independent reference (SmolLM2's own
eager attention with a hand-built 4D mask blocking exactly those query/key pairs in those layers), token sets come
from roles and words, bad input is refused before the model runs, and the model is restored exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.core.dispatch import registered_names
from attnscope.flow import KnockoutCurve, TokenSetError, knockout_curve, token_sets
from attnscope.flow.knockout import window_starts
from attnscope.steer import Knockout, SteerError, steer

PROMPT = "The capital of France is"
MIN = torch.finfo(torch.float32).min


def state(model):
    hf = model.hf
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())
    weights = sum(float(p.detach().double().sum()) for p in hf.parameters())
    return hf.config._attn_implementation, hooks, registered_names(), weights


def eager_knockout_logits(model, inputs, layers, rows, cols):
    """Reference: eager attention whose mask in `layers` is causal and blocks exactly (rows x cols)."""
    hf = model.hf
    L = inputs["input_ids"].shape[1]
    mask = torch.zeros(1, 1, L, L)
    mask.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), MIN)
    mask[0, 0, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = MIN
    fired = []

    def replace(module, args, kwargs):
        assert "attention_mask" in kwargs  # otherwise the reference would silently not block anything
        fired.append(1)
        return args, {**kwargs, "attention_mask": mask}

    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    handles = [hf.get_submodule(s.path).register_forward_pre_hook(replace, with_kwargs=True)
               for s in model.sites.values() if s.layer in layers]
    try:
        with torch.no_grad():
            out = hf(**inputs).logits[0]
    finally:
        for h in handles:
            h.remove()
        hf.set_attn_implementation(before)
    assert len(fired) == len(layers)
    return out


@pytest.mark.parametrize("source, target", [
    (["subject"], ["last"]),  # one row: recomputed explicitly for that row
    (["question"], ["subject"]),
    (["question"], ["subject", "last"]),  # many rows: an additive mask, the backend (SDPA) runs it
])
def test_knockout_equals_eager_with_a_hand_built_mask(smollm, source, target):
    x = smollm.encode(PROMPT, chat=False)
    sets = token_sets(smollm, x, question="capital of France is", subject="France")
    layers = [3, 4, 5]
    cols = sorted(i for name in source for i in sets[name])
    rows = sorted(i for name in target for i in sets[name])
    spec = "last" if target == ["last"] else rows
    with torch.no_grad(), steer(smollm, Knockout(source=cols, target=spec, layers=layers)):
        got = smollm.hf(**x).logits[0]
    want = eager_knockout_logits(smollm, x, layers, rows, cols)
    with torch.no_grad():
        plain = smollm.hf(**x).logits[0]
    assert (want - plain).abs().max() > 1e-2  # the knockout changes the output, so the comparison means something
    assert (got - want).abs().max() < 1e-4  # logits reach ~27: float32 round-off of SDPA vs eager
    assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 1e-5


def test_token_sets_follow_roles_and_words(smollm):
    x = smollm.encode(PROMPT, chat=False)
    sets = token_sets(smollm, x, question="capital of France is", subject="France")
    pieces = smollm.token_maps(x)["text"][0].tokens
    spelled = "".join(smollm.tokenizer.convert_tokens_to_string([pieces[i]]) for i in sets["subject"])
    assert spelled.strip() == "France"
    assert sets["last"] == [len(pieces) - 1]
    flat = [i for v in sets.values() for i in v]
    assert sorted(flat) == list(range(len(pieces)))  # a partition: every position in exactly one set
    with pytest.raises(TokenSetError, match="not in the prompt"):
        token_sets(smollm, x, subject="Germany")


@pytest.mark.parametrize("prompt, subject", [
    ("Столица Франции — Париж. Столица России —", "России"),  # Cyrillic: 2 bytes a letter, split over tokens
    ("日本的首都是东京。中国的首都是", "中国"),  # CJK: 3 bytes a character
    ("The capital of Ελλάδα is", "Ελλάδα"),  # Greek inside an English prompt
], ids=["cyrillic", "cjk", "greek"])
def test_subject_words_in_any_script(smollm, prompt, subject):
    """SmolLM2's byte-level BPE splits these characters' bytes over tokens that alone decode to U+FFFD; the subject
    is found by the characters the tokenizer itself decodes, and its tokens decode back to exactly the word."""
    x = smollm.encode(prompt, chat=False)
    ids = x["input_ids"][0].tolist()
    sets = token_sets(smollm, x, question=prompt, subject=subject)
    found = sets["subject"]
    assert found == list(range(found[0], found[-1] + 1))
    assert smollm.tokenizer.decode([ids[i] for i in found]).strip() == subject
    assert any("\ufffd" in smollm.tokenizer.decode([ids[i]]) for i in found)  # a split character, really
    assert sorted(i for v in sets.values() for i in v) == list(range(len(ids)))  # still a partition
    with pytest.raises(TokenSetError, match="not in the prompt"):
        token_sets(smollm, x, subject=subject[::-1] + "ы")
    curve = knockout_curve(smollm, prompt, subject=subject, chat=False, window=15, stride=15, flows=["subject->last"])
    assert curve.examples[0]["sets"]["subject"] == found and np.isfinite(curve.changes["subject->last"]).all()


def test_cli_flow_takes_a_non_latin_subject(smollm, capsys):
    from attnscope.cli import main

    assert main(["flow", "smollm2-135m", "--text", "Столица Франции — Париж. Столица России —", "--raw-prompt",
                 "--subject", "России", "--source", "subject", "--target", "last", "--window", "30"]) == 0
    assert "| 0-29 |" in capsys.readouterr().out
    assert main(["flow", "smollm2-135m", "--text", "Столица России —", "--raw-prompt", "--subject", "Германии"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not in the prompt" in err[0]


def test_curve_windows_restore_and_round_trip(smollm, tmp_path):
    before = state(smollm)
    curve = knockout_curve(smollm, PROMPT, question="capital of France is", subject="France", answer=" Paris",
                           chat=False, window=10, stride=10)
    assert state(smollm) == before
    assert curve.windows == [(0, 9), (10, 19), (20, 29)]
    assert curve.flows == ["subject->last", "question->last"]
    assert curve.examples[0]["top1"]
    assert np.all(curve.changes["subject->last"] >= -1)
    # the first window's change equals a forward under the same Knockout done by hand
    sets = curve.examples[0]["sets"]
    x = smollm.encode(PROMPT, chat=False)
    with torch.no_grad():
        p0 = float(smollm.hf(**x).logits[0, -1].softmax(-1)[curve.examples[0]["answer_id"]])
        with steer(smollm, Knockout(sets["subject"], "last", range(0, 10))):
            p = float(smollm.hf(**x).logits[0, -1].softmax(-1)[curve.examples[0]["answer_id"]])
    assert curve.changes["subject->last"][0, 0] == pytest.approx((p - p0) / p0, abs=1e-6)
    back = KnockoutCurve.load(curve.save(tmp_path / "c.json"))
    assert back.windows == curve.windows and np.array_equal(back.changes["question->last"], curve.changes["question->last"])
    both = KnockoutCurve.combine([curve, back])
    assert len(both) == 2 and set(both.to_dict()["intervals"]) == set(curve.flows)
    assert curve.save(tmp_path / "c.png").stat().st_size > 1000


def test_window_starts_reach_the_last_layer_for_every_stride():
    for n in (1, 7, 30):
        for window in range(1, n + 1):
            for stride in range(1, n + 2):
                starts = window_starts(n, window, stride)
                steps = [b - a for a, b in zip(starts, starts[1:])]
                assert starts[0] == 0 and starts[-1] + window == n  # first layer to last layer
                assert all(s == stride for s in steps[:-1]) and all(0 < s <= stride for s in steps[-1:])


def test_a_stride_that_does_not_divide_still_knocks_out_the_last_layers(smollm):
    """window 4, stride 5 on 30 layers: the windows 0-3 ... 25-28 leave layer 29 in none; a last window 26-29 is
    added, and its number equals a forward under the same Knockout done by hand."""
    curve = knockout_curve(smollm, PROMPT, question="capital of France is", answer=" Paris", chat=False, window=4,
                           stride=5, flows=["question->last"])
    assert curve.windows == [(0, 3), (5, 8), (10, 13), (15, 18), (20, 23), (25, 28), (26, 29)]
    x = smollm.encode(PROMPT, chat=False)
    question = curve.examples[0]["sets"]["question"]
    tid = curve.examples[0]["answer_id"]
    with torch.no_grad():
        p0 = float(smollm.hf(**x).logits[0, -1].softmax(-1)[tid])
        with steer(smollm, Knockout(question, "last", range(26, 30))):
            p = float(smollm.hf(**x).logits[0, -1].softmax(-1)[tid])
    assert curve.changes["question->last"][0, -1] == pytest.approx((p - p0) / p0, abs=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": 31}, SteerError, "beyond the layer count"),
    ({"window": 0}, SteerError, "at least 1 layer"),
    ({"flows": ["image->last"]}, TokenSetError, "no image tokens"),
    ({"flows": ["nouns->last"]}, TokenSetError, "unknown token set"),
    ({"flows": ["subject->last"]}, TokenSetError, "pass subject="),
    ({"subject": "Berlin"}, TokenSetError, "not in the prompt"),
])
def test_bad_input_is_refused_and_the_model_untouched(smollm, kwargs, error, match):
    before = state(smollm)
    with pytest.raises(error, match=match):
        knockout_curve(smollm, PROMPT, chat=False, **kwargs)
    assert state(smollm) == before


def test_knockout_arguments_are_checked(smollm):
    with pytest.raises(SteerError, match="non-empty source"):
        Knockout([], "last", [1])
    with pytest.raises(SteerError, match="share"):
        Knockout([1, 2], [2, 3], [1])
    with pytest.raises(SteerError, match="needs layers"):
        Knockout("text", "last", [])
    with pytest.raises(SteerError, match="unknown role"):
        Knockout("nouns", "last", [1])
    with pytest.raises(SteerError, match="out of range"):
        Knockout("text", "last", [30]).edits(smollm)


def test_model_restored_when_the_block_raises(smollm):
    before = state(smollm)
    x = smollm.encode(PROMPT, chat=False)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), steer(smollm, Knockout([0, 1], "last", range(2, 6))):
            smollm.hf(**x)
            raise RuntimeError("boom")
    assert state(smollm) == before


def test_cli_gives_one_error_line_and_runs(smollm, capsys, tmp_path):
    from attnscope.cli import main

    for argv, match in ((["--window", "31"], "beyond the layer count"),
                        (["--source", "image", "--target", "last"], "no image tokens"),
                        (["--source", "nouns", "--target", "last"], "unknown token set"),
                        (["--source", "subject"], "together")):
        assert main(["flow", "smollm2-135m", "--text", PROMPT, "--raw-prompt", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and match in err[0]
    out = tmp_path / "c.json"
    assert main(["flow", "smollm2-135m", "--text", PROMPT, "--raw-prompt", "--subject", "France", "--source", "subject",
                 "--target", "last", "--window", "15", "--stride", "15", "--out", str(out)]) == 0
    assert "| 15-29 |" in capsys.readouterr().out
    assert KnockoutCurve.load(out).flows == ["subject->last"]


def test_a_role_source_never_takes_a_target_row_its_own_key(smollm):
    """source "text" holds the last position too: the last row keeps its own key, so blocking "text -> last" equals
    blocking every other position by number (and stays finite)."""
    x = smollm.encode(PROMPT, chat=False)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        with steer(smollm, Knockout("text", "last", range(4, 8))):
            by_role = smollm.hf(**x).logits[0, -1]
        with steer(smollm, Knockout(list(range(n - 1)), "last", range(4, 8))):
            by_position = smollm.hf(**x).logits[0, -1]
    assert torch.isfinite(by_role).all() and torch.equal(by_role, by_position)
