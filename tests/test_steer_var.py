"""VAR's image-centric heads chosen once at prefill (`heads_at="prefill"`, the default) or tested again at every decode
step (`heads_at="step"`), on SmolLM2-135M (real weights) with a text span standing in for the image: each form equals
an independent eager implementation of its own rule (a patched eager attention) at every generated step; the two
forms are bit-identical at prefill, where the stored choice is exactly the prefill's rho test; later steps edit the
stored heads, so the forms part from there. Decode steps: layers with no chosen head run the backend alone, no chosen
head at all is the unsteered model bit for bit, and the sinks found at decode steps equal a recomputation."""
from __future__ import annotations

import torch

from attnscope.steer import VAR, steer
from bench_modules import eager_anchor, var_last_row

PROMPT = "Tom's favourite colour is blue. Anna's favourite colour is green. Anna's favourite colour is"
SPAN, P, RHO, NEW = [5, 6, 7], 0.6, 0.2, 4
TAU = 28.5  # SmolLM2 here: generated tokens cross it in some middle layers and fall below it in the next


def anchors_var(hf, sinks: dict, once: bool, chosen: dict):
    """VAR on eager attention weights: the last row's sink mass moves to SPAN in heads whose SPAN share of the
    non-sink mass is >= RHO; with `once`, heads are chosen at the prefill (the forward with several queries) and
    stored in `chosen`, and decode steps use the stored heads (bench/anchors.py's patched eager_attention_forward,
    layers 2 and up)."""
    span = torch.tensor(SPAN)

    def var(module, probs):
        layer = module.layer_idx
        sink = torch.tensor([i for i in sinks[layer] if i < probs.shape[-1]], dtype=torch.long)
        reuse = once and probs.shape[2] == 1  # a decode step: the heads stored at prefill
        probs, test = var_last_row(probs, sink, span, P, RHO, chosen[layer][..., None] if reuse else None)
        if once and probs.shape[2] > 1:
            chosen[layer] = test[..., 0]
        return probs

    return eager_anchor(hf, range(2, hf.config.num_hidden_layers), probs=var)


def stored_choice(state, layer: int, n: int = 0):
    """The heads the `n`-th VAR edit of the block chose at prefill in `layer` ([B, H])."""
    found = [v for k, v in state.per_row.items() if k[:3] == ("var_heads", "text", layer)]
    return found[n]


