"""The sequence ledger: absolute positions from what the cache really holds, in capture and in steer.

Each case names the right value computed independently (eager attention of the full sequence, or a hand-made
edit) and checks attnscope's labels against it: sliding-window caches, a prefix cache made before the block,
beam search, and vision towers whose sequence does not start with one CLS."""
from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, SiglipVisionConfig, SiglipVisionModel

import attnscope
from attnscope.core import seam
from attnscope.steer import PAI, steer
from tiny_models import eager

WINDOW, PROMPT, NEW = 4, 9, 3


@pytest.fixture(scope="module")
def mistral():
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, sliding_window=WINDOW,
                        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    hf = MistralForCausalLM(cfg).eval()
    ids = torch.randint(3, 120, (1, PROMPT))
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return attnscope.wrap(hf), ids, out


def _eager_full(hf, ids):
    with eager(hf), torch.no_grad():
        return hf(input_ids=ids, output_attentions=True).attentions


def test_sliding_window_decode_rows_are_placed_at_their_true_positions(mistral):
    m, ids, out = mistral
    with torch.no_grad(), attnscope.capture(m, queries=None) as trace:
        again = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(again, out)
    ref = _eager_full(m.hf, out[:, :-1])
    for step in range(1, NEW):
        q = PROMPT + step - 1
        for layer in range(2):
            rec = trace.record("text", layer, step=step)
            assert rec.queries == [q]
            keys = rec.keys if rec.keys is not None else list(range(rec.probs.shape[-1]))
            assert keys == list(range(q - WINDOW + 1, q + 1))
            torch.testing.assert_close(rec.probs[0, :, 0], ref[layer][0, :, q, keys], atol=1e-5, rtol=0)
    with torch.no_grad(), attnscope.capture(m, queries="last") as last:
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert [last.record("text", 1, step=s).queries for s in range(NEW)] == [[PROMPT - 1 + s] for s in range(NEW)]


