"""scene-vlm assembly: a LlavaForConditionalGeneration of the zoo's DINOv2 tower and SmolLM2 with a pooling
projector. The language model is the zoo's exactly, the processor inserts 64 image tokens, the projector's
2x2 merge is row-major and lossless, token roles put the 64 image tokens on the 8x8 grid, capture sees both
streams in forward and generate, and stored LoRA factors are merged exactly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attnscope
from attnscope.models import scene_vlm
from attnscope.scenes import SceneWorld

WORLD = SceneWorld(seed=0)


@pytest.fixture(scope="module")
def vlm():
    return scene_vlm.build()


@pytest.fixture(scope="module")
def inputs(vlm):
    scene = WORLD.scene("test", 0)
    return vlm.encode(vlm.prompt("Is there a bag in the image?"), scene.image)


def test_structure_and_prompt(vlm, inputs):
    hf = vlm.hf
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert vlm.streams == {"vision": 12, "language": 30}
    assert hf.config.image_seq_length == 64 and hf.config.image_grid_pool == 2
    assert hf.config.image_token_id == 16 and vlm.tokenizer.convert_ids_to_tokens(16) == "<image>"
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(16) == 64
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert vlm.prompt("Q?") == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert all(not p.requires_grad for p in hf.model.vision_tower.parameters())


def test_language_model_is_the_zoo_model_exactly(vlm, smollm):
    text = "The quick brown fox jumps over the lazy dog."
    ids = smollm.tokenizer(text, return_tensors="pt")["input_ids"]
    assert vlm.tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        a = vlm.hf(input_ids=ids).logits
        b = smollm.hf(input_ids=ids).logits
    assert torch.equal(a, b)
    assert vlm.hf.lm_head.weight is vlm.hf.model.language_model.embed_tokens.weight  # still tied


def test_projector_merge_is_row_major_2x2():
    proj = scene_vlm.PooledProjector(vision_dim=3, text_dim=4, pool=2)
    side = 4
    feats = torch.zeros(1, side * side, 3)
    for r in range(side):
        for c in range(side):
            feats[0, r * side + c] = torch.tensor([r, c, 1.0])
    merged = proj.merge(feats)  # [1, 4, 12]
    assert merged.shape == (1, 4, 12)
    for token in range(4):
        R, C = divmod(token, 2)
        chunks = merged[0, token].reshape(4, 3)
        for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert chunks[k].tolist() == [2 * R + dy, 2 * C + dx, 1.0]
    with pytest.raises(ValueError, match="square grid"):
        proj.merge(torch.zeros(1, 15, 3))


def test_image_roles_on_the_pooled_grid_and_capture(vlm, inputs):
    with torch.no_grad():
        plain = vlm.hf(**inputs).logits
        with attnscope.capture(vlm, layers={"language": [0, 29], "vision": [0]}) as full:
            inside = vlm.hf(**inputs).logits
        with attnscope.capture(vlm, streams="language", layers=[5], keys="image") as sel:
            vlm.hf(**inputs)
    assert torch.equal(plain, inside)
    tmap = full.tokens("language")
    ids = inputs["input_ids"][0].tolist()
    image = tmap.positions("image")
    assert image == [i for i, t in enumerate(ids) if t == 16]
    assert tmap.grids == [(8, 8)]
    assert [tmap.patch[i] for i in image] == [(0, r, c) for r in range(8) for c in range(8)]
    vmap = full.tokens("vision")
    assert vmap.grids == [(16, 16)] and vmap.roles[0] == "cls" and vmap.roles.count("image") == 256
    rec = sel.record("language", 5)
    assert rec.keys == image and rec.probs.shape[-1] == 64


def test_generate_under_capture_is_unchanged(vlm, inputs):
    with torch.no_grad():
        plain = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
        with attnscope.capture(vlm, streams="language", queries="last", layers=[0]) as trace:
            inside = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, inside)
    assert len(trace.runs) == 1
    assert [r.step for r in trace.run().records[("language", 0)]] == list(range(trace.run().steps + 1))


def test_lora_layer_and_merge_are_exact():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = scene_vlm.LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(lora.B)
    x = torch.randn(3, 6)
    want = lora(x)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = lora

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    holder = nn.Module()
    holder.layers = nn.ModuleList([Layer()])
    scene_vlm.remove_lora(holder, merge=True)
    assert isinstance(holder.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(holder.layers[0].self_attn.q_proj(x), want, atol=1e-6, rtol=0)


def test_load_merges_stored_weights(tmp_path, vlm):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="train_scene_vlm.py"):
        scene_vlm.load(tmp_path / "nothing")
    torch.manual_seed(1)
    proj = scene_vlm.PooledProjector()
    state = {f"projector.{k}": v for k, v in proj.state_dict().items()}
    a, b = torch.randn(8, 576), torch.randn(576, 8) * 1e-3
    for i in range(30):
        for name, out in (("q_proj", 576), ("v_proj", 192)):
            state[f"lora.layers.{i}.{name}.A"], state[f"lora.layers.{i}.{name}.B"] = a.clone(), b[:out].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / scene_vlm.WEIGHTS_FILE))
    (tmp_path / scene_vlm.CONFIG_FILE).write_text(json.dumps({"lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}))
    loaded = scene_vlm.load(tmp_path)
    for k, v in proj.state_dict().items():
        assert torch.equal(loaded.hf.model.multi_modal_projector.state_dict()[k], v)
    base = vlm.hf.model.language_model.layers[3].self_attn
    got = loaded.hf.model.language_model.layers[3].self_attn
    torch.testing.assert_close(got.q_proj.weight, base.q_proj.weight + 2.0 * b @ a, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.v_proj.weight, base.v_proj.weight + 2.0 * b[:192] @ a, atol=1e-6, rtol=0)
    assert torch.equal(got.k_proj.weight, base.k_proj.weight)
