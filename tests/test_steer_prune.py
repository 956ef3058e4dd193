"""Token dropping and every method inside `generate` with the KV cache, on tiny random LLaVA-1.5 (CLIP tower) and
LLaVA with a DINOv2 tower (mechanics only: random weights say nothing about quality).

A pruned model must attend exactly as the unpruned model with the dropped keys masked from layer K on, at every
generated step: that proves the dropped tokens are gone from hidden states and cache and that the kept tokens and
the new ones keep their position ids (RoPE) and masks. Pruning 0% is the identity bit for bit."""
from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, Llava, LlavaDinov2, _llama_text, get
from transformers import LlavaConfig, LlavaForConditionalGeneration

import attnscope
from attnscope.core import seam
from attnscope.core.dispatch import registered_names
from attnscope.steer import (
    PAI,
    RITUAL,
    VAR,
    VCD,
    VHR,
    VTCCLS,
    DeCoRe,
    DropTokens,
    FastV,
    HeadMask,
    ImbalanceFix,
    KeepSchedule,
    M3ID,
    MaskKeys,
    PyramidDrop,
    SteerError,
    steer,
)

NEW = 3


class Llava4(Llava):
    """The tiny LLaVA with a 4-layer language model, for multi-stage schedules."""

    name = "llava4"

    def build(self):
        text = _llama_text()
        text.num_hidden_layers = 4
        cfg = LlavaConfig(vision_config=self.vision_config(), text_config=text, image_token_index=IMAGE_TOKEN,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
        cfg._attn_implementation = "sdpa"
        return LlavaForConditionalGeneration(cfg)


ARCHS = [Llava, LlavaDinov2]


def gen(arch, inputs=None, **kw):
    with torch.no_grad():
        return arch.m.generate(**(inputs or arch.inputs), max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, **kw)


def image_positions(ids) -> list[int]:
    return [i for i, t in enumerate(ids.tolist()) if t == IMAGE_TOKEN]


def state(arch):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in arch.hf.modules())
    return arch.hf.config.text_config._attn_implementation, hooks, registered_names()


