"""Steering methods (PAI, VAR, VHR, Knockout, VTC-CLS) take a generator of layers or
heads as a list, as a SiteEdit does (its `edits` read them at every steer block, and a spent generator then refused or,
for PAI's heads, edited no head and ran the model unsteered); a bool or a float is no layer or position there."""
import pytest
import torch

from attnscope.steer import PAI, VAR, VHR, Knockout, SteerError, steer
from attnscope.steer.methods.vtc_cls import VTCCLS

STEER_TEXT = "Alice lives in Paris. Bob lives in Rome. Bob lives in"


def _steered(model, method, x):
    with torch.no_grad(), steer(model, method):
        return model(**x).logits[0, -1]


@pytest.mark.parametrize("make", [
    lambda layers, heads: PAI(alpha=1, keys=[3], layers=layers([20, 25]), heads=heads([0, 1])),
    lambda layers, heads: Knockout([0, 1], "last", layers=layers([10, 11, 12])),
    lambda layers, heads: VAR(layers=layers([10, 11]), keys=[3]),
    lambda layers, heads: VHR(layers=layers([10, 11]), drop=[3]),
])
def test_a_method_given_generators_steers_the_same_at_every_use(smollm, make):
    """A method reads its layers and heads at every `steer` block: a generator was spent by the first (the second
    block then refused, or, for PAI's heads, edited no head and ran the model unsteered)."""
    x = smollm.encode(STEER_TEXT)
    want = _steered(smollm, make(list, list), x)
    method = make(lambda v: (i for i in v), lambda v: (i for i in v))
    for _ in range(2):
        assert torch.equal(_steered(smollm, method, x), want)


def test_vtc_cls_keeps_a_generator_of_layers():
    assert VTCCLS(layers=(i for i in (0, 2))).layers == [0, 2]


@pytest.mark.parametrize("kw", [dict(layers=True), dict(layers=[20.7]), dict(layers=[20], keys=True),
                                dict(layers=[20], keys=[3, False])])
def test_a_method_refuses_bools_and_floats_as_layers_or_positions(smollm, kw):
    """layers=True was layer 1, layers=[20.7] layer 20, keys=True position 1, all without a word."""
    with pytest.raises(SteerError):
        with steer(smollm, PAI(alpha=1, **{"keys": [3], **kw})):
            pass
