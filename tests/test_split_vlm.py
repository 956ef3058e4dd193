"""Split models (vision-language): scene-vlm placed with an explicit device map that alternates CPU and disk among
the vision tower's and the language model's layers (the projector and the final norm on disk), so token pruning
(hidden states and KV cache cut at offloaded layers), contrastive branches (their own forwards and caches through
offloaded modules) and the tower's CLS attention all cross offloaded modules. Each equals the unsplit model bit for
bit on the CPU, and a steer block that raises leaves the placed model (accelerate's hooks, the offloaded files) as it
was. With two or more CUDA devices the same tests also run over two GPUs, the CPU and disk (tests/placements.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope.steer import PAI, VCD, VTCCLS, FastV, PyramidDrop, steer
from placements import PLACEMENTS, same, vlm_map

pytest.importorskip("accelerate")
QUESTION = "Is there a bag in the image?"


@pytest.fixture(scope="module", params=PLACEMENTS)
def vlm(request, tmp_path_factory):
    """(unsplit, split, offload folder, inputs) scene-vlm."""
    folder = tmp_path_factory.mktemp("offload-vlm")
    try:
        plain = attnscope.load("scene-vlm", **({} if request.param == "cpu-disk" else {"device_map": "cuda:0"}))
    except FileNotFoundError as err:  # the trained weights are missing from this checkout
        pytest.skip(str(err))
    split_model = attnscope.load("scene-vlm", device_map=vlm_map(request.param), offload_folder=folder)
    return plain, split_model, folder, plain.encode(QUESTION, image="chelsea")


def test_capture_of_both_streams_equals_the_unsplit_model(vlm):
    plain, split_model, _, x = vlm
    traces = []
    for model in (plain, split_model):
        with torch.no_grad(), attnscope.capture(model, streams=["vision", "language"], layers=[0, 1, 5, -1]) as trace:
            model(**x)
        traces.append(trace)
    for stream in ("vision", "language"):
        for layer in traces[0].layers(stream):
            same(traces[0].attention(stream, layer), traces[1].attention(stream, layer))
        assert traces[0].tokens(stream).roles == traces[1].tokens(stream).roles


@pytest.mark.parametrize("method", [PAI(), FastV(), PyramidDrop(), VTCCLS(), VCD()], ids=lambda m: type(m).__name__)
def test_steered_generation_equals_the_unsplit_model(vlm, method):
    """Logit edits, token pruning and a contrastive branch, inside generate with the KV cache."""
    plain, split_model, _, x = vlm
    out, kept = [], []
    for model in (plain, split_model):
        with torch.no_grad(), steer(model, method) as session:
            out.append(model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True))
        kept.append({k: v.tolist() for k, v in session.state.kept.items()})
    assert torch.equal(out[0].sequences.cpu(), out[1].sequences.cpu()) and kept[0] == kept[1]
    for a, b in zip(out[0].logits, out[1].logits):
        same(a, b)
    if isinstance(method, (FastV, PyramidDrop, VTCCLS)):  # tokens were really dropped
        assert min(len(v[0]) for v in kept[1].values()) < x["input_ids"].shape[1]


def test_explanation_equals_the_unsplit_model(vlm):
    plain, split_model, _, x = vlm
    a, b = (attnscope.explain(model, x) for model in (plain, split_model))
    same(a.scores, b.scores)
    same(a.image_map(), b.image_map())


def _snapshot(model, folder: Path) -> dict:
    hf = model.hf
    configs = (hf.config, hf.config.text_config, hf.config.vision_config)
    return {"hooks": [(name, id(getattr(m, "_hf_hook", None)), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
                      for name, m in hf.named_modules()],
            "backends": [c._attn_implementation for c in configs],
            "disk": {p.name: hashlib.blake2b(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()},
            "meta": [n for n, p in hf.named_parameters() if p.device.type == "meta"]}


def test_split_model_is_restored_exactly_after_steering_even_when_the_block_raises(vlm):
    plain, split_model, folder, x = vlm
    with torch.no_grad():
        before_logits = split_model(**x).logits
    before = _snapshot(split_model, folder)
    assert before["disk"] and before["meta"]
    with pytest.raises(RuntimeError, match="inside the block"), torch.no_grad():
        with steer(split_model, FastV(), VCD()):
            split_model.generate(**x, max_new_tokens=2, do_sample=False)
            raise RuntimeError("inside the block")
    assert _snapshot(split_model, folder) == before
    with torch.no_grad():
        assert torch.equal(split_model(**x).logits, before_logits)
    assert split_model.fingerprint == plain.fingerprint  # the offloaded files hold the unsplit model's weights
