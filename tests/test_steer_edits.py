"""Steering primitives on SmolLM2-135M (real weights): exact restore, strength 0 is the identity, PAI's logit edit
equals an independent eager implementation (the anchors' way: patched eager attention) on both paths (explicit rows
and additive mask), a capture inside a steer records the edited probabilities, VAR moves the stated fraction of
sink mass, head scaling equals zeroing o_proj's input slice, roles follow each row of a left-padded batch."""
from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope.core.dispatch import registered_names
from attnscope.steer import PAI, VAR, HeadMask, HeadScale, LogitBias, MaskKeys, Redistribute, ScaleKeys, SteerError, steer
from bench_modules import eager_anchor

PROMPT = "Tom's favourite colour is blue. Anna's favourite colour is green. Anna's favourite colour is"


def state(model):
    hf = model.hf
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())
    return hf.config._attn_implementation, hooks, registered_names()


@pytest.fixture(scope="module")
def x(smollm):
    return smollm.encode(PROMPT)


def anchors_pai(hf, alpha, layers, keys, last_only=True, record=None):
    """PAI the way its reference code does it: eager attention, the raw weights of the last row on the chosen keys
    raised to a + alpha*|a| before the mask and softmax (bench/anchors.py's patched eager_attention_forward)."""
    def raise_keys(module, w):
        rows = slice(-1, None) if last_only else slice(None)
        a = w[:, :, rows][..., keys]
        w[:, :, rows, keys] = a + alpha * a.abs()
        return w

    def keep(module, p):
        if record is not None:
            record[module.layer_idx] = p
        return p

    return eager_anchor(hf, layers, scores=raise_keys, probs=keep)


def test_the_anchor_without_edits_is_the_models_own_eager_attention(smollm, x):
    """The shared reference (bench/anchors.py) recomputes eager attention itself: with no edit it must equal the
    modeling file's eager attention, and put eager_attention_forward and SDPA back even when the block raises."""
    before = state(smollm)
    modeling = __import__(type(smollm.hf).__module__, fromlist=["eager_attention_forward"])
    original = modeling.eager_attention_forward
    with torch.no_grad():
        smollm.hf.set_attn_implementation("eager")
        try:
            own = smollm.hf(**x).logits
        finally:
            smollm.hf.set_attn_implementation("sdpa")
        with eager_anchor(smollm.hf, range(30)):
            anchor = smollm.hf(**x).logits
        with pytest.raises(ZeroDivisionError), eager_anchor(smollm.hf, range(30), probs=lambda module, p: p * 0):
            1 / 0  # noqa: B018
    assert torch.equal(anchor, own)
    assert state(smollm) == before and modeling.eager_attention_forward is original


def test_exit_restores_exactly_also_after_an_exception(smollm, x):
    before = state(smollm)
    with torch.no_grad():
        plain = smollm.hf(**x).logits
        with steer(smollm, PAI(alpha=0.5, keys=[5, 6]), VAR(keys=[5, 6]), HeadMask("3.1")):
            inside = smollm.hf(**x).logits
        assert not torch.equal(plain, inside)
        assert state(smollm) == before
        assert torch.equal(smollm.hf(**x).logits, plain)
        with pytest.raises(ZeroDivisionError), steer(smollm, PAI(alpha=0.5, keys=[5, 6]), HeadMask("3.1")):
            smollm.hf(**x)
            1 / 0  # noqa: B018
        assert state(smollm) == before
        assert torch.equal(smollm.hf(**x).logits, plain)
        with pytest.raises(IndexError), steer(smollm, PAI(alpha=0.5, keys=[5, 6])):  # raised inside the forward
            smollm.hf(input_ids=x["input_ids"] + 10**6)
        assert state(smollm) == before
        assert torch.equal(smollm.hf(**x).logits, plain)


@pytest.mark.parametrize("edit", [PAI(alpha=0.0, keys=[5]), HeadMask("3.1", scale=1.0), VAR(p=0.0, keys=[5]),
                                  LogitBias(0.0, keys=[5]), Redistribute(0.0, source=[0], keys=[5])],
                         ids=["pai", "heads", "var", "bias", "redistribute"])
