"""Capture on the real MiniLM encoder: exact values, untouched outputs, padding, role selection."""
import torch

import attnscope
from conftest import eager_attentions

SENTENCES = ["Attention is all you need.", "A cat sat on the warm mat by the door."]


def test_values_equal_eager_and_outputs_bit_identical(minilm):
    x = minilm.encode(SENTENCES)
    with torch.no_grad():
        plain = minilm(**x).last_hidden_state
        with attnscope.capture(minilm) as trace:
            captured = minilm(**x).last_hidden_state
    assert torch.equal(plain, captured)
    eager = eager_attentions(minilm, x)
    assert trace.layers("text") == list(range(6))
    for layer in range(6):
        probs = trace.attention("text", layer)
        assert probs.shape == eager[layer].shape == (2, 12, x["input_ids"].shape[1], x["input_ids"].shape[1])
        torch.testing.assert_close(probs, eager[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)


def test_padding_keys_get_no_attention(minilm):
    x = minilm.encode(SENTENCES)
    with torch.no_grad(), attnscope.capture(minilm, layers=0) as trace:
        minilm(**x)
    pads = trace.tokens("text", row=0).positions("pad")
    assert pads, "the shorter sentence must be padded"
    assert trace.attention("text", 0)[0][..., pads].abs().max() < 1e-6


def test_role_selection_equals_slicing_the_full_matrix(minilm):
    x = minilm.encode(SENTENCES[1])
    with torch.no_grad(), attnscope.capture(minilm, layers=[-1], heads=[0, 5]) as full:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, layers=[-1], heads=[0, 5], queries="special", keys="text") as sel:
        minilm(**x)
    tmap = sel.tokens("text")
    q, k = tmap.positions("special"), tmap.positions("text")
    assert q == [0, len(tmap) - 1] and len(k) == len(tmap) - 2
    expected = full.attention("text", 5)[:, :, q][..., k]
    torch.testing.assert_close(sel.attention("text", 5), expected, atol=1e-6, rtol=0)
    assert sel.record("text", 5).queries == q and sel.record("text", 5).keys == k
    torch.testing.assert_close(sel.attention("text", 5, head=5), expected[:, 1], atol=1e-6, rtol=0)


def test_grad_flag_keeps_or_detaches_the_graph(minilm):
    x = minilm.encode("Gradients flow through captured attention.")
    emb = minilm.hf.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    kwargs = {"inputs_embeds": emb, "attention_mask": x["attention_mask"]}
    with attnscope.capture(minilm, layers=3) as detached:
        minilm(**kwargs)
    assert detached.attention("text", 3).grad_fn is None
    with attnscope.capture(minilm, layers=3, grad=True) as kept:
        minilm(**kwargs)
    kept.attention("text", 3)[0, :, 0, 0].sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_half_precision_storage_on_cpu(minilm):
    x = minilm.encode(SENTENCES[0])
    with torch.no_grad(), attnscope.capture(minilm, layers=1) as full:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, layers=1, dtype=torch.float16, offload=True) as half:
        minilm(**x)
    probs = half.attention("text", 1)
    assert probs.dtype == torch.float16 and probs.device.type == "cpu"
    torch.testing.assert_close(probs.float(), full.attention("text", 1), atol=1e-3, rtol=0)
