"""The fast check of the weights fingerprint (models/fingerprint_plan.py) on SmolLM2: unchanged weights are told
without `state_dict()` (no full walk after a capture block, a steer block or a generation), and every change the full
walk's key sees is seen by the fast check too: a parameter replaced (by attribute or straight in `_parameters`), a
submodule replaced, a buffer registered (persistent or not) or removed, a non-persistent buffer replaced or made
persistent, modules reordered, `p.data` (of a parameter or a non-persistent buffer) pointed at other memory or at a
transposed view of its own, a state-dict hook or an instance's `_save_to_state_dict`. Each gives a fingerprint equal
to a hash of the bytes computed afresh, and undoing it gives the first fingerprint back, from the fast check again."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from test_weights_fingerprint import fresh_hash

import attnscope
from attnscope.models import fingerprint as fp
from attnscope.steer import HeadMask, steer


@pytest.fixture
def walks(monkeypatch):
    """Counts the full walks (`state_dict()` and the key) `fingerprint` takes."""
    calls = []
    real = fp._walk

    def counted(state):
        calls.append(1)
        return real(state)

    monkeypatch.setattr(fp, "_walk", counted)
    return calls


def test_unchanged_weights_take_the_fast_check(smollm, walks):
    x = smollm.encode("The capital of France is")
    first = smollm.fingerprint
    assert fp._KEPT[smollm.hf].plan is not None
    calls = len(walks)
    with torch.no_grad():
        with attnscope.capture(smollm, layers="all", queries="last") as trace:
            smollm.generate(**x, max_new_tokens=2, do_sample=False)
        with steer(smollm, HeadMask("0.1+3.2")):
            smollm(**x)
    assert trace.provenance["weights"] == first == smollm.fingerprint == attnscope.wrap(smollm.hf).fingerprint
    assert len(walks) == calls  # told without a full walk
    assert first == fresh_hash(smollm)


def _replace_by_attribute(model):
    norm = model.hf.model.norm
    saved = norm.weight
    norm.weight = torch.nn.Parameter(saved.detach() * 2.0)
    return lambda: setattr(norm, "weight", saved)


def _replace_in_parameters(model):
    proj = model.hf.model.layers[2].self_attn.k_proj
    saved = proj._parameters["weight"]
    proj._parameters["weight"] = torch.nn.Parameter(saved.detach().flip(0))
    return lambda: proj._parameters.__setitem__("weight", saved)


def _replace_submodule(model):
    layers = model.hf.model.layers
    saved = layers[3]
    edited = copy.deepcopy(saved)
    with torch.no_grad():
        edited.mlp.up_proj.weight[0, 0] += 1.0
    layers[3] = edited
    return lambda: layers.__setitem__(3, saved)


def _register_buffer(model):
    norm = model.hf.model.layers[1].input_layernorm
    norm.register_buffer("scale", torch.ones(4))
    return lambda: delattr(norm, "scale")


def _data_pointed_elsewhere(model):
    weight = model.hf.model.layers[4].self_attn.v_proj.weight
    saved = weight.data
    weight.data = saved.clone().roll(1, 0)  # same shape and dtype, other memory: no write counted
    return lambda: setattr(weight, "data", saved)


def _replace_non_persistent_buffer(model):
    rotary = model.hf.model.rotary_emb
    saved = rotary.inv_freq
    rotary.inv_freq = saved * 0.5  # RoPE's frequencies: not in state_dict()
    return lambda: setattr(rotary, "inv_freq", saved)


def _register_non_persistent_buffer(model):
    norm = model.hf.model.layers[1].input_layernorm
    norm.register_buffer("scale", torch.ones(4), persistent=False)
    return lambda: delattr(norm, "scale")


def _buffer_data_pointed_elsewhere(model):
    inv_freq = model.hf.model.rotary_emb.inv_freq
    saved = inv_freq.data
    inv_freq.data = saved.clone().flip(0)  # no write counted
    return lambda: setattr(inv_freq, "data", saved)


def _non_persistent_buffer_made_persistent(model):
    rotary = model.hf.model.rotary_emb
    rotary._non_persistent_buffers_set.discard("inv_freq")  # the same bytes, now in state_dict() under its name
    return lambda: rotary._non_persistent_buffers_set.add("inv_freq")


def _check(model, walks, change):
    """`change` (which returns its undo) gives a new fingerprint, equal to a fresh hash, found by a full walk the
    fast check asked for; undoing it gives the first fingerprint back, and the fast check tells it again."""
    before = model.fingerprint
    assert fp._KEPT[model.hf].plan is not None  # the next read starts with the fast check
    undo = change(model)
    try:
        calls = len(walks)
        after = model.fingerprint
        assert len(walks) == calls + 1  # the fast check said "changed": a full walk
        assert after != before
        assert after == fresh_hash(model)
    finally:
        undo()
    assert model.fingerprint == before
    calls = len(walks)
    assert model.fingerprint == before and len(walks) == calls  # restored: told by the fast check again


@pytest.mark.parametrize("change", [_replace_by_attribute, _replace_in_parameters, _replace_submodule, _register_buffer,
                                    _data_pointed_elsewhere, _replace_non_persistent_buffer,
                                    _register_non_persistent_buffer, _buffer_data_pointed_elsewhere,
                                    _non_persistent_buffer_made_persistent])
def test_a_change_to_smollm_is_seen(smollm, walks, change):
    """(A row or a column written through `.data`: test_weights_fingerprint.py, whose reads now go through the fast
    check.)"""
    _check(smollm, walks, change)


def _buffer_made_persistent(model):
    embeddings = model.hf.embeddings
    embeddings._non_persistent_buffers_set.discard("position_ids")
    return lambda: embeddings._non_persistent_buffers_set.add("position_ids")


def _modules_reordered(model):
    attention = model.hf.encoder.layer[0].attention.self
    saved = dict(attention._modules)
    query = attention.query
    del attention.query
    attention.query = query  # the same module, now last: `state_dict()` lists its weights after value's

    def undo():
        attention._modules.clear()
        attention._modules.update(saved)
    return undo


def _data_transposed(model):
    weight = model.hf.encoder.layer[1].attention.self.query.weight  # square: the same shape, transposed strides
    saved = weight.data
    weight.data = saved.t()
    return lambda: setattr(weight, "data", saved)


def _state_dict_hook(model):
    def add(module, state, prefix, metadata):
        state[prefix + "extra"] = torch.ones(2)
    return model.hf.pooler.register_state_dict_post_hook(add).remove


def _instance_save_to_state_dict(model):
    pooler = model.hf.pooler
    real = pooler._save_to_state_dict

    def save(destination, prefix, keep_vars):
        real(destination, prefix, keep_vars)
        destination[prefix + "extra"] = torch.ones(2)
    pooler._save_to_state_dict = save
    return lambda: delattr(pooler, "_save_to_state_dict")


def _instance_save_to_state_dict_for_an_attribute(model):
    """An instance's `_save_to_state_dict` set where another attribute was removed: its `__dict__` keeps its size."""
    attention = model.hf.encoder.layer[0].attention.self
    saved = vars(attention).pop("attention_head_size")  # read in forward only: state_dict() does not need it
    real = attention._save_to_state_dict

    def save(destination, prefix, keep_vars):
        real(destination, prefix, keep_vars)
        destination[prefix + "extra"] = torch.ones(2)
    attention._save_to_state_dict = save

    def undo():
        del attention._save_to_state_dict
        vars(attention)["attention_head_size"] = saved
    return undo