def test_strength_zero_is_the_identity_bit_for_bit(smollm, x, edit):
    with torch.no_grad():
        plain = smollm.generate(**x, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with steer(smollm, edit) as session:
            same = smollm.generate(**x, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    assert session.edits == []
    assert torch.equal(plain.sequences, same.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, same.logits))


@pytest.mark.parametrize("queries", ["last", None], ids=["explicit-rows", "additive-mask"])
def test_pai_equals_the_anchors_patched_eager_attention(smollm, x, queries):
    """Both ways PAI runs (the last row recomputed for all heads; or every row through an additive mask to SDPA) give
    the logits of a patched eager implementation, and a capture inside the steer records its probabilities."""
    keys, layers = [5, 6, 7], [3, 12]
    got_rec, ref_rec = {}, {}
    with torch.no_grad():
        with steer(smollm, PAI(alpha=0.5, layers=layers, keys=keys, queries=queries)):
            with attnscope.capture(smollm, layers=layers, queries="last") as trace:
                got = smollm.hf(**x).logits
        with anchors_pai(smollm.hf, 0.5, layers, keys, last_only=queries == "last", record=ref_rec):
            ref = smollm.hf(**x).logits
        plain = smollm.hf(**x).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
    assert (got[0, -1] - plain[0, -1]).abs().max() > 0.1  # and the edit does something
    for layer in layers:
        got_rec[layer] = trace.attention("text", layer)[0, :, 0]
        torch.testing.assert_close(got_rec[layer], ref_rec[layer][0, :, -1].float(), atol=1e-4, rtol=0)
        assert got_rec[layer][:, keys].sum() > 0


def test_amplified_span_keeps_sdpa_in_decoding_and_matches_anchors(smollm, x):
    """In decode steps the edit is an additive mask for SDPA; the generated logits equal the anchors' eager ones."""
    keys, layers = [5, 6], list(range(2, 30))
    with torch.no_grad():
        with steer(smollm, PAI(alpha=0.5, layers=layers, keys=keys)):
            got = smollm.generate(**x, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with anchors_pai(smollm.hf, 0.5, layers, keys):
            ref = smollm.generate(**x, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=0)


def test_var_moves_the_stated_fraction_of_sink_mass(smollm, x):
    """One VAR layer, every head image-centric (rho=0): at that layer the last row's attention on sinks is (1-p) of
    the unsteered one, the target span gains exactly what the sinks lost, rows still sum to 1."""
    layer, span, p = 12, [5, 6, 7], 0.6
    with torch.no_grad():
        with attnscope.capture(smollm, layers=layer, queries="last") as plain:
            smollm.hf(**x)
        with steer(smollm, VAR(p=p, rho=0.0, layers=[layer], keys=span)) as session:
            with attnscope.capture(smollm, layers=layer, queries="last") as edited:
                smollm.hf(**x)
    sinks = session.state.sink[("text", layer)][0].nonzero()[:, 0].tolist()
    assert sinks and 0 in sinks and not set(sinks) & set(span)  # the first token is SmolLM2's massive-activation sink
    before, after = plain.attention("text", layer)[0, :, 0], edited.attention("text", layer)[0, :, 0]
    torch.testing.assert_close(after[:, sinks].sum(-1), (1 - p) * before[:, sinks].sum(-1), atol=1e-5, rtol=0)
    gained = after[:, span].sum(-1) - before[:, span].sum(-1)
    torch.testing.assert_close(gained, p * before[:, sinks].sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(after.sum(-1), torch.ones(9), atol=1e-5, rtol=0)
    rest = [i for i in range(after.shape[-1]) if i not in sinks + span]
    torch.testing.assert_close(after[:, rest], before[:, rest], atol=1e-6, rtol=0)


def test_head_scale_equals_zeroing_the_o_proj_input_slice(smollm, x):
    layer, head, dim = 7, 4, smollm.hf.config.head_dim
    o_proj = smollm.hf.model.layers[layer].self_attn.o_proj

    def zero(module, args):
        h = args[0].clone()
        h[..., head * dim: (head + 1) * dim] = 0
        return (h,)

    with torch.no_grad():
        with steer(smollm, HeadMask([(layer, head)])):
            got = smollm.hf(**x).logits
        handle = o_proj.register_forward_pre_hook(zero)
        try:
            ref = smollm.hf(**x).logits
        finally:
            handle.remove()
        with steer(smollm, HeadScale({(layer, head): 2.0})):
            doubled = smollm.hf(**x).logits
    assert torch.equal(got, ref)
    assert not torch.equal(doubled, got)


def test_edits_compose(smollm, x):
    """A logit edit, a probability edit and a head edit on the same layers: each changes the result, together
    they differ from each alone, and a mask on the amplified keys wins over the amplification."""
    span = [5, 6, 7]
    with torch.no_grad():
        outs = {}
        for name, items in {"pai": [PAI(keys=span)], "var": [VAR(keys=span, rho=0.0)], "heads": [HeadMask("10.2+11.3")],
                            "all": [PAI(keys=span), VAR(keys=span, rho=0.0), HeadMask("10.2+11.3")]}.items():
            with steer(smollm, *items):
                outs[name] = smollm.hf(**x).logits[0, -1]
        with steer(smollm, PAI(keys=span, layers=range(2, 30)), MaskKeys(layers=range(2, 30), keys=span, queries="last")):
            with attnscope.capture(smollm, layers=20, queries="last") as trace:
                smollm.hf(**x)
    assert len({tuple(v[:5].tolist()) for v in outs.values()}) == 4
    assert float(trace.attention("text", 20)[0, :, 0][:, span].sum()) == 0.0


def test_roles_follow_each_row_of_a_left_padded_batch(smollm):
    """Keys chosen by role ("system": the chat template's system turn) sit at different positions in each row of a
    left-padded batch; each row's steered output equals that row steered alone."""
    tok = smollm.tokenizer
    texts = [tok.apply_chat_template([{"role": "system", "content": sys_}, {"role": "user", "content": q}],
                                     tokenize=False, add_generation_prompt=True)
             for sys_, q in (("Answer in French.", "Name a colour."), ("Be brief.", "What is the capital of Italy, please?"))]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = smollm.encode(texts)
        singles = [smollm.encode(t) for t in texts]
    finally:
        tok.padding_side = side
    assert (batch["attention_mask"] == 0).any()
    edit = PAI(alpha=0.8, keys="system", layers=range(2, 30))
    with torch.no_grad(), steer(smollm, edit) as session:
        out = smollm.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        codes = session.state.codes["text"]
        rows = [smollm.generate(**s, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
                for s in singles]
    assert codes.shape[1] == batch["input_ids"].shape[1] + 2  # prompt + 2 fed-back generated tokens
    for b, single in enumerate(rows):
        assert torch.equal(out.sequences[b, -3:], single.sequences[0, -3:])
        for step, logits in enumerate(single.logits):
            torch.testing.assert_close(out.logits[step][b], logits[0], atol=2e-4, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: PAI(alpha=-0.5), "alpha must be >= 0"),
    (lambda: ScaleKeys(-1.0), "alpha must be >= 0"),
    (lambda: VAR(p=1.5), r"fraction must be in \[0, 1\]"),
    (lambda: HeadMask("3.1", scale=-1), "head scale must be >= 0"),
    (lambda: attnscope.steer.parse("paii:alpha=1"), "unknown method"),
    (lambda: attnscope.steer.parse("pai:alpha"), "key=value"),
])
def test_bad_hyper_parameters_fail_clearly(make, message):
    with pytest.raises(SteerError, match=message):
        make()


@pytest.mark.parametrize("items, message", [
    ([PAI()], "text model with no image tokens"),
    ([PAI(layers=[31], keys=[1])], "out of range"),
    ([HeadMask("3.9")], "out of range"),
    ([HeadMask("3.1"), HeadScale({(3, 1): 2.0})], "conflicting head edits"),
    ([attnscope.steer.FastV(k=2)], "text model with no image tokens"),
    ([attnscope.steer.KeepSchedule({40: 0.5}, role="text")], "beyond the 30 layers"),
    ([attnscope.steer.VCD()], "needs an image input"),
    ([VAR()], "text model with no image tokens"),
])
def test_bad_edits_fail_before_touching_the_model(smollm, x, items, message):
    before = state(smollm)
    with torch.no_grad():
        plain = smollm.hf(**x).logits
        with pytest.raises(SteerError, match=message), steer(smollm, *items):
            smollm.hf(**x)
        assert state(smollm) == before
        assert torch.equal(smollm.hf(**x).logits, plain)


def test_nested_steer_is_refused_and_the_outer_survives(smollm, x):
    before = state(smollm)
    with torch.no_grad(), steer(smollm, PAI(keys=[5])):
        inside = smollm.hf(**x).logits
        with pytest.raises(SteerError, match="already inside a steer block"), steer(smollm, HeadMask("3.1")):
            pass
        assert torch.equal(smollm.hf(**x).logits, inside)
    assert state(smollm) == before


def test_cli_strings_build_methods():
    m = attnscope.steer.parse("pai:alpha=0.2,layers=2:30,keys=5/6/7")
    assert (m.alpha, m.layers, m.keys) == (0.2, slice(2, 30), [5, 6, 7])
    assert attnscope.steer.parse("heads:heads=3.1+5.2,scale=0").heads == [(3, 1), (5, 2)]
    assert attnscope.steer.parse("keep:schedule=2@0.5+16@0.25").schedule == {2: 0.5, 16: 0.25}
    assert attnscope.steer.parse("fastv").k == 2
