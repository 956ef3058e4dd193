"""The weights fingerprint follows the weights (SmolLM2): a write in place (under no_grad, through `.data`, by
`load_state_dict`, by an optimizer step) or a replaced parameter gives a new fingerprint, in `Model.fingerprint` and
in the provenance of the next trace; undoing the write gives the first one back. Unchanged weights are not hashed
again (not by a capture block, a steer block (no steering method writes weights), a forward, or wrapping the module
again), and their kept fingerprint equals a hash of the bytes computed afresh."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import attnscope
from attnscope.models import fingerprint as fp
from attnscope.steer import HeadMask, steer


def fresh_hash(model) -> str:
    """An independent reference: every byte hashed now, nothing kept."""
    return fp.weights_hash(model.hf, fp.weights(model.hf))


@pytest.fixture
def hashes(monkeypatch):
    """Counts the full hashes `Model.fingerprint` computes."""
    calls = []
    real = fp.weights_hash

    def counted(hf, state):
        calls.append(1)
        return real(hf, state)

    monkeypatch.setattr(fp, "weights_hash", counted)
    return calls


def _norm(model):
    return model.hf.model.norm.weight


def _no_grad_mul(model):
    with torch.no_grad():
        _norm(model).mul_(2.0)


def _data_add(model):
    _norm(model).data.add_(1.0)  # `.data` has a write counter of its own: PyTorch does not count this write


def _load_state_dict(model):
    model.hf.model.norm.load_state_dict({"weight": _norm(model).detach() * 3.0})


def _optimizer_step(model):
    weight = model.hf.model.layers[0].self_attn.q_proj.weight
    opt = torch.optim.SGD([weight], lr=1.0)
    (weight.float() ** 2).sum().backward()
    opt.step()
    weight.grad = None


def _replace_parameter(model):
    norm = model.hf.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach() + 1.0)


@pytest.mark.parametrize("write", [_no_grad_mul, _data_add, _load_state_dict, _optimizer_step, _replace_parameter])
def test_a_write_to_the_weights_changes_the_fingerprint_and_undoing_it_restores_it(smollm, write):
    x = smollm.encode("The capital of France is")
    before = smollm.fingerprint  # equal to a fresh hash: test_unchanged_weights_are_not_hashed_again
    saved = {name: t.detach().clone() for name, t in smollm.hf.state_dict().items()}
    norm, weight = smollm.hf.model.norm, _norm(smollm)
    try:
        write(smollm)
        changed = smollm.fingerprint  # a hash of the bytes as they are now (the same function as fresh_hash)
        assert changed != before
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as trace:
            smollm(**x)
        assert trace.provenance["weights"] == changed
    finally:
        norm.weight = weight  # the same Parameter objects, the saved values
        with torch.no_grad():
            for name, t in smollm.hf.state_dict(keep_vars=True).items():
                t.copy_(saved[name])
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as trace:
        smollm(**x)
    assert trace.provenance["weights"] == before == smollm.fingerprint


def test_unchanged_weights_are_not_hashed_again(smollm, hashes):
    x = smollm.encode("The capital of France is")
    first = smollm.fingerprint
    calls = len(hashes)
    with torch.no_grad():
        for _ in range(2):
            with attnscope.capture(smollm, layers="all", queries="last") as trace:
                smollm.generate(**x, max_new_tokens=2, do_sample=False)
            assert trace.provenance["weights"] == first
        with steer(smollm, HeadMask("0.1+3.2")):  # steering edits attention outputs, never the weights
            smollm(**x)
        with attnscope.capture(smollm, layers=[0], summaries="all") as s:
            smollm(**x)
    assert s.provenance["weights"] == first
    assert len(hashes) == calls  # four fingerprints read, no byte hashed again
    assert smollm.fingerprint == first == fresh_hash(smollm)


def test_refresh_hashes_again_and_agrees(smollm, hashes):
    first = smollm.fingerprint
    calls = len(hashes)
    assert smollm.refresh_fingerprint() == first and len(hashes) == calls + 1


def test_the_key_reads_a_sample_of_each_tensor(smollm):
    state = fp.weights(smollm.hf)
    sampled = sum(v.numel() for v in fp.weights_key(state)[1].values())  # bytes
    lines = sum(t.shape[0] + t[0].numel() if t.dim() > 1 else 1 for t in state.values())  # rows and columns
    element = next(smollm.hf.parameters()).element_size()
    assert sampled <= (len(state) * 2 * fp.SAMPLE + 2 * lines) * element  # SAMPLE, or a row's or column's one each
    assert sampled < sum(t.numel() * t.element_size() for t in state.values()) / 100


def test_a_model_wrapped_again_is_not_hashed_again(smollm, hashes):
    """`capture(hf_model)` wraps the module anew each time; the hash is kept per module, not per wrapper."""
    first = smollm.fingerprint
    calls = len(hashes)
    assert attnscope.wrap(smollm.hf).fingerprint == first and len(hashes) == calls


def _down_proj_neuron(model):
    return model.hf.model.layers[3].mlp.down_proj.weight, (slice(None), 7)  # MLP neuron 7's output weights


def _embedding_dimension(model):
    return model.hf.get_input_embeddings().weight, (slice(None), 5)  # dimension 5 of every token's embedding


def _token_row(model):
    return model.hf.get_input_embeddings().weight, 1234


@pytest.mark.parametrize("where", [_down_proj_neuron, _embedding_dimension, _token_row])
def test_a_row_or_column_written_through_data_is_seen(smollm, where):
    """Writes PyTorch does not count (`.data`) of one row or one column of a matrix: zeroing an MLP neuron's column of
    its down projection (neuron ablation) or one embedding dimension left every sampled element alone when the sample
    held one element per row at fixed columns, and the trace kept the old fingerprint. Every row and every column of
    a matrix holds a sampled element."""
    weight, index = where(smollm)
    before = smollm.fingerprint
    saved = weight.detach()[index].clone()
    try:
        weight.data[index] = 0.0
        assert smollm.fingerprint != before
        assert smollm.fingerprint == fresh_hash(smollm)
    finally:
        weight.data[index] = saved
    assert smollm.fingerprint == before


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_every_row_and_column_of_a_permuted_layout_is_sampled(layout):
    """A conv weight in channels_last (`model.to(memory_format=torch.channels_last)`) or a transposed matrix is not
    contiguous; it was sampled on a coarse grid that missed most output channels (one written through `.data` went
    unseen). It is read in memory order, as a contiguous tensor is: every output channel / row and column holds a
    sampled element."""
    if layout == "channels_last":
        t = torch.arange(384 * 3 * 14 * 14, dtype=torch.float64).reshape(384, 3, 14, 14)
        t = t.contiguous(memory_format=torch.channels_last)
        first, rest = 384, 3 * 14 * 14
    else:
        t = torch.arange(300 * 700, dtype=torch.float64).reshape(300, 700).t()  # [700, 300] with strides (1, 700)
        first, rest = 300, 700
    assert not t.is_contiguous()
    index = fp._sample(t).long()  # the values are the elements' positions in the unpermuted tensor
    assert len(set((index // rest).tolist())) == first and len(set((index % rest).tolist())) == rest


def test_a_tied_tensor_is_sampled_once_and_keyed_under_each_name(smollm):
    """SmolLM2's LM head is its token embedding: both names stay in the key (with the tensor's identity, counter and
    layout each), its rows are sampled once, and the plan's sample is smaller by exactly one embedding sample."""
    state = fp.weights(smollm.hf)
    embedding = smollm.hf.get_input_embeddings().weight
    tied = [name for name, t in state.items() if t is embedding]
    assert len(tied) == 2
    (entries, _), views = fp._walk(state)
    assert [e[0] for e in entries] == list(state) and all(e[1] == id(embedding) for e in entries if e[0] in tied)
    sampled = [t for pairs in views.values() for t, _ in pairs]
    assert sum(t is embedding for t in sampled) == 1 and len(sampled) == len(state) - 1
    smollm.fingerprint
    plan = fp._KEPT[smollm.hf].plan
    per_name = sum(fp._sample(t.detach()).numel() for t in state.values())
    sampled_bytes = sum(s.numel() * s.element_size() for s in plan.sampled.values())  # float32 weights: 4 bytes each
    assert sampled_bytes == 4 * (per_name - fp._sample(embedding.detach()).numel())


