"""A model whose heads changed after it was wrapped (pruned by hand) is refused by name: capture passes every head as
None, so the labels would come from the stale head count (10 heads of probabilities labelled 0..11)."""
import pytest
import torch
from torch import nn

import attnscope
from conftest import eager_attentions


def _prune_layer0_to_10_heads(model) -> None:
    """Heads 10 and 11 of MiniLM's layer 0 removed, as head pruning (Michel et al.) does by hand."""
    sa, out = model.hf.encoder.layer[0].attention.self, model.hf.encoder.layer[0].attention.output
    keep = torch.arange(10 * sa.attention_head_size)
    with torch.no_grad():
        for name in ("query", "key", "value"):
            old, new = getattr(sa, name), nn.Linear(384, keep.numel())
            new.weight.copy_(old.weight[keep]), new.bias.copy_(old.bias[keep])
            setattr(sa, name, new)
        dense = nn.Linear(keep.numel(), 384)
        dense.weight.copy_(out.dense.weight[:, keep]), dense.bias.copy_(out.dense.bias)
        out.dense = dense
    sa.num_attention_heads, sa.all_head_size = 10, keep.numel()


def test_heads_changed_after_wrapping_are_refused_and_a_new_wrap_labels_them():
    model = attnscope.load("minilm")  # its own copy: the session fixture stays whole
    _prune_layer0_to_10_heads(model)
    x = model.encode(["a cat sat on the mat"])
    with pytest.raises(ValueError, match="10 query heads, but had 12 .*wrap it again"):
        with torch.no_grad(), attnscope.capture(model, layers=[0]):
            model(**x)
    fresh = attnscope.wrap(model.hf, model.tokenizer)
    with torch.no_grad(), attnscope.capture(fresh, layers=[0]) as trace:
        fresh(**x)
    record = trace.record("text", 0)
    assert record.heads == list(range(10)) and record.probs.shape[1] == 10
    torch.testing.assert_close(record.probs, eager_attentions(fresh, x)[0], atol=1e-5, rtol=0)
