"""Summaries reduced inside the attention call (`capture(..., summaries=...)`) on real models: every summary equals
the same quantity computed from the model's own eager attention (prefill and every generate step), the chunk size
changes nothing, nothing of size queries x keys is kept or computed beyond one chunk, the model is restored."""
import pytest
import torch

import attnscope
from attnscope.core.dispatch import AttentionCall
from attnscope.core.tokens import ROLES
from conftest import eager_attentions

PROMPT = "The capital of France is"
LAYERS, HEADS = [0, 14, 29], [0, 4, 8]


def reference(p: torch.Tensor, roles: list[str], k: int = 5) -> dict:
    """The summaries of rows p [B, h, r, K] whose keys have `roles`, written out by hand."""
    code = torch.tensor([ROLES.index(r) for r in roles])
    mass = torch.stack([p[..., code == i].sum(-1) for i in range(len(ROLES))], -1)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    ctx_keys = torch.tensor([r not in ("generated", "pad") for r in roles])
    new_keys = torch.tensor([r == "generated" for r in roles])
    a_ctx = p[..., ctx_keys].mean(-1)
    a_new = p[..., new_keys].mean(-1) if new_keys.any() else torch.zeros_like(a_ctx)
    lookback = torch.where(a_ctx + a_new > 0, a_ctx / (a_ctx + a_new), torch.ones_like(a_ctx))
    return {"role_mass": mass, "entropy": ent, "lookback": lookback, "top": p.topk(min(k, p.shape[-1]), -1).values}


def assert_matches(rec, ref: dict, probs: torch.Tensor) -> None:
    for name in ("role_mass", "entropy", "lookback"):
        torch.testing.assert_close(getattr(rec, name), ref[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.topk_value, ref["top"], atol=1e-5, rtol=0)
    # the recorded indices are absolute key positions holding those probabilities
    torch.testing.assert_close(probs.gather(-1, rec.topk_index), rec.topk_value, atol=1e-5, rtol=0)


def test_prefill_summaries_equal_eager_and_logits_bit_identical(smollm):
    x = smollm.encode(PROMPT)
    with torch.no_grad():
        plain = smollm(**x).logits
        with attnscope.capture(smollm, layers=LAYERS, heads=HEADS, summaries="all", topk=4) as s:
            captured = smollm(**x).logits
    assert torch.equal(plain, captured)
    assert isinstance(s, attnscope.capture.Summaries)
    eager = eager_attentions(smollm, x)
    roles = s.tokens("text").roles
    for layer in LAYERS:
        p = eager[layer][:, HEADS]
        rec = s.record("text", layer)
        assert rec.heads == HEADS and rec.queries == list(range(len(roles)))
        assert_matches(rec, reference(p, roles, 4), p)
        assert rec.key_count[0, ROLES.index("text")] + rec.key_count[0, ROLES.index("special")] == len(roles)
        torch.testing.assert_close(s.image_ratio("text", layer), torch.zeros(1, 3, len(roles)))
        assert torch.all(s.lookback("text", layer) == 1)  # nothing generated yet


def test_generate_steps_equal_eager_on_the_full_sequence(smollm):
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        plain = smollm.generate(**x, max_new_tokens=6, do_sample=False)
        with attnscope.capture(smollm, layers=LAYERS, queries="last", summaries="all") as s:
            out = smollm.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, out)
    roles = s.tokens("text").roles
    assert roles[n:] == ["generated"] * 5
    eager = eager_attentions(smollm, {"input_ids": out[:, :-1]})
    for layer in LAYERS:
        for step in range(6):
            pos = n - 1 + step
            p = eager[layer][:, :, pos:pos + 1, :pos + 1]
            rec = s.record("text", layer, step=step)
            assert rec.step == step and rec.queries == [pos]
            assert_matches(rec, reference(p, roles[:pos + 1]), p)
        stacked = s.lookback("text", layer, step=None)  # [steps, B, heads]
        assert stacked.shape == (6, 1, 9)
        assert torch.all(stacked[0] == 1) and not torch.all(stacked[1:] == 1)


