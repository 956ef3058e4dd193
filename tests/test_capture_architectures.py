"""Capture on randomly initialised tiny models of six architectures (no hub, no weights):
GPT-2, ViT, CLIP (text + vision), LLaVA-1.5 (CLIP tower + Llama with GQA), LLaVA with a DINOv2 tower, Qwen2-VL.

For each: outputs under capture are bit-identical to outputs without it (sdpa both times); captured probabilities
equal eager `output_attentions=True` to 1e-5 for every stream, layer and part; every config's attention
implementation is restored after the block, also when it raises; generate records one row per step; token
roles map image patches back to their grid."""
from __future__ import annotations

import pytest
import torch

from transformers import LlamaForCausalLM

import attnscope
from attnscope.core.dispatch import registered_names
from tiny_models import (  # builders shared with the steer tests
    ATOL,
    GRID,
    IMAGE,
    IMAGE_TOKEN,
    PATCH,
    QWEN_GRID,
    ARCHS,
    CLIP,
    GPT2,
    Llava,
    LlavaDinov2,
    Qwen2VL,
    ViT,
    _built,
    _llama_text,
    eager,
    get,
    impl_snapshot,
)


@pytest.fixture(params=ARCHS, ids=lambda c: c.name)
def arch(request):
    return get(request.param)


def captured(trace, run=-1) -> dict[tuple[str, int, int], torch.Tensor]:
    return {(s, layer, r.part): r.probs for (s, layer), recs in trace.run(run).records.items() for r in recs
            if r.step == 0}


# --- 1. outputs bit-identical --------------------------------------------------------------------------------
def test_outputs_bit_identical(arch):
    with torch.no_grad():
        plain = arch.outputs(arch.hf(**arch.inputs))
        with attnscope.capture(arch.m) as trace:
            inside = arch.outputs(arch.hf(**arch.inputs))
        after = arch.outputs(arch.hf(**arch.inputs))
    assert trace.runs and trace.run().records
    for a, b, c in zip(plain, inside, after):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert set(trace.provenance["backend"].values()) == {"sdpa"}