@pytest.mark.parametrize("change", [_buffer_made_persistent, _modules_reordered, _data_transposed, _state_dict_hook,
                                    _instance_save_to_state_dict, _instance_save_to_state_dict_for_an_attribute])
def test_a_change_to_what_state_dict_returns_is_seen(minilm, walks, change):
    """What decides `state_dict()` beyond the tensors (on MiniLM: its hash takes a fifth of a second)."""
    _check(minilm, walks, change)


def test_a_removed_buffer_is_seen(minilm, walks):
    """MiniLM's buffers are non-persistent (not in `state_dict()`): a persistent one of its own is added, then
    removed."""
    before = minilm.fingerprint
    pooler = minilm.hf.pooler
    pooler.register_buffer("scale", torch.ones(4))
    try:
        with_buffer = minilm.fingerprint
        assert with_buffer != before and with_buffer == fresh_hash(minilm)
        calls = len(walks)
        assert minilm.fingerprint == with_buffer and len(walks) == calls
    finally:
        delattr(pooler, "scale")
    assert minilm.fingerprint == before == fresh_hash(minilm) and len(walks) == calls + 1


def test_a_kept_plan_does_not_keep_the_model_alive(smollm):
    """The plan holds tensors and views, never a module: the kept dictionary is keyed weakly by the model."""
    hf = copy.deepcopy(smollm.hf.model.layers[0])
    assert fp.fingerprint(hf) == fp.weights_hash(hf, hf.state_dict())
    assert fp._KEPT[hf].plan is not None
    gone = weakref.ref(hf)
    del hf
    gc.collect()
    assert gone() is None


def test_what_the_fast_check_cannot_follow_takes_the_full_walk(minilm, walks):
    """A None submodule builds no plan: every read walks `state_dict()`, and agrees with a fresh hash."""
    first = minilm.fingerprint
    minilm.hf.encoder.register_module("absent", None)
    try:
        assert minilm.fingerprint == first and fp._KEPT[minilm.hf].plan is None
        calls = len(walks)
        assert minilm.fingerprint == first == fresh_hash(minilm) and len(walks) == calls + 1
    finally:
        del minilm.hf.encoder._modules["absent"]
    assert minilm.fingerprint == first and fp._KEPT[minilm.hf].plan is not None


def test_release_drops_the_plan_and_keeps_the_hash(minilm, walks, monkeypatch):
    """`release` (called by `placement.split`) lets go of the plan's views; the next read walks, hashing nothing."""
    first = minilm.fingerprint
    fp.release(minilm.hf)
    assert fp._KEPT[minilm.hf].plan is None
    monkeypatch.setattr(fp, "weights_hash", lambda *a: pytest.fail("hashed the unchanged weights again"))
    calls = len(walks)
    assert minilm.fingerprint == first and len(walks) == calls + 1 and fp._KEPT[minilm.hf].plan is not None


def test_parameters_sharing_memory_are_sampled_once_and_a_write_to_either_is_seen(walks):
    """Two Parameter objects over the same memory (tied by storage rather than by object): both names in the key, one
    sample, and a row written through either one's `.data` is seen by the fast check."""
    hf = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300, bias=False))
    hf[1].weight = torch.nn.Parameter(hf[0].weight.data)  # another object, the same storage, offset and strides
    first = fp.fingerprint(hf)
    plan = fp._KEPT[hf].plan
    assert [len(views) for views in plan.views.values()] == [1]
    for module in hf:
        calls = len(walks)
        saved = module.weight.detach()[7].clone()
        module.weight.data[7] = 0.0
        try:
            assert fp.fingerprint(hf) != first and len(walks) == calls + 1
        finally:
            module.weight.data[7] = saved
        assert fp.fingerprint(hf) == first == fp.weights_hash(hf, hf.state_dict())