def test_chunk_size_changes_nothing_and_no_query_by_key_block_is_kept(smollm, monkeypatch):
    x = smollm.encode(" ".join(["Attention is all you need, said the paper, and the field agreed with it."] * 4))
    q = x["input_ids"].shape[1]
    seen = []
    original = AttentionCall.probs_for

    def spy(self, heads, rows, keys=None, chunk=256):
        out = original(self, heads, rows, keys, chunk)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(AttentionCall, "probs_for", spy)
    results = {}
    for chunk in (3, 256):
        seen.clear()
        with torch.no_grad(), attnscope.capture(smollm, layers=[2, 20], summaries="all", chunk=chunk) as s:
            smollm(**x)
        assert seen and max(shape[2] for shape in seen) == min(chunk, q)  # one chunk of rows at a time
        results[chunk] = s
        for layer in (2, 20):
            for name, t in s.record("text", layer).tensors().items():
                assert q not in t.shape[3:], f"{name} {tuple(t.shape)} holds a keys axis"
        assert s.nbytes < 2 * 9 * q * q * 4 / 2  # per row a fixed size, under half the rows of the two layers here
    for layer in (2, 20):
        a, b = results[3].record("text", layer).tensors(), results[256].record("text", layer).tensors()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_model_restored_and_bad_input_refused(smollm):
    hf = smollm.hf
    impl = hf.config._attn_implementation
    x = smollm.encode(PROMPT)
    with pytest.raises(ValueError, match="unknown summaries"):
        attnscope.capture(smollm, summaries=["entropy", "lookback_lens"])
    with pytest.raises(ValueError, match="drop keys="):
        attnscope.capture(smollm, keys="text", summaries="all")
    with pytest.raises(ValueError, match="drop grad=True"):  # was accepted, and the summaries had no gradients
        attnscope.capture(smollm, summaries="all", grad=True)
    with pytest.raises(ValueError, match="drop dtype=torch.float16"):  # was float32, with provenance "float16"
        attnscope.capture(smollm, summaries="all", dtype=torch.float16)
    with pytest.raises(ValueError, match="topk"):
        attnscope.capture(smollm, summaries="topk", topk=0)
    with pytest.raises(ValueError, match="topk"):  # a bool is an int to Python, not a count of keys
        attnscope.capture(smollm, summaries="topk", topk=True)
    with pytest.raises(RuntimeError, match="inside"), attnscope.capture(smollm, layers=[1], summaries="all") as s:
        with torch.no_grad():
            smollm(**x)
        raise RuntimeError("inside")
    assert hf.config._attn_implementation == impl
    with pytest.raises(TypeError, match="kept no rows"):
        s.attention("text", 1)
    with torch.no_grad(), attnscope.capture(smollm, layers=[1], summaries="entropy") as s2:
        smollm(**x)
    with pytest.raises(KeyError, match="not summarised"):
        s2.topk("text", 1)
    with pytest.raises(ValueError, match="save them after the block"):
        attnscope.capture(smollm, summaries="all", out="unused_dir")