def _lm_head_row(model):
    return model.hf.lm_head.weight, 4321


def _embedding_column_by_its_other_name(model):
    return model.hf.get_input_embeddings().weight, (slice(None), 300)


@pytest.mark.parametrize("where", [_lm_head_row, _embedding_column_by_its_other_name])
def test_a_write_to_a_tied_tensor_is_seen_under_either_name(smollm, where):
    """A row written through the LM head's `.data`, or a column through the embedding's: the one sample of the tied
    tensor sees both."""
    weight, index = where(smollm)
    assert smollm.hf.lm_head.weight is smollm.hf.get_input_embeddings().weight
    before = smollm.fingerprint
    saved = weight.detach()[index].clone()
    try:
        weight.data[index] = 0.0
        assert smollm.fingerprint != before and smollm.fingerprint == fresh_hash(smollm)
    finally:
        weight.data[index] = saved
    assert smollm.fingerprint == before


def _rotary(model):
    return model.hf.model.rotary_emb


def _inv_freq_no_grad_mul(model):
    with torch.no_grad():
        _rotary(model).inv_freq.mul_(0.5)  # counted: a context-extension experiment's edit of RoPE


def _inv_freq_data_mul(model):
    _rotary(model).inv_freq.data.mul_(0.5)  # not counted: the sample sees it


def _inv_freq_replaced(model):
    rotary = _rotary(model)
    rotary.inv_freq = rotary.inv_freq * 0.5  # another tensor in `_buffers`, still non-persistent