def generate(model, x):
    return model.generate(**x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def test_heads_chosen_at_prefill_are_the_prefill_test_and_are_reused_at_every_step(smollm):
    x = smollm.encode(PROMPT)
    out, states = {}, {}
    with torch.no_grad():
        for mode in ("prefill", "step"):
            with steer(smollm, VAR(p=P, rho=RHO, keys=SPAN, heads_at=mode)) as session:
                out[mode] = generate(smollm, x)
            states[mode] = session.state
        sinks = {layer: sorted(states["prefill"].sink.pos[("text", layer)][0]) for layer in range(2, 30)}
        assert all(0 in s for s in sinks.values())  # SmolLM2's first-token sink, found by massive activations
        chosen, ref = {}, {}
        for mode in ("prefill", "step"):
            with anchors_var(smollm.hf, sinks, once=mode == "prefill", chosen=chosen):
                ref[mode] = generate(smollm, x)

    # each form equals its own rule, done independently on eager attention weights, at every step
    for mode in ("prefill", "step"):
        assert torch.equal(out[mode].sequences, ref[mode].sequences)
        for a, b in zip(out[mode].logits, ref[mode].logits):
            torch.testing.assert_close(a, b, atol=5e-4, rtol=0)
    # the stored choice is the prefill's own rho test, and some heads are chosen, some not
    stored = {layer: stored_choice(states["prefill"], layer) for layer in range(2, 30)}
    for layer in range(2, 30):
        assert torch.equal(stored[layer], chosen[layer]), layer
    n = sum(int(s.sum()) for s in stored.values())
    assert 0 < n < 28 * 9
    assert not states["step"].per_row  # the per-step form stores nothing
    # the same prefill bit for bit; decode steps part, since they use the stored heads instead of testing again
    assert torch.equal(out["prefill"].logits[0], out["step"].logits[0])
    assert max(float((a - b).abs().max()) for a, b in zip(out["prefill"].logits[1:], out["step"].logits[1:])) > 1e-2


def test_decode_steps_edit_only_the_stored_heads(smollm):
    """At a decode step the explicit rows cover exactly the heads chosen at prefill: layers where none was chosen
    run on the backend untouched (no patch), the others patch only their chosen heads."""
    x = smollm.encode(PROMPT)
    seen = {}
    import attnscope.steer.session as session_module

    original = session_module._SiteHandler._patch

    def spy(self, ctx, call, output):
        if ctx.state.step > 0:
            seen.setdefault(ctx.site.layer, set()).update(h for _, heads, _, _ in ctx.patch for h in heads.tolist())
        return original(self, ctx, call, output)

    entered = set()
    before = session_module._SiteHandler.before

    def spy_before(self, call):
        if self.session.state.step > 0:
            entered.add(self.site.layer)
        return before(self, call)

    session_module._SiteHandler._patch = spy
    session_module._SiteHandler.before = spy_before
    try:
        with torch.no_grad(), steer(smollm, VAR(p=P, rho=0.3, keys=SPAN)) as session:
            generate(smollm, x)
    finally:
        session_module._SiteHandler._patch = original
        session_module._SiteHandler.before = before
    stored = {layer: stored_choice(session.state, layer)[0] for layer in range(2, 30)}
    expected = {layer: set(s.nonzero()[:, 0].tolist()) for layer, s in stored.items() if bool(s.any())}
    assert expected and len(expected) < 28  # some layers keep SDPA at every decode step
    assert seen == expected
    assert entered == set(expected)  # the others do not even enter the handler: the backend runs alone


def test_no_chosen_head_is_the_unsteered_model_bit_for_bit(smollm):
    """rho=1: no head of this prompt passes the test at prefill (asserted), so the explicit rows computed there are
    left to the backend and decode steps never enter the handler: the logits are the unsteered model's, bit for bit."""
    x = smollm.encode(PROMPT)
    with torch.no_grad():
        plain = generate(smollm, x)
        with steer(smollm, VAR(p=P, rho=1.0, keys=SPAN)) as session:
            same = generate(smollm, x)
    assert session.state.per_row and not any(bool(c.any()) for c in session.state.per_row.values())
    assert torch.equal(plain.sequences, same.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, same.logits))


def test_sinks_found_at_decode_steps_equal_a_recomputation(smollm):
    """Massive activations with a low tau, so that generated tokens become sinks in some layers: after every forward
    of a generation the cumulative sink maps equal a recomputation from the decoder layers' inputs recorded in the
    same run (a token is a sink from the first layer where its largest |activation| reaches tau x the prompt's median
    mean |activation|), including a token that crossed in a layer below and not in this one."""
    x = smollm.encode(PROMPT)
    n = x["input_ids"].shape[1]
    seen: dict[int, list] = {}
    snaps: list = []

    def record(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(smollm.hf.model.layers)]
    try:
        with torch.no_grad(), steer(smollm, VAR(p=P, rho=RHO, keys=SPAN, tau=TAU)) as session:
            hooks.append(smollm.hf.register_forward_hook(lambda *a: snaps.append(
                {k: sorted(v[0]) for k, v in session.state.sink.pos.items()})))
            generate(smollm, x)
    finally:
        for h in hooks:
            h.remove()
    assert len(snaps) == NEW
    carried = False
    for step, snap in enumerate(snaps):
        found: set = set()
        for layer in range(30):
            hs = torch.cat(seen[layer][: step + 1], 1)[0]  # the layer's inputs so far [n + step, D]
            scale = hs[:n].abs().mean(-1).median().clamp_min(1e-6)
            new = set((hs.abs().amax(-1) >= TAU * scale).nonzero()[:, 0].tolist())
            carried |= step > 0 and n + step - 1 in found - new  # this step's token: a sink from a layer below only
            found |= new
            assert snap[("text", layer)] == sorted(found), (step, layer)
    assert carried