def assert_same_logits(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


METHODS = {
    "pai": lambda: PAI(layers=[1]), "var": lambda: VAR(layers=[1], rho=0.0, tau=5.0), "vhr": lambda: VHR(),
    "imbalance": lambda: ImbalanceFix(), "heads": lambda: HeadMask("1.0+0.3"), "decore": lambda: DeCoRe("1.1"),
    "vcd": lambda: VCD(), "m3id": lambda: M3ID(), "ritual": lambda: RITUAL(), "fastv": lambda: FastV(k=1),
    "pyramiddrop": lambda: PyramidDrop(stages=2), "vtc_cls": lambda: VTCCLS(keep=0.5),
    "keep": lambda: KeepSchedule({1: 0.25}),
}


@pytest.mark.parametrize("cls", ARCHS, ids=lambda c: c.name)
def test_every_method_runs_inside_generate_and_restores(cls):
    arch = get(cls)
    plain = gen(arch)
    before = state(arch)  # after a first generate: transformers installs its own output recorders then
    for name, make in METHODS.items():
        with steer(arch.m, make()) as session:
            out = gen(arch)
        assert out.sequences.shape == plain.sequences.shape, name
        assert session.state.step == NEW - 1, name
        assert state(arch) == before, name
    assert_same_logits(gen(arch), plain, atol=0)


@pytest.mark.parametrize("cls", ARCHS, ids=lambda c: c.name)
def test_fastv_equals_masking_the_dropped_keys(cls):
    arch = get(cls)
    with steer(arch.m, FastV(k=1, keep=0.5)) as session:
        pruned = gen(arch)
    kept = session.state.kept[("language", 1)][0].tolist()
    image = image_positions(arch.inputs["input_ids"][0])
    dropped = [p for p in image if p not in kept]
    assert len(dropped) == len(image) // 2
    prompt = arch.inputs["input_ids"].shape[1]
    cache = seam.output_cache(pruned)
    assert cache.layers[0].keys.shape[-2] == prompt + NEW - 1
    assert cache.layers[1].keys.shape[-2] == prompt + NEW - 1 - len(dropped)  # gone from the cache after layer K
    assert kept[-NEW + 1:] == list(range(prompt, prompt + NEW - 1))  # generated tokens keep their positions
    with steer(arch.m, MaskKeys(layers=[1], keys=dropped)):
        masked = gen(arch)
    assert_same_logits(pruned, masked)


def test_fastv_keeps_the_most_attended_image_tokens():
    arch = get(Llava)
    with torch.no_grad(), attnscope.capture(arch.m, streams="language", layers=0, queries="last") as trace:
        arch.hf(**arch.inputs)
    image = image_positions(arch.inputs["input_ids"][0])
    scores = trace.attention("language", 0)[0, :, 0].mean(0)[image]
    expect = sorted(image[i] for i in scores.topk(len(image) // 2).indices.tolist())
    with torch.no_grad(), steer(arch.m, FastV(k=1, keep=0.5)) as session:
        arch.hf(**arch.inputs)
    kept = session.state.kept[("language", 1)][0].tolist()
    assert [p for p in kept if p in image] == expect


@pytest.mark.parametrize("cls", ARCHS, ids=lambda c: c.name)
def test_vtc_cls_drops_before_the_language_model_by_tower_cls_attention(cls):
    arch = get(cls)
    with steer(arch.m, VTCCLS(keep=0.25)) as session:
        pruned = gen(arch)
    kept = session.state.kept[("language", 0)][0].tolist()
    image = image_positions(arch.inputs["input_ids"][0])
    dropped = [p for p in image if p not in kept]
    assert len(dropped) == len(image) - len(image) // 4
    prompt = arch.inputs["input_ids"].shape[1]
    cache = seam.output_cache(pruned)
    assert all(layer.keys.shape[-2] == prompt + NEW - 1 - len(dropped) for layer in cache.layers)
    # the kept patches are those the tower's CLS attends to most, at the layer the projector reads
    n = arch.m.streams["vision"]
    with torch.no_grad(), attnscope.capture(arch.m, streams="vision", layers=n - 2, queries="cls") as trace:
        arch.hf(**arch.inputs)
    cls_att = trace.attention("vision", n - 2)[0, :, 0].mean(0)[1:]
    assert sorted(image[i] for i in cls_att.topk(len(image) // 4).indices.tolist()) == [p for p in kept if p in image]
    with steer(arch.m, MaskKeys(layers=range(2), keys=dropped)):
        masked = gen(arch)
    assert_same_logits(pruned, masked)


def test_pyramid_and_user_schedule_drop_in_stages():
    arch = get(Llava4)
    image = image_positions(arch.inputs["input_ids"][0])
    prompt = arch.inputs["input_ids"].shape[1]
    with steer(arch.m, PyramidDrop(stages=4, ratio=0.5)) as session:
        out = gen(arch)
    lengths = [layer.keys.shape[-2] - (NEW - 1) for layer in seam.output_cache(out).layers]
    assert lengths == [prompt, prompt - 8, prompt - 12, prompt - 14]  # 16 image tokens -> 16, 8, 4, 2
    kept = {k[1]: set(v[0].tolist()) for k, v in session.state.kept.items()}
    assert kept[3] <= kept[2] <= kept[1]
    schedule = {1: 0.5, 3: 0.25}
    with steer(arch.m, KeepSchedule(schedule)) as session:
        user = gen(arch)
    kept = {k[1]: v[0].tolist() for k, v in session.state.kept.items()}
    masks = [MaskKeys(layers=[layer], keys=[p for p in image if p not in kept[layer]]) for layer in (1, 2, 3)]
    with steer(arch.m, *masks):
        masked = gen(arch)
    assert_same_logits(user, masked)


@pytest.mark.parametrize("cls", ARCHS, ids=lambda c: c.name)
def test_pruning_nothing_is_the_identity(cls):
    arch = get(cls)
    plain = gen(arch)
    for method in (FastV(k=1, keep=1.0), VTCCLS(keep=1.0), KeepSchedule({0: 1.0, 1: 1.0}, rank="vision_cls")):
        with steer(arch.m, method) as session:
            out = gen(arch)
        assert session.edits == []
        assert_same_logits(out, plain, atol=0)


def test_padded_batch_rows_equal_their_single_runs():
    """Two prompts of different lengths, left-padded: with PAI + FastV each row generates what it does alone."""
    arch = get(Llava)
    ids = arch.inputs["input_ids"]
    longer = torch.cat([torch.tensor([[1, 11, 12, 13]]), ids[:, 1:]], 1)
    shorter = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    batch = {"input_ids": torch.cat([shorter, longer]), "attention_mask": torch.cat([(shorter != 0).long(),
             torch.ones_like(longer)]), "pixel_values": torch.cat([arch.inputs["pixel_values"]] * 2)}
    items = lambda: [PAI(layers=[1], alpha=1.0), FastV(k=1, keep=0.5)]  # noqa: E731
    with steer(arch.m, *items()):
        both = gen(arch, batch)
        alone = [gen(arch, {"input_ids": r, "attention_mask": torch.ones_like(r),
                            "pixel_values": arch.inputs["pixel_values"]}) for r in (ids, longer)]
    for b, single in enumerate(alone):
        assert torch.equal(both.sequences[b, -NEW:], single.sequences[0, -NEW:])
        for step, logits in enumerate(single.logits):
            torch.testing.assert_close(both.logits[step][b], logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: FastV(k=1, keep=1.5), r"\[0, 1\]"),
    (lambda: FastV(k=0), "K must be >= 1"),
    (lambda: DropTokens({1: 0.25, 2: 0.5}), "must not grow"),
    (lambda: DropTokens({0: 0.5}), None),  # fine as an object; refused on a model (rank by attention at K=0)
])
def test_bad_schedules(make, message):
    if message is None:
        make()
        return
    with pytest.raises(SteerError, match=message):
        make()


@pytest.mark.parametrize("items, message", [
    (lambda: [FastV(k=5)], "beyond the 2 layers"),
    (lambda: [DropTokens({0: 0.5})], "at K=0 there is none"),
    (lambda: [FastV(k=1), VTCCLS()], "conflict"),
    (lambda: [VTCCLS(layers=[7])], "out of range"),
])
def test_bad_pruning_leaves_the_model_untouched(items, message):
    arch = get(Llava)
    gen(arch)
    before = state(arch)
    with pytest.raises(SteerError, match=message), steer(arch.m, *items()):
        gen(arch)
    assert state(arch) == before


def test_text_only_prompt_says_there_are_no_image_tokens():
    arch = get(Llava)
    text = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    gen(arch)
    before = state(arch)
    for method in (FastV(k=1), PAI(layers=[1]), VCD()):
        with pytest.raises(SteerError, match="has none in the language stream|no pixel_values"), steer(arch.m, method):
            gen(arch, text)
        assert state(arch) == before


def test_capture_inside_fastv_labels_pruned_layers_with_the_kept_positions():
    """A capture inside a pruning steer block labels a pruned layer's keys with the original positions steer kept
    (never 0..K-1, never a window), and its rows equal those of the same model with the dropped keys masked."""
    arch = get(Llava)
    with torch.no_grad(), steer(arch.m, FastV(k=1, keep=0.5)) as session, \
            attnscope.capture(arch.m, streams="language", layers=[1]) as pruned:
        arch.hf(**arch.inputs)
    kept = session.state.kept[("language", 1)][0].tolist()
    rec = pruned.record("language", 1)
    assert rec.keys == kept and rec.queries == kept and len(kept) < arch.inputs["input_ids"].shape[1]
    dropped = [p for p in range(arch.inputs["input_ids"].shape[1]) if p not in kept]
    with torch.no_grad(), steer(arch.m, MaskKeys(layers=[1], keys=dropped)), \
            attnscope.capture(arch.m, streams="language", layers=[1], queries=kept, keys=kept) as masked:
        arch.hf(**arch.inputs)
    torch.testing.assert_close(rec.probs, masked.attention("language", 1), atol=1e-5, rtol=0)


def test_vtc_cls_under_beam_search_is_refused_by_name(scene_vlm):
    """Beam search repeats the prompt's rows but runs the vision tower once: VTC-CLS's tower scores then cover fewer
    images than the language batch holds. Before, this was an IndexError from inside the score mapping."""
    x = scene_vlm.encode("Is there a cat?", image="chelsea")
    with pytest.raises(SteerError, match="beam search"), torch.no_grad(), steer(scene_vlm, VTCCLS(keep=0.3)):
        scene_vlm.hf.generate(**x, max_new_tokens=2, do_sample=False, num_beams=2)
    with torch.no_grad(), steer(scene_vlm, VTCCLS(keep=0.3)):  # one beam: still ranks and generates
        scene_vlm.hf.generate(**x, max_new_tokens=2, do_sample=False)
