"""Contrastive decoding (VCD, M3ID, RITUAL, DeCoRe) and the prompt-measured methods (VHR, imbalanced-attention fix).

The combination each method states is checked against plain forwards of its two branches at the first step; the
`LogitsProcessor` form gives the same scores as the in-block form at every step (so the branch's cache and token
feeding are right); VHR reinforces exactly the heads of highest vision-aware head divergence, which equals
`heads.vhd`. Mechanics on tiny random LLaVA and on SmolLM2 (text: the "image-free" branch drops a context span)."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import Llava, get

from attnscope import heads
from attnscope.steer import (
    M3ID,
    RITUAL,
    VCD,
    VHR,
    ContrastiveProcessor,
    DeCoRe,
    HeadMask,
    ImbalanceFix,
    NoisedImage,
    TransformedImage,
    steer,
)
from attnscope.steer.session import remove_positions

NEW = 3
PROMPT = "Tom's favourite colour is blue. Anna's favourite colour is green. Anna's favourite colour is"


def gen(m, x, **kw):
    with torch.no_grad():
        return m.generate(**x, max_new_tokens=NEW, do_sample=False, output_logits=True, output_scores=True,
                          return_dict_in_generate=True, **kw)


def last(m, x):
    with torch.no_grad():
        return m.hf(**x).logits[:, -1].float()


def cutoff(expected, base, beta):
    p = base.softmax(-1)
    return expected.masked_fill(p < beta * p.amax(-1, keepdim=True), float("-inf"))


def assert_logits(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=0)


def test_vcd_combines_with_the_noised_image_branch():
    arch = get(Llava)
    out = gen(arch.m, arch.inputs)
    with steer(arch.m, VCD(alpha=1.0, beta=0.1)):
        steered = gen(arch.m, arch.inputs)
    base = last(arch.m, arch.inputs)
    noised = last(arch.m, NoisedImage(500, seed=0).inputs(arch.m, arch.inputs))
    assert not torch.allclose(base, noised)
    assert_logits(steered.logits[0][0].float(), cutoff(2 * base - noised, base, 0.1)[0])
    assert steered.sequences.shape == out.sequences.shape


def test_ritual_complements_with_the_transformed_image_branch():
    arch = get(Llava)
    with steer(arch.m, RITUAL(alpha=3.0, beta=0.1, seed=1)):
        steered = gen(arch.m, arch.inputs)
    base = last(arch.m, arch.inputs)
    kind, pv = TransformedImage(seed=1).transform(arch.inputs["pixel_values"])
    other = last(arch.m, dict(arch.inputs, pixel_values=pv))
    assert_logits(steered.logits[0][0].float(), cutoff(base + 3.0 * other, base, 0.1)[0])


@pytest.mark.parametrize("make", [lambda: VCD(), lambda: M3ID(lam=0.5), lambda: RITUAL(), lambda: DeCoRe("1.1+0.2")],
                         ids=["vcd", "m3id", "ritual", "decore"])
def test_logits_processor_equals_the_steer_block_at_every_step(make):
    arch = get(Llava)
    with steer(arch.m, make()):
        inside = gen(arch.m, arch.inputs)
    proc = ContrastiveProcessor(arch.m, make(), inputs=arch.inputs)
    outside = gen(arch.m, arch.inputs, logits_processor=[proc])
    assert torch.equal(inside.sequences, outside.sequences)
    for a, b in zip(inside.logits, outside.scores):
        assert_logits(a.float(), b.float())


def test_m3id_starts_as_the_plain_model_and_then_contrasts_a_span_free_branch(smollm):
    x = smollm.encode(PROMPT)
    span = [5, 6]  # " blue." : the branch reads the prompt without them
    with steer(smollm, M3ID(lam=0.5, beta=0.0, drop=span)):
        steered = gen(smollm, x)
    plain = gen(smollm, x)
    torch.testing.assert_close(steered.logits[0], plain.logits[0], atol=0, rtol=0)  # w_0 = 0
    # step 1, by hand: w_1 = (1 - g) / g with g = exp(-0.5)
    fed = torch.cat([x["input_ids"], steered.sequences[:, x["input_ids"].shape[1]:][:, :1]], 1)
    main = last(smollm, {"input_ids": fed})
    branch = last(smollm, {"input_ids": remove_positions(smollm, {"input_ids": fed}, span)["input_ids"]})
    g = math.exp(-0.5)
    torch.testing.assert_close(steered.logits[1].float(), main + (1 - g) / g * (main - branch), atol=2e-3, rtol=0)


def test_decore_contrasts_with_the_masked_heads_branch_weighted_by_entropy(smollm):
    x = smollm.encode(PROMPT)
    masked_heads = "20.1+21.5+22.2"
    with steer(smollm, DeCoRe(masked_heads, alpha=1.0, beta=0.1)):
        steered = gen(smollm, x)
    base = last(smollm, x)
    with steer(smollm, HeadMask(masked_heads)):
        masked = last(smollm, x)
    p = base.softmax(-1)
    w = (-(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True)) / math.log(base.shape[-1])
    assert_logits(steered.logits[0].float()[0], cutoff((1 + w) * base - w * masked, base, 0.1)[0])
    with torch.no_grad():  # the masking lived only in the branch
        assert torch.equal(last(smollm, x), base)


def test_vhr_reinforces_the_heads_of_highest_divergence():
    arch = get(Llava)
    method = VHR(alpha=2.0, top=0.25)
    with torch.no_grad(), steer(arch.m, method) as session:
        arch.hf(**arch.inputs)
    vhd = session.state.data["vhd"]
    table = heads.vhd(arch.m, arch.inputs)
    for layer, values in vhd.items():
        for h, v in enumerate(values[0].tolist()):
            assert table[("language", layer, h)] == pytest.approx(v, abs=1e-5)
    gates = next(e for e in session.edits if hasattr(e, "table") and e.table).table
    flat = torch.cat([vhd[layer][0] for layer in sorted(vhd)])
    chosen = torch.cat([gates[layer][0] for layer in sorted(vhd)]) == 2.0
    k = round(0.25 * flat.numel())
    assert int(chosen.sum()) == k
    assert set(chosen.nonzero()[:, 0].tolist()) == set(flat.topk(k).indices.tolist())


def test_imbalance_fix_selects_image_tokens_and_modulates_by_head_sensitivity():
    arch = get(Llava)
    with torch.no_grad(), steer(arch.m, ImbalanceFix(alpha=1.0, select=0.25)) as session:
        steered = arch.hf(**arch.inputs).logits
        plain = None
    with torch.no_grad():
        plain = arch.hf(**arch.inputs).logits
    data = session.state.data
    chosen = data["imbalance_keys"][0].nonzero()[:, 0].tolist()
    image = [i for i, t in enumerate(arch.inputs["input_ids"][0].tolist()) if t == 100]
    assert chosen and set(chosen) <= set(image) and 4 <= len(chosen) <= 8  # 25% of 16 from each of two streams
    for layer, bias in data["imbalance_bias"].items():
        s = data["visual_sensitivity"][layer]
        torch.testing.assert_close(bias, torch.log1p(s / s.amax(-1, keepdim=True)))
    assert not torch.equal(steered[:, -1], plain[:, -1]) and torch.equal(steered[:, :-1], plain[:, :-1])


@pytest.mark.parametrize("make", [lambda: VCD(), lambda: RITUAL()], ids=["vcd", "ritual"])
@pytest.mark.parametrize("capture_first", [False, True], ids=["capture-inside", "capture-outside"])
def test_a_capture_beside_a_contrastive_decoder_records_only_the_main_sequence(scene_vlm, make, capture_first):
    """A contrastive branch (VCD's noised image, RITUAL's transformed one) is an extra forward of the same model: a
    capture open beside the steer block must not record it under the main sequence's steps (these methods edit no
    attention, so their branch ran with no handler of its own). One record per layer and step, and the prefill's
    rows equal an unsteered capture's (the main forward is not edited; only its logits are combined)."""
    import attnscope

    x = scene_vlm.encode("Is there a cat?", image="chelsea")
    with torch.no_grad():
        with attnscope.capture(scene_vlm, streams="language", queries="last") as plain:
            scene_vlm(**x)
        capture = attnscope.capture(scene_vlm, streams="language", queries="last")
        outer, inner = (capture, steer(scene_vlm, make())) if capture_first else (steer(scene_vlm, make()), capture)
        with outer, inner:
            scene_vlm.hf.generate(**x, max_new_tokens=3, do_sample=False)
    run = capture.trace.runs[0]
    assert len(capture.trace.runs) == 1 and run.steps == 2
    for (stream, layer), recs in run.records.items():
        assert [r.step for r in recs] == [0, 1, 2], (layer, [r.step for r in recs])
        assert torch.equal(recs[0].probs, plain.runs[0].records[(stream, layer)][0].probs)
