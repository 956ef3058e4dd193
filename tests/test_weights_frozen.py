"""`Model.frozen_weights()` (SmolLM2): inside, a fingerprint read (every capture block's end) skips the sampled-bytes
copy but still follows every write PyTorch counts; the full check at the block's end turns a write it could not see
(through `.data`) into `WeightsChangedError`, or a warning where the block raised; after the block the fingerprint is
the bytes' own again."""
from __future__ import annotations

import threading

import pytest
import torch
from test_weights_fingerprint import fresh_hash

import attnscope
from attnscope.models import fingerprint as fp
from attnscope.models import fingerprint_plan


@pytest.fixture
def sample_reads(monkeypatch):
    """Counts the fingerprint reads that compared the sampled bytes."""
    calls = []
    real = fingerprint_plan.Plan.unchanged

    def counted(self, hf, sampled=True):
        calls.append(sampled)
        return real(self, hf, sampled)

    monkeypatch.setattr(fingerprint_plan.Plan, "unchanged", counted)
    return calls


def _column(model):
    return model.hf.model.layers[3].mlp.down_proj.weight


def test_reads_inside_skip_the_sample_and_captures_carry_the_fingerprint(smollm, sample_reads):
    before = smollm.fingerprint
    x = smollm.encode("the cat sat on the mat")
    with smollm.frozen_weights() as digest:
        assert digest == before == fresh_hash(smollm)
        sample_reads.clear()
        for _ in range(2):
            with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as trace:
                smollm(**x)
            assert trace.provenance["weights"] == digest
        assert sample_reads == [False, False]  # one read per capture block, neither copied the sample
    assert sample_reads[-1] is True  # the full check at the end
    assert smollm.fingerprint == before


def _inv_freq(model):
    return model.hf.model.rotary_emb.inv_freq  # a non-persistent buffer: not in state_dict()


@pytest.mark.parametrize("tensor", [_column, _inv_freq])
def test_a_counted_write_inside_is_seen_at_once(smollm, tensor):
    weight = tensor(smollm)
    saved = weight.detach().clone()
    before = smollm.fingerprint
    try:
        with smollm.frozen_weights():
            with torch.no_grad():
                weight.mul_(2.0)  # counted by PyTorch (_version)
            assert smollm.fingerprint != before and smollm.fingerprint == fresh_hash(smollm)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert smollm.fingerprint == before == fresh_hash(smollm)


def test_a_write_through_data_inside_raises_at_the_end(smollm):
    weight = _column(smollm)
    saved = weight.detach()[:, 5].clone()
    before = smollm.fingerprint
    try:
        with pytest.raises(fp.WeightsChangedError, match="frozen_weights"):
            with smollm.frozen_weights():
                weight.data[:, 5] = 0.0  # not counted: the reads inside cannot see it
                assert smollm.fingerprint == before
        assert smollm.fingerprint != before and smollm.fingerprint == fresh_hash(smollm)  # the bytes' own after
    finally:
        weight.data[:, 5] = saved
    assert smollm.fingerprint == before


def test_a_write_through_data_to_a_non_persistent_buffer_inside_raises_at_the_end(smollm):
    """RoPE's `inv_freq` halved through `.data` (a context-extension experiment) inside the block."""
    inv_freq = _inv_freq(smollm)
    saved = inv_freq.detach().clone()
    before = smollm.fingerprint
    try:
        with pytest.raises(fp.WeightsChangedError, match="frozen_weights"):
            with smollm.frozen_weights():
                inv_freq.data.mul_(0.5)
                assert smollm.fingerprint == before  # not counted: the reads inside cannot see it
        assert smollm.fingerprint != before and smollm.fingerprint == fresh_hash(smollm)
    finally:
        inv_freq.data.copy_(saved)
    assert smollm.fingerprint == before


def test_a_block_that_raises_keeps_its_error_and_warns(smollm):
    weight = _column(smollm)
    saved = weight.detach()[:, 7].clone()
    try:
        with pytest.warns(UserWarning, match="frozen_weights"), pytest.raises(KeyError, match="own error"):
            with smollm.frozen_weights():
                weight.data[:, 7] = 0.0
                raise KeyError("own error")
    finally:
        weight.data[:, 7] = saved
    assert not fp._FROZEN.get(smollm.hf) and smollm.fingerprint == fresh_hash(smollm)