def test_rows_batched_at_the_flush_equal_the_per_call_path(smollm, monkeypatch):
    """Decode steps' rows are plain softmax(q k^T): the reducer computes them for every layer at the end of the
    forward (`core.probs.stacked_probs`); forcing the per-call path (`probs_for`) gives the same summaries."""
    from attnscope.capture import summaries
    from attnscope.core import probs

    x = smollm.encode(PROMPT)
    stacked = []
    spy = probs.stacked_probs

    def counted(*args):
        stacked.append(len(args[0]))
        return spy(*args)

    results = []
    for batched in (True, False):
        monkeypatch.setattr(summaries, "stacked_probs", counted)
        if not batched:
            monkeypatch.setattr(summaries, "plain_rows", lambda *args: None)
        stacked.clear()
        with torch.no_grad(), attnscope.capture(smollm, layers=LAYERS, queries="last", summaries="all") as s:
            smollm.generate(**x, max_new_tokens=4, do_sample=False)
        assert (sum(stacked) == 4 * len(LAYERS)) if batched else not stacked  # every step's calls, in one batch each
        assert not batched or max(stacked) == len(LAYERS)
        results.append(s)
    for layer in LAYERS:
        for step in range(4):
            a, b = (r.record("text", layer, step=step).tensors() for r in results)
            assert a.keys() == b.keys()
            for name in a:
                torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_a_batch_of_two_reads_as_each_row_alone(smollm):
    """Batched rows laid out [B, layers x heads x rows, K] at the flush: each batch row's summaries equal those of
    its sequence captured alone (two prompts of the same length, so no padding)."""
    texts = ["The capital of France is", "The largest ocean on Earth"]
    x = smollm.tokenizer(texts, return_tensors="pt")
    assert x["input_ids"].shape[1] == smollm.tokenizer(texts[0], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, layers=LAYERS, queries="last", summaries="all") as both:
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    for row, text in enumerate(texts):
        with torch.no_grad(), attnscope.capture(smollm, layers=LAYERS, queries="last", summaries="all") as one:
            smollm.generate(**smollm.tokenizer(text, return_tensors="pt"), max_new_tokens=3, do_sample=False)
        for layer in LAYERS:
            for step in range(3):
                a, b = both.record("text", layer, step=step).tensors(), one.record("text", layer, step=step).tensors()
                for name in a:
                    torch.testing.assert_close(a[name][row:row + 1], b[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fail_at", [1, 2])  # the call's only block, or its second chunk of rows
def test_a_call_that_raises_leaves_no_record_without_its_rows(smollm, monkeypatch, fail_at):
    """An error inside a call's reduction (out of memory, say) leaves no record of that call, as a capture of rows
    does, instead of one without tensors ("not summarised") or with only its first chunk of rows under every query
    position; the calls before it keep their summaries."""
    x = smollm.encode("The capital of France is a city called")
    calls, probs_for = [], AttentionCall.probs_for

    def failing(self, heads, rows, *args, **kwargs):
        if self.site.layer == 14:
            calls.append(rows)
            if len(calls) == fail_at:
                raise MemoryError("simulated")
        return probs_for(self, heads, rows, *args, **kwargs)

    monkeypatch.setattr(AttentionCall, "probs_for", failing)
    chunk = 256 if fail_at == 1 else 4
    with pytest.raises(MemoryError), torch.no_grad():
        with attnscope.capture(smollm, layers=[0, 14], summaries="all", chunk=chunk) as s:
            smollm(**x)
    assert ("text", 14) not in s.run().records
    rec = s.record("text", 0)
    assert rec.entropy.shape == (1, 9, len(rec.queries)) == (1, 9, x["input_ids"].shape[1])


def test_a_flush_that_raises_leaves_no_record_without_tensors(smollm, monkeypatch):
    """An error while a forward's queue is reduced (out of memory at the flush, say) takes the records it did not
    reduce out of the run, so every record left reads its summaries; a dataset loop that catches the error and goes
    on gets complete runs after it."""
    import attnscope.capture.summaries as summaries

    x = smollm.encode(PROMPT)
    calls, stacked = [], summaries.stacked_probs

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:  # the first decode step's flush
            raise MemoryError("simulated")
        return stacked(*args)

    monkeypatch.setattr(summaries, "stacked_probs", failing)
    with torch.no_grad(), attnscope.capture(smollm, layers=LAYERS, queries="last", summaries="all") as s:
        with pytest.raises(MemoryError):
            smollm.generate(**x, max_new_tokens=3, do_sample=False)
        smollm.generate(**x, max_new_tokens=3, do_sample=False)
    assert len(s.runs) == 2
    failed, ok = s.runs
    assert all(rec.entropy is not None and rec.lookback is not None for run in s.runs
               for recs in run.records.values() for rec in recs)
    assert all([r.step for r in failed.records[("text", layer)]] == [0] for layer in LAYERS)
    assert all([r.step for r in ok.records[("text", layer)]] == [0, 1, 2] for layer in LAYERS)
    assert s.lookback("text", 14, step=None, run=0).shape == (1, 1, 9)


def test_step_none_refused_after_beam_reorders(smollm):
    """Beam search reorders the rows between steps: stacking row b of every step (step=None) would read as one
    sequence's trace but mixes hypotheses, so it is refused; one step at a time still reads."""
    x = smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", summaries="all") as s:
        smollm.generate(**x, max_new_tokens=3, do_sample=False, num_beams=3)
    assert s.run().eras
    for read in (s.lookback, s.entropy, s.key_count, s.role_mass):
        with pytest.raises(ValueError, match="beam search reordered"):
            read("text", 0, step=None)
    assert s.lookback("text", 0, step=2).shape == (3, 9, 1)


def test_topk_without_the_topk_summary_is_refused_and_the_default_works(smollm):
    """topk= sets the keys of the "topk" summary: passed with summaries that leave it out (or with rows) it would be
    ignored without a word. Left at its default, every choice of summaries works."""
    for summaries in ("entropy", ["lookback", "role_mass"]):
        with pytest.raises(ValueError, match=r"add 'topk' to summaries.*or drop topk="):
            attnscope.capture(smollm, layers=[0], summaries=summaries, topk=3)
    with pytest.raises(ValueError, match=r"summaries=.*or drop topk="):
        attnscope.capture(smollm, layers=[0], topk=3)
    x = smollm.encode(PROMPT)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], summaries="entropy") as s:
        smollm(**x)
    assert s.entropy("text", 0).shape[-1] == x["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", summaries="topk") as s:
        smollm(**x)
    index, value = s.topk("text", 0)
    assert index.shape[-1] == value.shape[-1] == 5  # the documented default