def test_two_var_edits_each_keep_their_own_heads(smollm):
    """Two VAR methods in one block (other target spans, the same layers): each edit's decode steps use the heads it
    chose itself at prefill, as two VAR rules applied one after the other on eager weights do (the second one tested
    on the first one's output), not the other edit's choice."""
    x = smollm.encode(PROMPT)
    other = [10, 11, 12]
    with torch.no_grad():
        with steer(smollm, VAR(p=P, rho=0.3, keys=SPAN), VAR(p=P, rho=0.3, keys=other)) as session:
            out = generate(smollm, x)
        assert all(sorted(session.state.sink.pos[("text", layer)][0]) == [0] for layer in range(2, 30))
        chosen = {}

        def var(module, probs):
            layer = module.layer_idx
            reuse = probs.shape[2] == 1
            for name, span in (("a", SPAN), ("b", other)):
                probs, test = var_last_row(probs, torch.tensor([0]), torch.tensor(span), P, 0.3,
                                           chosen[name, layer][..., None] if reuse else None)
                if not reuse:
                    chosen[name, layer] = test[..., 0]
            return probs

        with eager_anchor(smollm.hf, range(2, smollm.hf.config.num_hidden_layers), probs=var):
            ref = generate(smollm, x)
    assert any(not torch.equal(chosen["a", layer], chosen["b", layer]) for layer in range(2, 30))  # the choices differ
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=0)
    for layer in range(2, 30):
        assert torch.equal(stored_choice(session.state, layer, 0), chosen["a", layer])
        assert torch.equal(stored_choice(session.state, layer, 1), chosen["b", layer])


def test_two_var_edits_with_different_tau_are_refused(smollm):
    """The sink maps are measured once per sequence with one tau: two VAR methods asking for different ones would
    silently share the last one's; the block refuses them before touching the model (one tau is fine)."""
    import pytest
    from attnscope.steer import SteerError

    with pytest.raises(SteerError, match="tau"):
        with steer(smollm, VAR(p=P, rho=RHO, keys=SPAN, tau=50), VAR(p=P, rho=RHO, keys=[10, 11], tau=100)):
            pass
    assert not smollm.hf._forward_pre_hooks and not smollm.hf._forward_hooks
    with steer(smollm, VAR(p=P, rho=RHO, keys=SPAN, tau=50), VAR(p=P, rho=RHO, keys=[10, 11], tau=50)):
        pass


def test_sinks_inside_the_span_are_no_target(smollm):
    """VAR's sinks are image tokens themselves: a span that holds a sink (here the first token, SmolLM2's sink)
    redistributes onto its non-sink keys only, and the rho test counts only those; the eager anchor follows the same
    rule (bench/anchors.py), step by step."""
    x = smollm.encode(PROMPT)
    span = [0] + SPAN
    with torch.no_grad():
        with steer(smollm, VAR(p=P, rho=RHO, keys=span)) as session:
            out = generate(smollm, x)
        sinks = {layer: sorted(session.state.sink.pos[("text", layer)][0]) for layer in range(2, 30)}
        assert all(s == [0] for s in sinks.values())
        chosen = {}

        def var(module, probs):
            layer = module.layer_idx
            reuse = probs.shape[2] == 1
            probs, test = var_last_row(probs, torch.tensor([0]), torch.tensor(span), P, RHO,
                                       chosen[layer][..., None] if reuse else None)
            if not reuse:
                chosen[layer] = test[..., 0]
            return probs

        with eager_anchor(smollm.hf, range(2, smollm.hf.config.num_hidden_layers), probs=var):
            ref = generate(smollm, x)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=0)
