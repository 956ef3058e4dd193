"""Explanation and grounding methods when the model's tensors live on another device (a GPU, or several devices of a
split model), checked on the CPU: `other_device.OtherDevice` tensors raise when mixed with ordinary CPU tensors, as
CUDA does. Every tensor an explain pass or a trace hands out is put "elsewhere"; the methods must give the same
scores as with ordinary tensors."""
from __future__ import annotations

import pytest
import torch
from other_device import SECOND, OtherDevice, elsewhere, second_device

import attnscope
from attnscope.capture.trace import Trace
from attnscope.explain import base, engine
from attnscope.scenes import SceneWorld, question


@pytest.fixture
def other_device(monkeypatch):
    """engine.run's kept attention and block tensors, their gradients, and a trace's attention: on another device."""
    originals = {}
    run, gradients, attention = engine.run, engine.gradients, Trace.attention

    def wrap(t):
        w = elsewhere(t)
        originals[id(w)] = t  # gradients are taken with respect to the tensors of the graph
        return w

    def run_elsewhere(*args, **kwargs):
        p = run(*args, **kwargs)
        for kept in (p.block_in, p.block_out):
            for key in list(kept):
                kept[key] = wrap(kept[key])
        for key in list(p.probs):
            p.probs[key] = [wrap(t) for t in p.probs[key]]
        return p

    def gradients_elsewhere(value, tensors, what="the attention"):
        return [elsewhere(g) for g in gradients(value, [originals.get(id(t), t) for t in tensors], what)]

    monkeypatch.setattr(engine, "run", run_elsewhere)
    monkeypatch.setattr(engine, "gradients", gradients_elsewhere)
    monkeypatch.setattr(Trace, "attention", lambda self, *a, **k: elsewhere(attention(self, *a, **k)))
    return monkeypatch


def test_the_stand_in_refuses_to_mix_devices():
    a = elsewhere(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="same device"):
        a @ torch.eye(2)
    assert type(a.cpu() @ torch.eye(2)) is torch.Tensor and isinstance(a * torch.tensor(2.0), OtherDevice)


@pytest.mark.parametrize("method", ["raw", "rollout", "flow", "gradattn", "lrp", "gradinput", "gradcam"])
def test_explain_methods_on_another_device_equal_the_cpu(smollm, method, request):
    x = smollm.encode(text="The capital of France is")
    expected = attnscope.explain(smollm, x, method=method).scores
    request.getfixturevalue("other_device")
    assert torch.equal(attnscope.explain(smollm, x, method=method).scores, expected)


@pytest.mark.parametrize("method", ["flow", "tag", "relative", "gradattn"])
def test_grounding_on_another_device_equals_the_cpu(scene_vlm, method, request):
    scene = SceneWorld(seed=0).scene("test", 0)
    ask = dict(method=method, target="bag", layers=[4, 12])
    expected = attnscope.ground(scene_vlm, scene.image, question("bag"), **ask).map
    request.getfixturevalue("other_device")
    assert (attnscope.ground(scene_vlm, scene.image, question("bag"), **ask).map == expected).all()


def test_the_second_device_stand_in_has_a_device_of_its_own():
    a, w = elsewhere(torch.ones(2, 2)), torch.eye(2)
    with second_device():
        assert a.device == SECOND != w.device
        assert isinstance(torch.arange(2, device=a.device), OtherDevice) and isinstance(w.to(a.device), OtherDevice)
        assert torch.equal((a @ w.to(a.device)).cpu(), torch.ones(2, 2)) and type(a.to("cpu")) is torch.Tensor
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([a, w])
    assert a.device == w.device  # outside the block: the plain stand-in


def test_the_blur_baseline_stays_on_the_pixels_device():
    pixels = torch.rand(1, 3, 32, 32)
    out = base.blurred(elsewhere(pixels))
    assert isinstance(out, OtherDevice) and torch.equal(out.cpu(), base.blurred(pixels))


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_perturbed_pixels_stay_on_the_pixels_device(baseline):
    """Faithfulness's perturbed copies of an image on another device: its patch mask is made there too."""
    from types import SimpleNamespace

    from attnscope.evaluate.faithfulness import Perturber

    pixels = torch.rand(1, 3, 28, 28)
    tokens = SimpleNamespace(patch=[None, (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)])

    def explanation(pv):
        return SimpleNamespace(_model=object(), _inputs={"pixel_values": pv}, tokens=tokens, _cell=lambda: (14, 14))

    expected = Perturber(explanation(pixels), baseline).build([[1], [2, 4]])["pixel_values"]
    got = Perturber(explanation(elsewhere(pixels)), baseline).build([[1], [2, 4]])["pixel_values"]
    assert isinstance(got, OtherDevice) and torch.equal(got.cpu(), expected)
