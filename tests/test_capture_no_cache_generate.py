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
    with pytest.warns(UserWarning, match="not those of generate") as caught:
        with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
            smollm(input_ids=ids)
            smollm(input_ids=longer)
    assert caught[0].filename == __file__  # the user's call, not torch's module call that ran the hook
    assert "generated" not in trace.tokens("text", run=1).roles
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]):  # a cached generation: no warning
            smollm.generate(**smollm.encode(PROMPT), max_new_tokens=2, do_sample=False)
            smollm(input_ids=longer)


def test_a_chain_of_no_cache_forwards_does_not_cross_a_generate_call(smollm):
    """The tokens after the prompt are generated only within one generate call: a prompt that happens to extend the
    last forward of the block by one token (a prefix scored by hand, another generate call on a prefix, a call on
    the last one's output) keeps its prompt labels, as the same call with a cache gives."""
    ids = smollm.encode(PROMPT)["input_ids"]
    n = ids.shape[1]
    ones = torch.ones_like(ids)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        smollm(input_ids=ids[:, :-1])  # the prefix, by hand
        smollm.generate(input_ids=ids, attention_mask=ones, max_new_tokens=2, do_sample=False, use_cache=False)
    assert trace.tokens("text", run=1).roles == ["text"] * n
    assert trace.tokens("text", run=2).roles == ["text"] * n + ["generated"]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        for end in (n - 2, n - 1, n):  # each prefix of the prompt, one token longer than the last
            smollm.generate(input_ids=ids[:, :end], attention_mask=ones[:, :end], max_new_tokens=1, do_sample=False,
                            use_cache=False)
    assert [trace.tokens("text", run=k).roles for k in range(3)] == [["text"] * e for e in (n - 2, n - 1, n)]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        out = smollm.generate(input_ids=ids, attention_mask=ones, max_new_tokens=2, do_sample=False, use_cache=False)
        smollm.generate(input_ids=out, attention_mask=torch.ones_like(out), max_new_tokens=2, do_sample=False,
                        use_cache=False)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as cached:
        smollm.generate(input_ids=out, attention_mask=torch.ones_like(out), max_new_tokens=2, do_sample=False)
    assert len(trace.runs) == 4
    assert trace.tokens("text", run=2).roles == cached.tokens("text").roles[:n + 2] == ["text"] * (n + 2)
    assert trace.tokens("text", run=3).roles == cached.tokens("text").roles == ["text"] * (n + 2) + ["generated"]


def test_the_generated_rows_are_selected_by_role_during_generate(smollm):
    """queries="generated" raised at the prefill (no generated token yet) as if it selected nothing; now the decode
    steps' rows are captured, equal to the last rows, and a forward with nothing generated still says so."""
    x = smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, queries="generated", layers=[2]) as picked:
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[2]) as last:
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    got = [r for r in picked.run().records[("text", 2)]]
    assert [r.step for r in got] == [1, 2]
    for rec in got:
        ref = last.record("text", 2, step=rec.step)
        assert rec.queries == ref.queries and torch.equal(rec.probs, ref.probs)
    with pytest.raises(ValueError, match="empty trace"):
        with torch.no_grad(), attnscope.capture(smollm, queries="generated", layers=[2]):
            smollm(**x)
