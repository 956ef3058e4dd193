"""Capture on the real SmolLM2-135M (Llama, GQA 9/3): prefill and every generate step equal eager."""
import torch

import attnscope
from conftest import eager_attentions

PROMPT = "The capital of France is"


def test_prefill_equals_eager_and_logits_bit_identical(smollm):
    x = smollm.encode(PROMPT)
    with torch.no_grad():
        plain = smollm(**x).logits
        with attnscope.capture(smollm, layers=[0, 14, 29], heads=[0, 4, 8]) as trace:
            captured = smollm(**x).logits
    assert torch.equal(plain, captured)
    eager = eager_attentions(smollm, x)
    for layer in (0, 14, 29):
        torch.testing.assert_close(trace.attention("text", layer), eager[layer][:, [0, 4, 8]], atol=1e-5, rtol=0)
        assert torch.all(trace.attention("text", layer).triu(1) == 0)  # causal


def test_generate_steps_equal_eager_on_the_full_sequence(smollm):
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        plain = smollm.generate(**x, max_new_tokens=6, do_sample=False)
        with attnscope.capture(smollm, queries="last") as trace:
            out = smollm.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, out)
    assert "Paris" in smollm.tokenizer.decode(out[0, n:])
    run = trace.run()
    assert run.steps == 5  # prefill + 5 decode steps make 6 tokens
    tmap = trace.tokens("text")
    assert len(tmap) == out.shape[1] - 1 and tmap.positions("generated") == list(range(n, out.shape[1] - 1))
    eager = eager_attentions(smollm, {"input_ids": out[:, :-1]})
    for layer in (0, 17, 29):
        for step in range(run.steps + 1):
            pos = n - 1 + step
            row = trace.attention("text", layer, step=step)
            assert row.shape == (1, 9, 1, pos + 1)
            assert trace.record("text", layer, step=step).queries == [pos]
            torch.testing.assert_close(row[:, :, 0], eager[layer][:, :, pos, : pos + 1], atol=1e-5, rtol=0)
    steps = trace.steps("text", 29)
    assert steps.shape == (1, 9, 6, out.shape[1] - 1)


def test_padded_batch_rows_equal_eager(smollm):
    side, smollm.tokenizer.padding_side = smollm.tokenizer.padding_side, "left"
    try:
        x = smollm.encode([PROMPT, "Attention"])
    finally:
        smollm.tokenizer.padding_side = side
    with torch.no_grad(), attnscope.capture(smollm, layers=[3]) as trace:
        smollm(**x)
    eager = eager_attentions(smollm, x)
    mask = x["attention_mask"].bool()
    probs = trace.attention("text", 3)
    for b in range(2):
        rows = mask[b].nonzero().flatten()
        torch.testing.assert_close(probs[b][:, rows], eager[3][b][:, rows], atol=1e-5, rtol=0)
        assert probs[b][:, rows][..., ~mask[b]].abs().sum() == 0
    assert trace.tokens("text", row=1).roles[0] == "pad"


def test_chat_roles(smollm):
    ids = smollm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    tmaps = smollm.token_maps(dict(ids))
    roles = tmaps["text"][0].roles
    assert "system" in roles and "special" in roles and "text" in roles
    assert roles.index("system") < roles.index("text")