# --- 2. probabilities equal eager --------------------------------------------------------------------------
def test_probabilities_match_eager(arch):
    ref = arch.reference()
    with torch.no_grad(), attnscope.capture(arch.m) as trace:
        arch.hf(**arch.inputs)
    got = captured(trace)
    streams = arch.m.streams
    assert {(s, layer) for s, layer, _ in got} == {(s, i) for s, n in streams.items() for i in range(n)}
    assert set(got) == set(ref)
    for key, probs in got.items():
        assert probs.dtype == torch.float32
        assert probs.shape == ref[key].shape, key
        torch.testing.assert_close(probs, ref[key].float(), atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_qwen2_vl_vision_routes_through_interface_once_per_image():
    """Qwen2-VL's vision attention calls the interface once per image (cu_seqlens chunk): parts 0, 1;
    the language model once per layer; nothing bypasses the interface in a plain forward."""
    arch = get(Qwen2VL)
    with torch.no_grad(), attnscope.capture(arch.m) as trace:
        arch.hf(**arch.inputs)
    sizes = QWEN_GRID.prod(-1).tolist()
    for layer in range(2):
        recs = trace.run().records[("vision", layer)]
        assert [(r.step, r.part) for r in recs] == [(0, k) for k in range(len(sizes))]
        assert [tuple(r.probs.shape) for r in recs] == [(1, 4, n, n) for n in sizes]
        assert [len(r.queries) for r in recs] == sizes
        assert len(trace.run().records[("language", layer)]) == 1
    # streams selected one at a time each see calls: no part bypasses the interface
    for stream in ("vision", "language"):
        with torch.no_grad(), attnscope.capture(arch.m, streams=stream) as trace:
            arch.hf(**arch.inputs)
        assert {s for s, _ in trace.run().records} == {stream}


def test_qwen2_vl_vision_positions_are_absolute_across_chunks():
    arch = get(Qwen2VL)
    first = int(QWEN_GRID[0].prod())
    with torch.no_grad(), attnscope.capture(arch.m, streams="vision", queries=[first + 4]) as trace:
        arch.hf(**arch.inputs)
    rec = trace.record("vision", 0, part=1)
    assert rec.queries == [first + 4]
    assert trace.tokens("vision").patch[first + 4][0] == 1


# --- 3. attention implementation restored ------------------------------------------------------------------
def test_attn_implementation_restored(arch):
    before = impl_snapshot(arch.hf)
    assert set(before.values()) == {"sdpa"}
    with torch.no_grad(), attnscope.capture(arch.m):
        inside = impl_snapshot(arch.hf)
        arch.hf(**arch.inputs)
    assert all(v.startswith("attnscope_") for v in inside.values())
    assert impl_snapshot(arch.hf) == before
    assert registered_names() == []


def test_attn_implementation_restored_on_exception(arch):
    before = impl_snapshot(arch.hf)
    with pytest.raises(ZeroDivisionError), torch.no_grad(), attnscope.capture(arch.m):
        arch.hf(**arch.inputs)
        1 / 0  # noqa: B018
    assert impl_snapshot(arch.hf) == before
    bad = dict(arch.inputs)  # an error raised inside the forward, after some attention calls where there is a tower
    if "input_ids" in bad:
        bad["input_ids"] = torch.where(bad["input_ids"] == IMAGE_TOKEN, IMAGE_TOKEN, bad["input_ids"] + 1000)
    else:
        bad["pixel_values"] = bad["pixel_values"][:, :2]
    with pytest.raises((IndexError, ValueError, RuntimeError)), torch.no_grad(), attnscope.capture(arch.m):
        arch.hf(**bad)
    assert impl_snapshot(arch.hf) == before
    assert registered_names() == []
    with torch.no_grad():  # and the model still runs, unchanged
        assert all(torch.equal(a, b) for a, b in zip(arch.outputs(arch.hf(**arch.inputs)),
                                                      arch.outputs(arch.hf(**arch.inputs))))


# --- 4. generate ---------------------------------------------------------------------------------------------
GENERATORS = [a for a in ARCHS if a.generates]


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.name)
def test_generate_one_record_per_step(cls):
    arch = get(cls)
    stream = "text" if "text" in arch.m.streams else "language"
    prompt = arch.inputs["input_ids"].shape[1]
    with torch.no_grad():
        with attnscope.capture(arch.m, streams=stream, queries="last") as trace:
            out = arch.m.generate(**arch.inputs, max_new_tokens=3, do_sample=False)
        plain = arch.m.generate(**arch.inputs, max_new_tokens=3, do_sample=False)
        with eager(arch.hf):
            ref = arch.m.generate(**arch.inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                                  return_dict_in_generate=True)
    assert torch.equal(out, plain)
    assert out.shape[1] == prompt + 3
    # 3 new tokens take 3 forwards: prefill (step 0) and 2 decode steps; the 3rd token is never fed back
    run = trace.run()
    assert len(trace.runs) == 1 and run.steps == 2
    eager_steps = ref.attentions  # per step, per layer
    assert len(eager_steps) == 3
    for layer in range(arch.m.streams[stream]):
        recs = run.records[(stream, layer)]
        assert [(r.step, r.part) for r in recs] == [(0, 0), (1, 0), (2, 0)]
        for t, rec in enumerate(recs):
            assert rec.probs.shape == (1, rec.probs.shape[1], 1, prompt + t)
            assert rec.queries == [prompt + t - 1] and rec.keys is None
            torch.testing.assert_close(rec.probs.sum(-1), torch.ones(1, rec.probs.shape[1], 1), atol=1e-5, rtol=0)
            torch.testing.assert_close(rec.probs, eager_steps[t][layer][:, :, -1:].float(), atol=ATOL, rtol=0)
    tmap = trace.tokens(stream)
    assert len(tmap) == prompt + 2
    assert tmap.roles[prompt:] == ["generated", "generated"]
    assert "generated" not in tmap.roles[:prompt]
    assert tmap.tokens[prompt:] == [str(t) for t in out[0, prompt : prompt + 2].tolist()]


VLMS = [Llava, Qwen2VL]


def _image_tokens(arch) -> int:
    return int((arch.inputs["input_ids"] == IMAGE_TOKEN).sum())


