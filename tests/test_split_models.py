"""Split models (text): SmolLM2 placed with accelerate across devices, the CPU and disk (`attnscope.load(...,
device_map=, max_memory=, offload_folder=)`) captures, steers and explains exactly as the unsplit model; bad
placements are refused by name before anything is loaded or moved. scene-vlm (token pruning, contrastive branches,
the vision tower, restore): test_split_vlm.py.

On a CPU-only machine SmolLM2 is placed by `max_memory`: the layers that do not fit in 300 MB go to disk. With two or
more CUDA devices the same tests also run on a map over two GPUs, the CPU and disk, against the model on one GPU
(tests/placements.py)."""
from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope.models.placement import PlacementError, is_split, placement, split
from attnscope.steer import PAI, steer
from placements import GPUS, PLACEMENTS, lm_map, same

pytest.importorskip("accelerate")
TEXT = "Alice lives in Paris. Bob lives in Rome. Alice lives in"


@pytest.fixture(scope="module", params=PLACEMENTS)
def lm(request, smollm, tmp_path_factory):
    """(unsplit, split) SmolLM2."""
    folder = tmp_path_factory.mktemp("offload-lm")
    if request.param == "cpu-disk":
        return smollm, attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=folder)
    plain = attnscope.load("smollm2-135m", device_map="cuda:0")
    return plain, attnscope.load("smollm2-135m", offload_folder=folder, device_map={
        "model.embed_tokens": 0, "lm_head": 0, "model.rotary_emb": 0, "model.norm": 1} | lm_map("gpus", 30, "model"))


def test_split_model_is_really_offloaded_and_fingerprints_its_real_weights(lm):
    plain, split_model = lm
    assert placement(split_model.hf)["disk"] >= 5 and is_split(split_model.hf)
    assert any(p.device.type == "meta" for p in split_model.hf.parameters())  # offloaded: weights not resident
    assert split_model.fingerprint == plain.fingerprint  # read from the weights map, not the meta tensors
    assert split_model.device == plain.device  # inputs go to the execution device


def test_split_model_is_not_hashed_again_after_each_capture(lm, monkeypatch):
    """accelerate puts new meta tensors in place of offloaded weights at every forward; they hold no bytes, so they
    are not a change: the offloaded bytes are not read again."""
    from attnscope.models import fingerprint

    _, split_model = lm
    first = split_model.fingerprint
    monkeypatch.setattr(fingerprint, "weights_hash", lambda *a: pytest.fail("hashed the unchanged weights again"))
    x = split_model.encode(TEXT)
    with torch.no_grad(), attnscope.capture(split_model, layers=[0, 29], queries="last") as trace:
        split_model.generate(**x, max_new_tokens=2, do_sample=False)
    assert trace.provenance["weights"] == first == split_model.fingerprint


def test_capture_during_generate_equals_the_unsplit_model(lm):
    plain, split_model = lm
    x = plain.encode(TEXT)
    traces, ids = [], []
    for model in (plain, split_model):
        with torch.no_grad(), attnscope.capture(model, layers="all", queries="last") as trace:
            ids.append(model.generate(**x, max_new_tokens=3, do_sample=False))
        traces.append(trace)
    assert torch.equal(ids[0].cpu(), ids[1].cpu())
    assert traces[1].provenance["placement"] == placement(split_model.hf)
    for layer in range(30):
        for step in range(3):
            same(traces[0].attention("text", layer, step=step), traces[1].attention("text", layer, step=step))
    assert traces[0].tokens("text", step=2).roles == traces[1].tokens("text", step=2).roles


@pytest.mark.parametrize("queries", [None, "last"])
def test_summaries_during_generate_equal_the_unsplit_model(lm, queries):
    """Summaries reduced in the call (prefill rows, and decode steps' plain rows stacked at the flush) on the model
    placed by accelerate: the same numbers as the unsplit model (over two GPUs: each device's layers reduced there)."""
    plain, split_model = lm
    x = plain.encode(TEXT)
    out = []
    for model in (plain, split_model):
        with torch.no_grad(), attnscope.capture(model, layers=[0, 7, 14, 15, 22, 29], queries=queries,
                                                summaries="all", topk=7) as s:
            ids = model.generate(**{k: v.to(model.device) for k, v in x.items()}, max_new_tokens=3, do_sample=False)
        out.append((s, ids))
    (a, ids_a), (b, ids_b) = out
    assert torch.equal(ids_a.cpu(), ids_b.cpu())
    assert a.run().records.keys() == b.run().records.keys()
    for key, records in a.run().records.items():
        assert [r.step for r in b.run().records[key]] == [r.step for r in records] == [0, 1, 2]
        for r1, r2 in zip(records, b.run().records[key]):
            assert r1.tensors().keys() == r2.tensors().keys()
            for name, value in r1.tensors().items():
                same(r2.tensors()[name], value)


def test_steering_and_explanations_equal_the_unsplit_model(lm):
    plain, split_model = lm
    x = plain.encode(TEXT)
    logits = []
    for model in (plain, split_model):
        with torch.no_grad(), steer(model, PAI(alpha=1.0, keys=[3, 4], layers=range(12, 30))):
            logits.append(model(**x).logits)
    same(*logits)
    for method in ("gradattn", "lrp"):  # lrp's norm rule reads weights offloaded again after their forward
        a, b = (attnscope.explain(model, x, method=method) for model in (plain, split_model))
        same(a.scores, b.scores)