@pytest.mark.parametrize("edit", [_inv_freq_no_grad_mul, _inv_freq_data_mul, _inv_freq_replaced])
def test_an_edit_to_a_non_persistent_buffer_changes_the_fingerprint_and_undoing_it_restores_it(smollm, edit):
    """RoPE's `inv_freq` is not in `state_dict()` (a non-persistent buffer), yet an edit of it changes what the model
    computes: the fingerprint, and the provenance of the next trace, follow it as they follow a parameter."""
    rotary = _rotary(smollm)
    assert "model.rotary_emb.inv_freq" not in smollm.hf.state_dict()
    x = smollm.encode("The capital of France is")
    before = smollm.fingerprint
    buffer, saved = rotary.inv_freq, rotary.inv_freq.detach().clone()
    with torch.no_grad():
        logits = smollm(**x).logits
    try:
        edit(smollm)
        with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as trace:
            edited = smollm(**x).logits
        assert not torch.equal(edited, logits)  # the model computes something else
        assert trace.provenance["weights"] == smollm.fingerprint != before
        assert smollm.fingerprint == fresh_hash(smollm)
    finally:
        rotary.inv_freq = buffer
        with torch.no_grad():
            buffer.copy_(saved)
    assert torch.equal(rotary.inv_freq, saved) and smollm.fingerprint == before


def test_every_buffer_is_covered_under_names_apart_from_the_state_dicts(smollm, hashes):
    """`weights`: the `state_dict()`, then the buffers `named_buffers()` gives that it leaves out (RoPE's `inv_freq`
    and `original_inv_freq`) under ("buffer", name), which no state_dict name equals. An unchanged model keeps its
    fingerprint without hashing again."""
    hf = smollm.hf
    state, covered = hf.state_dict(keep_vars=True), fp.weights(hf)
    buffers = dict(hf.named_buffers(remove_duplicate=False))
    left_out = [name for name, b in buffers.items() if state.get(name) is not b]
    assert left_out == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert list(covered) == [*state, *(("buffer", name) for name in left_out)]
    assert all(covered[n] is state[n] for n in state) and all(covered["buffer", n] is buffers[n] for n in left_out)
    first = smollm.fingerprint
    calls = len(hashes)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last") as trace:
        smollm(**smollm.encode("The capital of France is"))
    assert trace.provenance["weights"] == first == smollm.fingerprint and len(hashes) == calls


def test_a_buffer_under_two_names_is_keyed_under_each_and_sampled_once(smollm):
    """The rotary module shared by a layer as well (a second name for it, as a tied module has): its buffers are keyed
    under both names, sampled once, and a write through `.data` under the new name is seen."""
    hf, rotary = smollm.hf, _rotary(smollm)
    first = smollm.fingerprint
    sampled = sum(v.numel() for v in fp._KEPT[hf].plan.sampled.values())
    attention = hf.model.layers[0].self_attn
    attention.add_module("rotary", rotary)  # no parameter, no persistent buffer: the state_dict is the same
    try:
        names = [name for name in fp.weights(hf) if not isinstance(name, str)]
        assert ("buffer", "model.layers.0.self_attn.rotary.inv_freq") in names and len(names) == 4
        shared = smollm.fingerprint
        assert shared != first and shared == fresh_hash(smollm)
        assert sum(v.numel() for v in fp._KEPT[hf].plan.sampled.values()) == sampled
        saved = attention.rotary.inv_freq.detach().clone()
        attention.rotary.inv_freq.data.mul_(0.5)
        try:
            assert smollm.fingerprint != shared
        finally:
            rotary.inv_freq.data.copy_(saved)
        assert smollm.fingerprint == shared
    finally:
        del attention.rotary
    assert smollm.fingerprint == first


def test_an_offloaded_buffer_is_read_from_the_weights_map_as_an_offloaded_parameter_is(smollm):
    """A buffer on the meta device (its bytes elsewhere) is keyed by name, shape and dtype and no plan is built; the
    hash reads it from the weights map of the module's accelerate hook (`placement.stored`), and without one says the
    weights are unavailable rather than hash a placeholder."""
    resident = copy.deepcopy(_rotary(smollm))
    offloaded = copy.deepcopy(resident)
    offloaded.inv_freq = offloaded.inv_freq.to("meta")
    (entries, _), _ = fp._walk(fp.weights(offloaded))
    assert (("buffer", "inv_freq"), (32,), torch.float32, "meta") in entries
    assert fp.fingerprint(offloaded).startswith("unavailable") and fp._KEPT[offloaded].plan is None
    offloaded._hf_hook = SimpleNamespace(weights_map={"inv_freq": resident.inv_freq.clone()})
    fp.forget(offloaded)
    assert fp.fingerprint(offloaded) == fp.fingerprint(resident) == fp.weights_hash(resident, fp.weights(resident))
    held = offloaded._hf_hook.weights_map["inv_freq"]  # what accelerate's CPU offload holds and each forward reads
    with torch.no_grad():
        held.mul_(0.5)  # an edit of the held bytes: a counted write, the meta tensor itself unchanged
    assert fp.fingerprint(offloaded) != fp.fingerprint(resident)
    assert fp.fingerprint(offloaded) == fp.weights_hash(offloaded, fp.weights(offloaded))
    with torch.no_grad():
        held.mul_(2)
    assert fp.fingerprint(offloaded) == fp.fingerprint(resident)
