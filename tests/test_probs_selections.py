"""Every way of naming heads and rows gives the same probabilities (SmolLM2's attention modules): a `RowRun` and
the index tensor of the same rows, `heads=None` and every head's index, through `attention_probs` and through
`AttentionCall.probs_for` (recomputed, edited `probs`, edited `patches`), bit for bit; a run outside the call's
queries is refused."""
from __future__ import annotations

import pytest
import torch

from attnscope.core.dispatch import AttentionCall
from attnscope.core.probs import RowRun, attention_probs


@pytest.fixture(scope="module")
def call(smollm):
    """One real attention call of SmolLM2's layer 3, captured from a forward (q and k after RoPE, its mask)."""
    seen = {}
    module = smollm.hf.model.layers[3].self_attn
    from attnscope.core import dispatch

    class Keep(dispatch.Handler):
        def observe(self, c, output):
            seen["call"] = c

    site = next(s for m, s in smollm.sites.items() if m is module)
    attachment = dispatch.attach(smollm.hf, {module: (site, Keep())})
    try:
        ids = smollm.tokenizer("The cat sat on the mat because it was warm there.", return_tensors="pt")
        with torch.no_grad():
            smollm.hf(**ids)
    finally:
        attachment.detach()
    return seen["call"]


def _fresh(c: AttentionCall, **changes) -> AttentionCall:
    return AttentionCall(c.site, c.module, c.query, c.key, c.value, c.attention_mask, c.kwargs, **changes)


def test_row_run_equals_the_index_of_the_same_rows(call):
    q_len = call.query.shape[2]
    for start, n in [(q_len - 1, 1), (0, q_len), (2, 5)]:
        by_run = attention_probs(call.module, call.query, call.key, call.attention_mask, call.kwargs,
                                 rows=RowRun(start, n), chunk=3)
        by_index = attention_probs(call.module, call.query, call.key, call.attention_mask, call.kwargs,
                                   rows=torch.arange(start, start + n), chunk=3)
        assert torch.equal(by_run, by_index)
        torch.testing.assert_close(by_run.sum(-1), torch.ones_like(by_run[..., 0]), atol=1e-5, rtol=0)


def test_row_run_of_a_list():
    assert RowRun.of([4, 5, 6]) == (4, 3)
    assert RowRun.of([7]) == (7, 1)
    for not_a_run in ([], [0, 2], [0, 2, 1, 3], [3, 2]):
        assert RowRun.of(not_a_run) is None


@pytest.mark.parametrize("start,n", [(-1, 2), (0, 0), (10, 100)])
def test_a_run_outside_the_queries_is_refused(call, start, n):
    with pytest.raises(IndexError, match="not within this call's"):
        attention_probs(call.module, call.query, call.key, call.attention_mask, call.kwargs, rows=RowRun(start, n))


def test_probs_for_every_form_agrees(call):
    n_heads, q_len = call.query.shape[1], call.query.shape[2]
    every_head, rows = torch.arange(n_heads), torch.arange(q_len - 4, q_len)
    run = RowRun(q_len - 4, 4)
    plain = _fresh(call)
    reference = plain.probs_for(every_head, rows)
    assert torch.equal(plain.probs_for(None, run), reference)
    # an edit that computed the probabilities itself: its values are returned, whatever the form of the selection
    edited = reference.new_zeros(reference.shape[0], n_heads, q_len, reference.shape[-1])
    edited[:, :, q_len - 4:] = reference.flip(-1)
    with_probs = _fresh(call, probs=edited)
    assert torch.equal(with_probs.probs_for(None, run), reference.flip(-1))
    assert torch.equal(with_probs.probs_for(every_head, rows), reference.flip(-1))
    # an edit that patched two heads of one row: those entries replaced, the rest recomputed
    heads, patch_rows = torch.tensor([1, 4]), torch.tensor([q_len - 1])
    where = torch.ones(1, 2, 1, dtype=torch.bool)
    patch = torch.full((1, 2, 1, reference.shape[-1]), 0.5)
    patched = _fresh(call, patches=[(heads, patch_rows, where, patch)])
    by_run, by_index = patched.probs_for(None, run), patched.probs_for(every_head, rows)
    assert torch.equal(by_run, by_index)
    assert torch.equal(by_run[:, heads, -1], patch[:, :, 0])
    untouched = torch.ones(n_heads, dtype=torch.bool)
    untouched[heads] = False
    assert torch.equal(by_run[:, untouched], reference[:, untouched])