def test_steering_a_windowed_cache_edits_positions_not_cache_slots(mistral):
    """PAI on positions 6 and 7 (edited from the last prompt row, 8, and the first decode row, 9, whose window holds
    keys 6..9) equals the same edit by hand on one full forward without a cache."""
    m, ids, out = mistral
    full = out[:, : PROMPT + 1]
    keys = [6, 7]
    with torch.no_grad(), steer(m, PAI(alpha=1.0, keys=keys, layers=[0, 1])):
        cache = seam.new_cache(m.hf.config)
        m.hf(**seam.cache_inputs(m.hf, cache, input_ids=full[:, :PROMPT]))
        steered = m.hf(**seam.cache_inputs(m.hf, cache, input_ids=full[:, PROMPT:])).logits[0, -1]

    def pai(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling
        q_len, k_len = logits.shape[-2:]
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        k_pos = torch.arange(k_len)[None, :]
        allowed = (k_pos <= q_pos) & (k_pos > q_pos - WINDOW)
        for row in (-2, -1):  # positions 8 and 9
            a = logits[:, :, row, keys]
            logits[:, :, row, keys] = a + 1.0 * a.abs()
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        return torch.matmul(logits.softmax(-1), v).transpose(1, 2).contiguous(), None

    from transformers import AttentionInterface
    AttentionInterface.register("pai_window_by_hand", pai)
    before = m.hf.config._attn_implementation
    m.hf.set_attn_implementation("pai_window_by_hand")
    try:
        with torch.no_grad():  # no cache: every key present
            ref = m.hf(input_ids=full).logits[0, -1]
    finally:
        m.hf.set_attn_implementation(before)
        AttentionInterface._global_mapping.pop("pai_window_by_hand", None)
    torch.testing.assert_close(steered, ref, atol=1e-5, rtol=0)


def test_prefix_cache_made_before_the_block_keeps_absolute_positions(smollm):
    context = "The capital of France is Paris. The capital of Italy is"
    x = smollm.encode(context)
    n = x["input_ids"].shape[1]
    cache = seam.new_cache(smollm.hf.config)
    with torch.no_grad():
        smollm.hf(**seam.cache_inputs(smollm.hf, cache, input_ids=x["input_ids"][:, : n - 3]))
        with attnscope.capture(smollm, queries="last", layers=[3]) as trace:
            out = smollm.generate(**x, **{seam.cache_keyword(smollm.hf): cache}, max_new_tokens=2, do_sample=False)
    tmap = trace.tokens("text")
    assert len(tmap) == n + 1 and trace.run().prefix == n - 3
    assert tmap.roles[: n - 3] == ["unknown"] * (n - 3)
    assert tmap.positions("text") == list(range(n - 3, n)) and tmap.positions("generated") == [n]
    ref = _eager_full(smollm.hf, out[:, :-1])[3]
    for step in range(2):
        rec = trace.record("text", 3, step=step)
        assert rec.queries == [n - 1 + step]
        torch.testing.assert_close(rec.probs[0, :, 0], ref[0, :, n - 1 + step, : n + step], atol=1e-5, rtol=0)


def test_beam_search_maps_follow_the_cache_reorders(smollm):
    x = smollm.encode("The best thing about Paris is")
    n = x["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[29]) as trace:
        out = smollm.generate(**x, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False,
                              return_dict_in_generate=True, output_scores=True)
    run = trace.run()
    assert run.steps == 3 and run.eras  # beams were reordered at least once
    tok = smollm.tokenizer
    # each step's record row r is labelled by the map of the beam that row held at that step: its generated
    # tokens are the ids the model was fed, reproduced by an eager forward on that row's own sequence
    for step in range(1, 4):
        rec = trace.record("text", 29, step=step)
        for r in range(3):
            tmap = trace.tokens("text", row=r, step=step)
            assert len(tmap) == n + step and rec.queries == [n + step - 1]
            ids = torch.tensor([tok.convert_tokens_to_ids(tmap.tokens)])
            ref = _eager_full(smollm.hf, ids)[29][0, :, -1]
            torch.testing.assert_close(rec.probs[r, :, 0], ref, atol=1e-5, rtol=0)


def test_siglip_has_no_cls_and_its_patches_are_not_shifted():
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8)
    m = attnscope.wrap(SiglipVisionModel(cfg).eval())
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    with torch.no_grad(), attnscope.capture(m, keys="image") as trace:
        m(**x)
    tmap = trace.tokens("vision")
    assert len(tmap) == 16 and tmap.positions("image") == list(range(16)) and not tmap.positions("cls")
    assert tmap.patch[0] == (0, 0, 0) and tmap.patch[5] == (0, 1, 1)
    with eager(m.hf), torch.no_grad():
        ref = m.hf(**x, output_attentions=True).attentions
    torch.testing.assert_close(trace.attention("vision", 1), ref[1], atol=1e-5, rtol=0)
    try:  # no CLS: "cls" selects nothing (never patch (0,0)'s row)
        with torch.no_grad(), attnscope.capture(m, queries="cls") as none:
            m(**x)
        assert not none.run().records
    except ValueError as err:
        assert "cls" in str(err)


def test_selected_keys_a_window_evicted_are_recorded_as_zero(mistral):
    m, ids, out = mistral
    with torch.no_grad(), attnscope.capture(m, queries="last", keys=[1, 2, PROMPT - 1]) as trace:
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    ref = _eager_full(m.hf, out[:, :-1])
    for step in range(NEW):
        rec = trace.record("text", 1, step=step)
        q = PROMPT - 1 + step
        assert sorted(rec.keys) == [1, 2, PROMPT - 1] and rec.queries == [q]
        for j, k in enumerate(rec.keys):
            torch.testing.assert_close(rec.probs[0, :, 0, j], ref[1][0, :, q, k], atol=1e-6, rtol=0)


def test_a_cropped_cache_is_refused_not_relabelled(smollm):
    """Assisted/speculative decoding crops the cache to drop rejected drafts: refused by name, in capture and steer."""
    from attnscope.core.ledger import LedgerError

    x = smollm.encode("One two three four five six seven eight nine ten eleven twelve")
    ids = x["input_ids"]
    for block in (lambda: attnscope.capture(smollm, queries="last", layers=[0]),
                  lambda: steer(smollm, PAI(alpha=1.0, keys=[0, 1], layers=[0, 1]))):
        cache = seam.new_cache(smollm.hf.config)
        with torch.no_grad(), block():
            smollm.hf(**seam.cache_inputs(smollm.hf, cache, input_ids=ids[:, :-4]))
            cache.crop(-2)  # what assisted decoding does with two rejected drafts
            with pytest.raises(LedgerError, match="cropped"):
                smollm.hf(**seam.cache_inputs(smollm.hf, cache, input_ids=ids[:, -6:]))


def test_a_second_turn_on_the_same_cache_is_text_not_generated(smollm):
    first = smollm.encode("The capital of France is")
    n = first["input_ids"].shape[1]
    with torch.no_grad(), attnscope.capture(smollm, queries="last", layers=[0]) as trace:
        out = smollm.generate(**first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        turn = smollm.tokenizer(" And the capital of Spain is", add_special_tokens=False, return_tensors="pt")["input_ids"]
        full = torch.cat([out.sequences, turn], 1)
        smollm.generate(input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=2, do_sample=False,
                        **{seam.cache_keyword(smollm.hf): seam.output_cache(out)})
    tmap = trace.tokens("text")
    assert len(trace.runs) == 1
    assert tmap.roles[n: n + 1] == ["generated"]  # the first answer's fed token
    start = out.sequences.shape[1] - 1  # the last answer token is fed together with the new turn
    assert "generated" not in tmap.roles[start + 1: full.shape[1]] and tmap.roles[-1] == "generated"