def _split_at(monkeypatch, first: int) -> None:
    """The calls of layers >= `first` come from the stand-in second device (tests/other_device.py), as the later
    layers of a model split with accelerate's device_map: their q, k, v and mask live there."""
    from dataclasses import replace

    from attnscope.capture.summaries import Reducer
    from other_device import elsewhere

    record = Reducer.record

    def moved(self, run, call, *args):
        if call.site.layer >= first:
            mask = call.attention_mask
            call = replace(call, query=elsewhere(call.query), key=elsewhere(call.key), value=elsewhere(call.value),
                           attention_mask=None if mask is None else elsewhere(mask))
        return record(self, run, call, *args)

    monkeypatch.setattr(Reducer, "record", moved)


@pytest.mark.parametrize("queries, buffer", [(None, None), (None, 4096), ("last", None)])
def test_summaries_of_a_model_split_over_two_devices_equal_the_unsplit_run(smollm, monkeypatch, queries, buffer):
    """The reducer's queue holds every layer of a step; split over two devices, its batch stacked tensors of both and
    raised. Each device's rows are reduced on that device: the same numbers as the unsplit run (prefill rows, the
    decode steps' plain rows computed at the flush, and a queue flushed mid-forward with a small buffer)."""
    from other_device import second_device

    x = smollm.encode(PROMPT)

    def summarise():
        session = attnscope.capture(smollm, layers=[0, 7, 14, 15, 22, 29], queries=queries, summaries="all")
        if buffer is not None:
            session.reducer.buffer_elements = buffer
        with torch.no_grad(), session as s:
            ids = smollm.generate(**x, max_new_tokens=3, do_sample=False)
        return s, ids

    plain, ids = summarise()
    _split_at(monkeypatch, 15)
    with second_device():
        split, split_ids = summarise()
    assert torch.equal(split_ids, ids)
    assert split.runs[0].records.keys() == plain.runs[0].records.keys()
    for key, records in plain.runs[0].records.items():
        assert [r.step for r in split.runs[0].records[key]] == [r.step for r in records] == [0, 1, 2]
        for a, b in zip(records, split.runs[0].records[key]):
            assert a.tensors().keys() == b.tensors().keys()
            for name, value in a.tensors().items():
                assert type(b.tensors()[name]) is torch.Tensor  # read back on the CPU
                assert torch.equal(b.tensors()[name], value), (key, a.step, name)


def test_the_queue_holds_no_more_memory_than_it_counts(smollm, monkeypatch):
    """A prefill's last row is queued for the flush: what the queued tensors keep alive (their storages, e.g. the
    whole query block a view of the last row would hold) stays within what the queue counts against its 4 MiB."""
    from attnscope.capture.summaries import Reducer

    seen = []
    add = Reducer._add

    def measured(self, item, elements):
        add(self, item, elements)
        storages = {}
        for queued in self._queue:
            for t in (queued[4][:2] if queued[4] is not None else (queued[1],)):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        seen.append((sum(storages.values()), self._queued * 4))

    monkeypatch.setattr(Reducer, "_add", measured)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", summaries="all") as s:
        smollm(**smollm.encode(" ".join(["word"] * 200)))
    assert len(s.run().records) == 30 and len(seen) == 30
    assert all(held <= counted for held, counted in seen), max(seen)