@pytest.mark.parametrize("kwargs, message", [
    ({"device_map": {"model.layers.0": "disk"}}, "pass offload_folder"),
    ({"max_memory": {"cpu": "100MB"}}, "device_map='auto'"),
    ({"device_map": "everywhere"}, "neither a strategy"),
    ({"device_map": {"model.layers.0": "gpu7"}}, "is not a device"),
    ({"device_map": {"": f"cuda:{GPUS}"}}, "does not exist"),
    ({"dtype": torch.float16}, "takes no \\['dtype'\\]"),
])
def test_bad_placements_are_refused_before_loading(kwargs, message):
    with pytest.raises((PlacementError, TypeError), match=message):
        attnscope.load("smollm2-135m", **kwargs)


@pytest.mark.parametrize("device_map, message", [
    ({"model.layers.0": "cpu", "model.decoder": "cpu"}, "does not have: \\['model.decoder'\\]"),
    ({"model.layers.0": "cpu"}, "leaves .* weights unplaced"),
])
def test_bad_maps_leave_the_model_untouched(smollm, device_map, message):
    with pytest.raises(PlacementError, match=message):
        split(smollm, device_map)
    assert not is_split(smollm.hf) and not any(p.device.type == "meta" for p in smollm.hf.parameters())


def test_a_model_is_placed_once(lm):
    with pytest.raises(PlacementError, match="already placed"):
        split(lm[1], "auto")


def test_a_folder_holding_other_weights_is_refused_not_reused(smollm, tmp_path):
    """accelerate skips writing a folder that has an index.json and reads the weights there: a placement into a folder
    that holds other weights (an earlier map, a user's edited copy) would run those. The same weights are reused
    (several processes of one run placing the same model into one folder)."""
    first = attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=tmp_path)
    assert placement(first.hf)["disk"] >= 5
    again = attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=tmp_path)
    x = smollm.encode(TEXT)
    with torch.no_grad():
        same(again(**x).logits, smollm(**x).logits)
    with pytest.raises(PlacementError, match="already holds offloaded weights .* not this model's"):
        attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "150MB"}, offload_folder=tmp_path)
    edited = attnscope.load("smollm2-135m")
    with torch.no_grad():
        edited.hf.model.layers[25].mlp.down_proj.weight.mul_(0.5)
    with pytest.raises(PlacementError, match="already holds offloaded weights .* not this model's"):
        split(edited, "auto", max_memory={"cpu": "300MB"}, offload_folder=tmp_path)
    assert not is_split(edited.hf)


def test_everything_on_disk_equals_the_unsplit_model(smollm, tmp_path):
    model = attnscope.load("smollm2-135m", device_map={"": "disk"}, offload_folder=tmp_path)
    assert set(placement(model.hf)) == {"disk"}
    x = smollm.encode(TEXT)
    with torch.no_grad():
        same(model(**x).logits, smollm(**x).logits)


@pytest.mark.parametrize("max_memory, message", [
    ({GPUS: "10GiB", "cpu": "20GiB"}, "does not exist"),
    ("300MB", "must be a \\{device: size\\} dict"),
    ({"gpu": "1GB"}, "not a device"),
])
def test_bad_max_memory_is_refused_before_loading(max_memory, message, tmp_path):
    with pytest.raises(PlacementError, match=message):
        attnscope.load("smollm2-135m", device_map="auto", max_memory=max_memory, offload_folder=tmp_path)


def test_an_edit_of_an_offloaded_weight_after_the_placement_changes_the_fingerprint(smollm, tmp_path):
    """An offloaded weight's bytes live in its offload file, read at every forward: a rewrite of that file changes
    what the model computes, so the fingerprint (which keys offloaded weights by what tells their file changed, not by
    name, shape and dtype alone) changes with it and names the new bytes, and undoing the edit gives the unsplit
    model's fingerprint again."""
    import json

    import numpy as np

    model = attnscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=tmp_path)
    first = model.fingerprint
    assert first == smollm.fingerprint
    index = json.loads((tmp_path / "index.json").read_text())
    name = "model.layers.25.mlp.down_proj.weight"
    assert name in index and model.hf.get_submodule(name.rsplit(".", 1)[0]).weight.device.type == "meta"
    data = np.memmap(tmp_path / f"{name}.dat", dtype=index[name]["dtype"], mode="r+", shape=tuple(index[name]["shape"]))
    saved = np.array(data)
    x = smollm.encode(TEXT)
    with torch.no_grad():
        before = model(**x).logits
        data[:] = saved * 2
        data.flush()
        assert not torch.equal(model(**x).logits, before)  # the model computes with the edited bytes
    edited = model.fingerprint
    assert edited != first and edited == fp_full(model.hf)
    data[:] = saved
    data.flush()
    del data
    assert model.fingerprint == first == fp_full(model.hf)


def fp_full(hf):
    from attnscope.models import fingerprint

    return fingerprint.weights_hash(hf, fingerprint.weights(hf))


def test_an_edit_of_a_weight_accelerate_holds_in_memory_changes_the_fingerprint(smollm):
    """CPU offload (accelerate's `cpu_offload`, or modules on "cpu" beside a GPU) keeps each offloaded weight as a
    tensor in the weights map, read at every forward: an in-place edit of it changes what the model computes, and the
    fingerprint, and undoing it gives the unsplit model's fingerprint again."""
    from accelerate import cpu_offload

    model = attnscope.load("smollm2-135m")
    cpu_offload(model.hf, execution_device="cpu")
    model.refresh_fingerprint()
    assert model.hf.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert model.fingerprint == smollm.fingerprint
    held = model.hf.model.layers[3].mlp.down_proj._hf_hook.weights_map["weight"]
    x = smollm.encode(TEXT)
    with torch.no_grad():
        before = model(**x).logits
        held.mul_(2)
        assert not torch.equal(model(**x).logits, before)
    assert model.fingerprint != smollm.fingerprint and model.fingerprint == fp_full(model.hf)
    with torch.no_grad():
        held.mul_(0.5)
    assert model.fingerprint == smollm.fingerprint
