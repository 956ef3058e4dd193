"""Reads of tensor values into Python (`bool`, `int`, `.item()`, `.tolist()`) wait on a GPU for every queued kernel.
Capture and steering may make a fixed number of them per attention call, never one per token: counted here on the
CPU (the same Python code runs on any device) at two prompt lengths, the counts must be equal."""
from __future__ import annotations

import collections

import pytest
import torch

import attnscope
from attnscope.steer import FastV, steer

READS = ("__bool__", "__int__", "__index__", "__float__", "item", "tolist", "__iter__")


@pytest.fixture
def count_reads(monkeypatch):
    counts = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _reads(counts, run) -> dict:
    counts.clear()
    run()
    return dict(counts)


def test_capture_reads_do_not_grow_with_the_prompt(smollm, count_reads):
    def run(n):
        x = smollm.encode(text="The quick brown fox jumps over the lazy dog. " * 20)
        x = {k: v[:, :n] for k, v in x.items()}

        def go():
            with torch.no_grad(), attnscope.capture(smollm, queries="last"):
                smollm(**x)
        return go

    run(8)()  # warm-up: lazy initialisation reads once
    short, long = _reads(count_reads, run(24)), _reads(count_reads, run(96))
    assert short == long, (short, long)


def test_fastv_reads_do_not_grow_with_the_prompt(scene_vlm, count_reads):
    def run(question):
        x = scene_vlm.encode(question, image="chelsea")

        def go():
            with torch.no_grad(), steer(scene_vlm, FastV(k=2, keep=0.5)):
                scene_vlm(**x)
        return go, x["input_ids"].shape[1]

    (warm, _), (a, n_a), (b, n_b) = run("Is there a cat?"), run("Is there a cat?"), run(
        "Is there a cat in the picture, and if there is one, is it sitting on the left or on the right of the bag?")
    warm()
    assert n_b > n_a + 10
    short, long = _reads(count_reads, a), _reads(count_reads, b)
    assert short == long, (short, long)


def test_index_tensors_reach_the_device_without_a_copy_per_call(monkeypatch):
    """PyTorch synchronises the stream after every blocking host-to-GPU copy, as it does for a read: the head and row
    indices of a capture (every head, the last row, a run of rows) are made on the device with `arange`, not copied
    there. Counted with the query on the meta device (a device other than the CPU, on any machine)."""
    from attnscope.core.probs import attention_probs

    class Module:
        is_causal = True

    q, k = torch.randn(1, 4, 6, 8, device="meta"), torch.randn(1, 2, 6, 8, device="meta")
    copies = []
    to = torch.Tensor.to

    def counted(self, *args, **kwargs):
        if self.device.type == "cpu" and not self.is_floating_point():
            copies.append(self.tolist())
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    for heads, rows in [(torch.arange(4), torch.tensor([5])), (torch.tensor([1, 2]), torch.arange(2, 6)), (None, None)]:
        out = attention_probs(Module(), q, k, None, {}, heads=heads, rows=rows)
        assert out.device.type == "meta" and out.shape[1:3] == (4 if heads is None else len(heads), 6 if rows is None else len(rows))
    assert copies == []
    attention_probs(Module(), q, k, None, {}, heads=torch.tensor([1, 0]), rows=torch.tensor([5]))  # no run: copied
    assert copies == [[1, 0]]


def test_token_pruning_cuts_the_block_arguments_once_per_forward(scene_vlm, monkeypatch):
    """Every block after a pruning layer gets the same position embeddings, mask and position ids, cut to the same kept
    positions: they are cut once per forward (a gather and an index copy each), not once per layer. The number of
    gathers must not depend on how many layers follow the pruning layer; the logits must equal an uncached cut."""
    from attnscope.steer import session as steer_session

    gathers = []
    gather = torch.Tensor.gather

    def counted(self, *args, **kwargs):
        gathers.append(tuple(self.shape))
        return gather(self, *args, **kwargs)

    x = scene_vlm.encode("Is there a cat?", image="chelsea")
    n_layers = scene_vlm.streams["language"]

    def run(k):
        gathers.clear()
        monkeypatch.setattr(torch.Tensor, "gather", counted)
        try:
            with torch.no_grad(), steer(scene_vlm, FastV(k=k, keep=0.5)):
                logits = scene_vlm(**x, use_cache=True).logits
        finally:
            monkeypatch.setattr(torch.Tensor, "gather", gather)
        return len(gathers), logits

    early, late = 2, n_layers - 2
    (n_early, logits), (n_late, _) = run(early), run(late)
    assert n_early == n_late, (n_early, n_late)
    monkeypatch.setattr(steer_session, "_sliced", lambda st, kwargs, kept, cut: cut())  # cut at every layer
    uncached = run(early)[1]
    assert torch.equal(logits, uncached)
