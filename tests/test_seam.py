"""The seam to transformers (`core/seam.py`) on the installed release: the cache is found by what it is, decode
steps are seen as decode steps, and steering inside `generate` edits every step, checked against a decode loop
written here by hand with its own eager attention function."""
from __future__ import annotations

import torch
import transformers
from transformers import AttentionInterface, DynamicCache

import attnscope
from attnscope.core import seam
from attnscope.steer import PAI, steer

PROMPT = "Alice lives in Paris. Bob lives in Rome. Bob lives in"
SPAN = [3]  # " Paris"
LAYERS = list(range(20, 30))
ALPHA = 1.0


def test_cache_found_by_type_under_any_keyword():
    cache = DynamicCache()
    for name in ("cache", "past_key_values", "some_future_name"):
        assert seam.find_cache({"input_ids": torch.zeros(1, 2), name: cache}) is cache
        assert name not in seam.without_cache({"input_ids": torch.zeros(1, 2), name: cache})
    assert seam.find_cache({"input_ids": torch.zeros(1, 2), "past_key_values": None}) is None
    assert not seam.is_decode_step({"cache": cache})  # empty: a prefill


def test_cache_keyword_is_the_one_the_forward_declares(smollm):
    name = seam.cache_keyword(smollm.hf)
    assert name in smollm._signature.parameters
    x = smollm.encode("Hello there")
    with torch.no_grad():
        out = smollm.hf(**seam.cache_inputs(smollm.hf, seam.new_cache(smollm.hf.config), **x))
    assert seam.cache_length(seam.output_cache(out)) == x["input_ids"].shape[1]


def test_decode_steps_are_one_run_on_this_release(smollm):
    x = smollm.encode("The capital of France is")
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[29]) as trace:
        out = smollm.generate(**x, max_new_tokens=4, do_sample=False)
    assert len(trace.runs) == 1, f"transformers {transformers.__version__}: decode steps were taken for new sequences"
    assert trace.run().steps == 3 and len(trace.tokens("text")) == out.shape[1] - 1


def _pai_by_hand(alpha: float, layers: list[int], keys: list[int], every_step: bool):
    """Eager attention with PAI's edit on the last query row: logit a -> a + alpha*|a| for `keys` in `layers`, in
    every forward, or (`every_step=False`, the fault this guards against) only in the prefill."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling
        if module.layer_idx in layers and (every_step or query.shape[2] > 1):
            last = logits[:, :, -1, keys]
            logits[:, :, -1, keys] = last + alpha * last.abs()
        if attention_mask is None:  # causal, bottom-right aligned (the last query is the last key)
            q_len, k_len = logits.shape[-2:]
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[..., : k.shape[-2]], torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask[:, :, :, : k.shape[-2]]
        probs = logits.float().softmax(-1).to(query.dtype)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs
    return attention


def test_pai_inside_generate_equals_the_edit_applied_by_hand_at_every_step(smollm):
    x = smollm.encode(PROMPT)
    hf, steps = smollm.hf, 4
    with torch.no_grad(), steer(smollm, PAI(alpha=ALPHA, keys=SPAN, layers=LAYERS)):
        out = hf.generate(**x, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True)
    steered = torch.stack(out.scores, 1)[0]  # [steps, vocab]

    ref, prefill_only = (_decode_by_hand(hf, x, steps, _pai_by_hand(ALPHA, LAYERS, SPAN, every)) for every in (True, False))
    assert torch.equal(out.sequences[0, -steps:], ref[1])
    torch.testing.assert_close(steered, ref[0], atol=2e-4, rtol=0)
    assert float((steered - prefill_only[0]).abs().max()) > 50 * 2e-4  # the tolerance tells the two apart


def _decode_by_hand(hf, x, steps: int, attention):
    """Greedy decoding with a cache, one token per step, under `attention`: (logits [steps, vocab], tokens [steps])."""
    AttentionInterface.register("by_hand", attention)
    before = hf.config._attn_implementation
    hf.set_attn_implementation("by_hand")
    try:
        cache, ids, mask, logits_seen = seam.new_cache(hf.config), x["input_ids"], x["attention_mask"], []
        with torch.no_grad():
            for _ in range(steps):
                new = ids if not logits_seen else ids[:, -1:]
                logits = hf(input_ids=new, attention_mask=mask, **{seam.cache_keyword(hf): cache}, use_cache=True).logits
                logits_seen.append(logits[0, -1])
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    finally:
        hf.set_attn_implementation(before)
        AttentionInterface._global_mapping.pop("by_hand", None)
    return torch.stack(logits_seen), ids[0, -steps:]