@pytest.mark.parametrize("cls", VLMS, ids=lambda c: c.name)
def test_vlm_generate_keeps_vision_and_image_roles_in_one_run(cls):
    arch = get(cls)
    with torch.no_grad(), attnscope.capture(arch.m, queries="last") as trace:
        arch.m.generate(**arch.inputs, max_new_tokens=3, do_sample=False)
    assert len(trace.runs) == 1
    assert {s for s, _ in trace.run().records} == {"vision", "language"}
    assert all(r.step == 0 for r in trace.run().records[("vision", 0)])
    assert trace.tokens("language").roles.count("image") == _image_tokens(arch)
    assert "vision" in trace.run().tokens


@pytest.mark.parametrize("cls", VLMS, ids=lambda c: c.name)
def test_vlm_generate_vision_only_selection(cls):
    arch = get(cls)
    with torch.no_grad(), attnscope.capture(arch.m, streams="vision") as trace:
        arch.m.generate(**arch.inputs, max_new_tokens=2, do_sample=False)
    assert len(trace.runs) == 1


# --- 5. token roles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Llava, LlavaDinov2], ids=lambda c: c.name)
def test_llava_image_roles_and_key_selection(cls):
    arch = get(cls)
    with torch.no_grad(), attnscope.capture(arch.m) as full:
        arch.hf(**arch.inputs)
    with torch.no_grad(), attnscope.capture(arch.m, keys="image") as sel:
        arch.hf(**arch.inputs)
    tmap = full.tokens("language")
    ids = arch.inputs["input_ids"][0].tolist()
    image = tmap.positions("image")
    assert len(image) == GRID * GRID == (IMAGE // PATCH) ** 2
    assert image == [i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
    cells = [tmap.patch[i] for i in image]
    assert sorted(cells) == [(0, r, c) for r in range(GRID) for c in range(GRID)]  # the grid, each cell once
    assert tmap.grids == [(GRID, GRID)]
    assert tmap.image_positions(0) == image
    assert all(tmap.patch[i] is None for i in range(len(tmap)) if i not in image)
    for layer in range(2):
        rec = sel.record("language", layer)
        assert rec.keys == image
        torch.testing.assert_close(rec.probs, full.attention("language", layer)[..., image], atol=0, rtol=0)
    vmap = full.tokens("vision")
    assert vmap.roles == ["cls"] + ["image"] * GRID * GRID
    for layer in range(2):  # keys="image" on the tower: the patches, CLS excluded
        assert sel.record("vision", layer).keys == list(range(1, 1 + GRID * GRID))
        torch.testing.assert_close(sel.attention("vision", layer), full.attention("vision", layer)[..., 1:],
                                   atol=0, rtol=0)


def test_vit_vision_map_is_cls_plus_grid():
    arch = get(ViT)
    with torch.no_grad(), attnscope.capture(arch.m, queries="cls", keys="image") as trace:
        arch.hf(**arch.inputs)
    for row in range(2):
        tmap = trace.tokens("vision", row)
        assert tmap.roles == ["cls"] + ["image"] * GRID * GRID
        assert tmap.patch == [None] + [(0, i // GRID, i % GRID) for i in range(GRID * GRID)]
        assert tmap.grids == [(GRID, GRID)]
    rec = trace.record("vision", 1)
    assert rec.queries == [0] and rec.keys == list(range(1, 1 + GRID * GRID))
    assert rec.probs.shape == (2, 4, 1, GRID * GRID)


def test_clip_maps():
    arch = get(CLIP)
    with torch.no_grad(), attnscope.capture(arch.m) as trace:
        arch.hf(**arch.inputs)
    assert trace.tokens("vision").roles == ["cls"] + ["image"] * GRID * GRID
    assert trace.tokens("text", 1).roles == ["text"] * arch.inputs["input_ids"].shape[1]


def test_qwen2_vl_merged_grid_roles():
    arch = get(Qwen2VL)
    with torch.no_grad(), attnscope.capture(arch.m) as full:
        arch.hf(**arch.inputs)
    with torch.no_grad(), attnscope.capture(arch.m, streams="language", keys="image") as sel:
        arch.hf(**arch.inputs)
    tmap = full.tokens("language")
    ids = arch.inputs["input_ids"][0].tolist()
    merged = [(int(h) // 2, int(w) // 2) for _, h, w in QWEN_GRID.tolist()]
    assert tmap.grids == merged
    image = tmap.positions("image")
    assert image == [i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
    assert len(image) == sum(h * w for h, w in merged)
    for k, (h, w) in enumerate(merged):
        pos = tmap.image_positions(k)
        assert [tmap.patch[p] for p in pos] == [(k, r, c) for r in range(h) for c in range(w)]
    for layer in range(2):
        rec = sel.record("language", layer)
        assert rec.keys == image
        torch.testing.assert_close(rec.probs, full.attention("language", layer)[..., image], atol=0, rtol=0)
    # the vision stream: full-resolution grids, each 2x2 merge window contiguous
    vmap = full.tokens("vision")
    assert vmap.grids == [(int(h), int(w)) for _, h, w in QWEN_GRID.tolist()]
    assert len(vmap) == int(QWEN_GRID.prod(-1).sum())
    start = 0
    for k, (_, h, w) in enumerate(QWEN_GRID.tolist()):
        cells = vmap.patch[start : start + h * w]
        assert sorted(cells) == [(k, r, c) for r in range(h) for c in range(w)]
        for q in range(0, h * w, 4):  # a merge window: rows 2i,2i+1 x cols 2j,2j+1
            (_, r0, c0), *rest = cells[q : q + 4]
            assert r0 % 2 == 0 and c0 % 2 == 0
            assert [(r, c) for _, r, c in rest] == [(r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)]
        start += h * w


# --- padded batch ----------------------------------------------------------------------------------------------
def _llama():
    if "llama" not in _built:
        torch.manual_seed(0)
        cfg = _llama_text()
        cfg._attn_implementation = "sdpa"
        hf = LlamaForCausalLM(cfg).eval()
        _built["llama"] = attnscope.wrap(hf)
    return _built["llama"]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_left_padded_batch_matches_eager_on_real_rows(which):
    m = get(GPT2).m if which == "gpt2" else _llama()
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0 left-padded by 3
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        plain = m.hf(**inputs).logits
        with attnscope.capture(m) as trace:
            inside = m.hf(**inputs).logits
        with eager(m.hf):
            ref = m.hf(**inputs, output_attentions=True).attentions
    assert torch.equal(plain, inside)
    tmap = trace.tokens("text", 0)
    assert tmap.roles == ["pad"] * 3 + ["text"] * 5
    assert trace.tokens("text", 1).roles == ["text"] * 8
    for layer, eager_probs in enumerate(ref):
        got = trace.attention("text", layer)
        assert got.shape == eager_probs.shape
        for row in range(2):
            real = mask[row].bool()
            torch.testing.assert_close(got[row][:, real], eager_probs[row][:, real].float(), atol=ATOL, rtol=0)
            assert got[row][:, real][..., ~real].abs().sum() == 0  # no mass on padding


def test_qwen2_vl_left_padded_batch_images_of_different_sizes():
    """Row 0 holds the 4x4 image (2x2 merged), row 1 the 4x6 one (2x3 merged): each row's map takes its own
    grid from image_grid_thw (listed across the batch), and real rows match eager."""
    arch = get(Qwen2VL)
    row0 = [0, 0, 5, 102] + [IMAGE_TOKEN] * 4 + [103, 8]
    row1 = [5, 102] + [IMAGE_TOKEN] * 6 + [103, 8]
    ids = torch.tensor([row0, row1])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    inputs = dict(arch.inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_TOKEN).int())
    with torch.no_grad():
        plain = arch.hf(**inputs).logits
        with attnscope.capture(arch.m) as trace:
            inside = arch.hf(**inputs).logits
        with eager(arch.hf):
            ref = arch.hf(**inputs, output_attentions=True).attentions
    assert torch.equal(plain, inside)
    first, second = trace.tokens("language", 0), trace.tokens("language", 1)
    assert first.roles == ["pad"] * 2 + ["text"] * 2 + ["image"] * 4 + ["text"] * 2
    assert first.grids == [(2, 2)] and [first.patch[p] for p in first.positions("image")] == [
        (0, r, c) for r in range(2) for c in range(2)]
    assert second.roles == ["text"] * 2 + ["image"] * 6 + ["text"] * 2
    assert second.grids == [(2, 3)] and [second.patch[p] for p in second.positions("image")] == [
        (0, r, c) for r in range(2) for c in range(3)]
    for layer, eager_probs in enumerate(ref):
        got = trace.attention("language", layer)
        for row in range(2):
            real = mask[row].bool()
            torch.testing.assert_close(got[row][:, real], eager_probs[row][:, real].float(), atol=ATOL, rtol=0)