def test_a_block_that_raises_keeps_its_error_when_warnings_are_errors(smollm):
    """Under `simplefilter("error")` the warning would replace the block's own error: the error goes on, and carries
    the message as a note."""
    import warnings

    weight = _column(smollm)
    saved = weight.detach()[:, 7].clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(KeyError, match="own error") as raised:
                with smollm.frozen_weights():
                    weight.data[:, 7] = 0.0
                    raise KeyError("own error")
    finally:
        weight.data[:, 7] = saved
    assert any("frozen_weights" in note for note in raised.value.__notes__)
    assert not fp._FROZEN.get(smollm.hf) and smollm.fingerprint == fresh_hash(smollm)


def test_nested_blocks_check_at_the_outermost_ends_only(smollm, sample_reads):
    smollm.fingerprint
    with smollm.frozen_weights() as outer:
        sample_reads.clear()
        with smollm.frozen_weights() as inner:
            assert inner == outer
        assert fp._frozen_here(smollm.hf) == 1 and True not in sample_reads
    assert not fp._FROZEN.get(smollm.hf) and sample_reads[-1] is True


def test_a_counted_write_after_the_last_read_inside_is_no_error(smollm):
    weight = _column(smollm)
    saved = weight.detach().clone()
    try:
        with smollm.frozen_weights():
            smollm.fingerprint
            with torch.no_grad():
                weight.mul_(2.0)  # an optimizer step's kind of write, counted; no read follows it inside
        assert smollm.fingerprint == fresh_hash(smollm)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_a_stale_read_is_reported_even_when_a_later_counted_write_takes_the_full_walk(smollm):
    weight, other = _column(smollm), smollm.hf.model.layers[4].mlp.down_proj.weight
    saved, saved_other = weight.detach()[:, 5].clone(), other.detach().clone()
    try:
        with pytest.raises(fp.WeightsChangedError, match="frozen_weights"):
            with smollm.frozen_weights():
                weight.data[:, 5] = 0.0
                assert smollm.fingerprint != fresh_hash(smollm)  # the documented gap: this read is stale
                with torch.no_grad():
                    other.mul_(2.0)  # counted: the next read walks in full and is right again
                assert smollm.fingerprint == fresh_hash(smollm)
    finally:
        weight.data[:, 5] = saved
        with torch.no_grad():
            other.copy_(saved_other)
    assert smollm.fingerprint == fresh_hash(smollm) and not fp._UNCOUNTED.get(smollm.hf)


def test_two_parameters_over_one_storage_a_counted_write_through_either_is_no_error():
    shared = torch.randn(64, 32)
    module = torch.nn.Module()
    module.a, module.b = torch.nn.Parameter(shared), torch.nn.Parameter(shared)
    with fp.frozen(module):
        fp.fingerprint(module)
        with torch.no_grad():
            module.b.mul_(2.0)  # counted on b only: the storage a's sample reads is b's
    assert fp.fingerprint(module) == fp.weights_hash(module, module.state_dict())
    with pytest.raises(fp.WeightsChangedError):
        with fp.frozen(module):
            fp.fingerprint(module)
            module.b.data[3] = 0.0  # uncounted, through the name that is not sampled
    assert fp.fingerprint(module) == fp.weights_hash(module, module.state_dict())


def test_another_threads_reads_compare_the_sample_while_a_block_is_open(smollm):
    weight = _column(smollm)
    saved = weight.detach()[:, 9].clone()
    smollm.fingerprint
    opened, release, seen = threading.Event(), threading.Event(), []

    def frozen_elsewhere():
        try:
            with smollm.frozen_weights():
                opened.set()
                release.wait(30)
        except fp.WeightsChangedError:
            seen.append("raised")

    worker = threading.Thread(target=frozen_elsewhere)
    worker.start()
    try:
        assert opened.wait(30)
        weight.data[:, 9] = 0.0  # this thread is in no frozen block: its read must see the write
        assert smollm.fingerprint == fresh_hash(smollm)
    finally:
        release.set()
        worker.join()
        weight.data[:, 9] = saved
    assert seen == ["raised"] and not fp._FROZEN.get(smollm.hf) and smollm.fingerprint == fresh_hash(smollm)
