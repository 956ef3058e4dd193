"""The weights fingerprint sees an edit of an offloaded weight whose weights map `placement` does not know (a Mapping
of another kind) or whose held tensor has no write counter (an inference tensor): `placement.stamp` reads a digest
of those bytes instead of giving None, which left the fingerprint as it was until `refresh_fingerprint()`."""
from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import attnscope
from attnscope.models import fingerprint as fp
from attnscope.models.placement import _source

pytest.importorskip("accelerate")
TEXT = "Alice lives in Paris. Bob lives in"


class Wrapped(Mapping):
    """A weights map of a kind placement does not know: accelerate reads it as any Mapping."""

    def __init__(self, inner):
        self.inner = inner

    def __getitem__(self, key):
        return self.inner[key]

    def __iter__(self):
        return iter(self.inner.keys())

    def __len__(self):
        return len(list(self.inner.keys()))


def _wrap_maps(hf) -> int:
    hooks = [m._hf_hook for m in hf.modules() if getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None]
    for hook in hooks:
        hook.weights_map = Wrapped(hook.weights_map)
    return len(hooks)


def _full(hf) -> str:
    return fp.weights_hash(hf, fp.weights(hf))


def test_an_edit_of_a_disk_offloaded_weight_behind_an_unknown_map_changes_the_fingerprint(smollm, tmp_path):
    model = attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=tmp_path)
    assert _wrap_maps(model.hf) > 0
    name = "model.layers.25.mlp.down_proj.weight"
    module = model.hf.get_submodule(name.rsplit(".", 1)[0])
    assert module.weight.device.type == "meta" and _source(module._hf_hook.weights_map, "weight") == "unknown"
    first = model.fingerprint
    assert first == smollm.fingerprint == _full(model.hf)
    index = json.loads((tmp_path / "index.json").read_text())
    data = np.memmap(tmp_path / f"{name}.dat", dtype=index[name]["dtype"], mode="r+", shape=tuple(index[name]["shape"]))
    saved = np.array(data)
    x = smollm.encode(TEXT)
    with torch.no_grad():
        before = model(**x).logits
        data[:] = saved * 2
        data.flush()
        assert not torch.equal(model(**x).logits, before)  # the model computes with the edited bytes
    assert model.fingerprint != first and model.fingerprint == _full(model.hf)
    data[:] = saved
    data.flush()
    del data
    assert model.fingerprint == first == _full(model.hf)


def test_an_edit_of_a_held_weight_behind_an_unknown_map_changes_the_fingerprint(smollm):
    from accelerate import cpu_offload

    model = attnscope.load("smollm2-135m")
    cpu_offload(model.hf, execution_device="cpu")
    _wrap_maps(model.hf)
    model.refresh_fingerprint()
    assert model.fingerprint == smollm.fingerprint
    held = model.hf.model.layers[3].mlp.down_proj._hf_hook.weights_map["weight"]
    x = smollm.encode(TEXT)
    with torch.no_grad():
        before = model(**x).logits
        held.mul_(2)
        assert not torch.equal(model(**x).logits, before)
    assert model.fingerprint != smollm.fingerprint and model.fingerprint == _full(model.hf)
    with torch.no_grad():
        held.mul_(0.5)
    assert model.fingerprint == smollm.fingerprint


def test_a_held_inference_tensor_is_stamped_by_its_bytes(smollm):
    """A weights map holding an inference tensor (no write counter; reading `_version` raises): the fingerprint is
    read, and an edit of the tensor (possible inside inference mode only) changes it."""
    from accelerate import cpu_offload

    model = attnscope.load("smollm2-135m")
    cpu_offload(model.hf, execution_device="cpu")
    hook = model.hf.model.layers[3].mlp.down_proj._hf_hook
    dataset, key = hook.weights_map.dataset, hook.weights_map.prefix + "weight"
    with torch.inference_mode():
        dataset[key] = dataset[key].clone()
    held = dataset[key]
    assert held.is_inference()
    model.refresh_fingerprint()
    assert model.fingerprint == smollm.fingerprint
    with torch.inference_mode():
        held.mul_(2)
    assert model.fingerprint != smollm.fingerprint and model.fingerprint == _full(model.hf)
    with torch.inference_mode():
        held.mul_(0.5)
    assert model.fingerprint == smollm.fingerprint
