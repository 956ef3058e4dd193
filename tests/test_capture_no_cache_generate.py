"""generate(use_cache=False) runs the whole sequence at every step, so each step is a run of its own: the tokens
after the prompt are labelled "generated" in those runs (the text role builder read them as text, so the lookback
ratio was 1 at every step), and the per-run readers equal those of the cached generation at the same step; the same
ids fed by hand keep the prompt's labels, with a warning."""
import warnings

import pytest
import torch

import attnscope

PROMPT = "The capital of France is"


def test_no_cache_steps_label_the_generated_tokens_and_agree_with_the_cached_run(smollm):
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[3], summaries="all") as plain:
        smollm.generate(**x, max_new_tokens=3, do_sample=False, use_cache=False)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[3], summaries="all") as cached:
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    assert len(plain.runs) == 3 and len(cached.runs) == 1
    for k in range(3):
        roles = plain.tokens("text", run=k).roles
        assert roles[:n] == cached.tokens("text").roles[:n] and roles[n:] == ["generated"] * k
        look = plain.lookback("text", 3, step=0, run=k)
        ref = cached.lookback("text", 3, step=k)
        torch.testing.assert_close(look, ref, atol=1e-5, rtol=1e-5)
        if k:
            assert (look < 1).any()  # generated keys are seen: not 1 by definition


def test_beam_search_without_a_cache_labels_every_row(smollm):
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        smollm.generate(**x, max_new_tokens=3, do_sample=False, num_beams=2, use_cache=False)
    last = trace.run(-1)
    for b, tmap in enumerate(last.tokens["text"]):
        assert tmap.roles[n:] == ["generated"] * (len(tmap) - n), b
        assert "generated" not in tmap.roles[:n]


def test_the_same_ids_fed_by_hand_keep_the_prompts_labels_and_warn(smollm):
    ids = smollm.encode(PROMPT)["input_ids"]
    longer = torch.cat([ids, ids[:, -1:]], 1)
    with pytest.warns(UserWarning, match="not those of generate"):
        with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
            smollm(input_ids=ids)
            smollm(input_ids=longer)
    assert "generated" not in trace.tokens("text", run=1).roles
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]):  # a cached generation: no warning
            smollm.generate(**smollm.encode(PROMPT), max_new_tokens=2, do_sample=False)
            smollm(input_ids=longer)
