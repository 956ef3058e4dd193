"""A selection that selects nothing is an error, not a silent no-op; `keys=-1` is the last position as in Python;
`heads:heads=3.1` parses as layer 3, head 1; the viewer's steering form has every parameter of each method."""
import pytest
import torch

import attnscope
from attnscope.steer import PAI, steer
from attnscope.steer.edits import SteerError
from attnscope.steer.methods import METHODS, parse, value
from attnscope.viz import integrations

PROMPT = "The quick brown fox jumps over the lazy dog near the river"


def test_out_of_range_keys_raise_and_negative_keys_count_from_the_end(smollm):
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        base = smollm(**x).logits
        with pytest.raises(SteerError, match=f"select nothing in a {n}-token"):
            with steer(smollm, parse("pai:alpha=1,keys=99")):
                smollm(**x)
        assert torch.equal(smollm(**x).logits, base)  # restored after the error
        with steer(smollm, parse("pai:alpha=1,keys=-1")):
            last = smollm(**x).logits
        with steer(smollm, parse(f"pai:alpha=1,keys={n - 1}")):
            explicit = smollm(**x).logits
    assert not torch.equal(last, base) and torch.equal(last, explicit)


def test_capture_of_a_role_the_input_lacks_is_an_error(smollm):
    x = smollm.encode("Hello there")
    with pytest.raises(ValueError, match="selects no position"):
        with torch.no_grad(), attnscope.capture(smollm, queries="image"):
            smollm(**x)
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        smollm(**x)
    assert trace.runs[0].records


def test_heads_spec_from_the_command_line(smollm):
    method = parse("heads:heads=3.1")
    assert method.heads == [(3, 1)]
    assert parse("heads:heads=3.10+5.2").heads == [(3, 10), (5, 2)]  # never the float 3.1
    x = smollm.encode(PROMPT)
    with torch.no_grad():
        base = smollm(**x).logits
        with steer(smollm, method):
            assert not torch.equal(smollm(**x).logits, base)


def test_steering_form_has_every_parameter_from_the_signature(smollm):
    import inspect

    found = integrations.steer_methods()
    # every method the viewer can run (FastVRerank decodes without a cache, which the viewer's capture needs)
    viewable = {n: c for n, c in METHODS.items() if not getattr(c, "generate_kwargs", None)}
    assert set(found) == set(viewable) and "fastv_rerank" not in found
    for name, cls in viewable.items():
        params = {p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")}
        assert set(found[name]["params"]) == params, name
        assert found[name]["help"] and found[name]["syntax"]
    assert found["heads"]["params"]["heads"]["required"] is True
    assert {"keys", "layers", "alpha"} <= set(found["pai"]["params"])
    # the README's text-steering example, as the form sends it (strings)
    ctx = integrations.steering(smollm, "pai", {"alpha": "1", "keys": "3", "layers": "20:30", "heads": ""})
    with ctx:
        pass
    assert value("keys", "[3]") == [3] and value("keys", "3:4") == slice(3, 4) and value("keys", "image") == "image"
    with pytest.raises(ValueError, match="needs heads"):
        integrations.steering(smollm, "heads", {"scale": "0"})
    with integrations.steering(smollm, "heads", {"heads": "3.1", "scale": "0"}):
        pass


@pytest.mark.parametrize("keys", [[], range(3, 3), slice(3, 3), "cls", "system"], ids=str)
def test_a_steering_selection_that_selects_nothing_is_an_error(smollm, keys):
    x = smollm.encode(PROMPT)
    with pytest.raises(SteerError, match="selects nothing"), torch.no_grad():
        with steer(smollm, PAI(alpha=1.0, keys=keys, layers=range(20, 30))):
            smollm(**x)


@pytest.mark.parametrize("heads", [{1: [0], 3: [2, 4]}, {"text": [0]}, True])
def test_heads_given_per_layer_or_as_a_bool_are_refused_not_read_as_other_heads(smollm, heads):
    """`layers=` takes a {stream: layers} dict, `heads=` does not: a dict was read as its keys (heads 1 and 3 of every
    layer for {1: [0], 3: [2, 4]}), and True as head 1, with no word."""
    with pytest.raises(TypeError, match="head of text layer 1: expected an int, a list of ints"):
        with torch.no_grad(), attnscope.capture(smollm, layers=[1, 3], heads=heads, queries="last"):
            smollm(**smollm.encode("Hi there"))
