"""`core.probs.attention_probs` stops a chunk's causal scores at its last row's key and writes 0 beyond: every row,
in any order and chunking, with GQA and a KV-cache offset, equals a softmax over the fully masked logits computed
here by hand."""
from __future__ import annotations

import pytest
import torch

from attnscope.core.probs import attention_probs


class Causal:
    is_causal = True
    scaling = None


def reference(q, k, window=None):
    groups = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    q_pos = torch.arange(k.shape[2] - q.shape[2], k.shape[2])[:, None]
    k_pos = torch.arange(k.shape[2])[None]
    hidden = k_pos > q_pos
    if window:
        hidden |= k_pos <= q_pos - window
    return s.masked_fill(hidden, float("-inf")).softmax(-1)


@pytest.mark.parametrize("heads,kv,queries,keys,chunk,window", [
    (6, 2, 37, 37, 8, None), (4, 4, 5, 40, 2, None), (4, 2, 300, 300, 256, None), (4, 1, 33, 33, 4, 7)])
def test_causal_rows_equal_a_masked_softmax(heads, kv, queries, keys, chunk, window):
    torch.manual_seed(0)
    q, k = torch.randn(2, heads, queries, 16), torch.randn(2, kv, keys, 16)
    ref = reference(q, k, window)
    kwargs = {"sliding_window": window} if window else {}
    full = attention_probs(Causal(), q, k, None, kwargs, chunk=chunk)
    torch.testing.assert_close(full, ref, atol=1e-6, rtol=0)
    rows = torch.tensor([queries - 1, 0, queries // 2, 1])  # unsorted, chunked across the cut
    some = attention_probs(Causal(), q, k, None, kwargs, rows=rows, chunk=2)
    torch.testing.assert_close(some, ref[:, :, rows], atol=1e-6, rtol=0)
    half = attention_probs(Causal(), q, k, None, kwargs, rows=rows, chunk=2, dtype=torch.float16)
    assert half.dtype == torch.float16 and float((half.float() - ref[:, :, rows]).abs().max()) < 1e-3
    assert torch.all(full[..., :, :][torch.ones_like(ref, dtype=torch.bool) & (ref == 0)] == 0)
