"""Tiny randomly initialised models of six architectures, built from configs (no hub, no weights), shared by the
capture and steer tests: GPT-2, ViT, CLIP (text + vision), LLaVA-1.5 (CLIP tower + Llama with GQA), LLaVA with a
DINOv2 tower, Qwen2-VL. Each `Arch` holds the model, its wrapped `attnscope.Model`, inputs, and its eager reference."""
from __future__ import annotations

import contextlib
import sys

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    Dinov2Config,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

import attnscope

ATOL = 1e-5
IMAGE, PATCH = 32, 8  # 4 x 4 patch grid for ViT, CLIP and the LLaVA towers
GRID = IMAGE // PATCH
IMAGE_TOKEN = 100  # LLaVA / Qwen2-VL image placeholder id (vocab 128; text ids are drawn below 100)
QWEN_GRID = torch.tensor([[1, 4, 4], [1, 4, 6]])  # two images: 16 and 24 patches, merged 2x2 -> 4 and 6 tokens
QWEN_PATCH, QWEN_TEMPORAL = 4, 2


# --- helpers ---------------------------------------------------------------------------------------------
def all_configs(config) -> dict[str, object]:
    """The config and its sub-configs, recursively, by dotted name."""
    out, todo = {}, [("", config)]
    while todo:
        name, cfg = todo.pop()
        if cfg is None or name in out:
            continue
        out[name] = cfg
        todo.extend((f"{name}.{k}".lstrip("."), getattr(cfg, k, None)) for k in getattr(cfg, "sub_configs", {}))
    return out


def impl_snapshot(hf) -> dict[str, object]:
    """config._attn_implementation of the model's config, every sub-config, and every attention module's config."""
    snap = {name: cfg._attn_implementation for name, cfg in all_configs(hf.config).items()}
    for path, module in hf.named_modules():
        if path and hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            snap[path] = module.config._attn_implementation
    return snap


@contextlib.contextmanager
def eager(hf):
    """Switch to eager for a reference pass, then back to sdpa; the switch must round-trip exactly."""
    before = impl_snapshot(hf)
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation("sdpa")
        assert impl_snapshot(hf) == before


@contextlib.contextmanager
def eager_spy(modeling):
    """Record (module, probabilities) of every call to a modeling file's `eager_attention_forward`.

    Used for Qwen2-VL's vision tower, whose VisionAttention returns no weights, so `output_attentions=True`
    gives its attention *outputs* ([seq, dim]), not probabilities."""
    original = modeling.eager_attention_forward
    calls = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        out = original(module, query, key, value, attention_mask, *args, **kwargs)
        calls.append((module, out[1].detach().float()))
        return out

    modeling.eager_attention_forward = spy
    try:
        yield calls
    finally:
        modeling.eager_attention_forward = original


def _randn_image(batch=1):
    return torch.randn(batch, 3, IMAGE, IMAGE)


def _llava_ids(prefix=(5, 6, 7), suffix=(8, 9, 10)):
    return torch.tensor([[1, *prefix] + [IMAGE_TOKEN] * GRID * GRID + [*suffix]])


def _llama_text(**kw):
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0, **kw)


# --- the architectures -------------------------------------------------------------------------------------
class Arch:
    """A tiny model with inputs, how to read its outputs, and its eager reference probabilities."""

    generates = False

    def __init__(self):
        torch.manual_seed(0)
        self.hf = self.build().eval()
        self.m = attnscope.wrap(self.hf)
        self.inputs = self.make_inputs()

    def outputs(self, out) -> list[torch.Tensor]:
        return [out.logits]

    def reference(self) -> dict[tuple[str, int, int], torch.Tensor]:
        """(stream, layer, part) -> eager probabilities [batch, heads, queries, keys]."""
        raise NotImplementedError


class GPT2(Arch):
    name, generates = "gpt2", True

    def build(self):
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                         eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
        return GPT2LMHeadModel(cfg)

    def make_inputs(self):
        ids = torch.randint(3, 100, (1, 9))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def reference(self):
        with eager(self.hf), torch.no_grad():
            att = self.hf(**self.inputs, output_attentions=True).attentions
        return {("text", i, 0): a for i, a in enumerate(att)}


class ViT(Arch):
    name = "vit"

    def build(self):
        cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=IMAGE, patch_size=PATCH, attn_implementation="sdpa")
        return ViTModel(cfg, add_pooling_layer=False)

    def make_inputs(self):
        return {"pixel_values": _randn_image(2)}

    def outputs(self, out):
        return [out.last_hidden_state]

    def reference(self):
        with eager(self.hf), torch.no_grad():
            att = self.hf(**self.inputs, output_attentions=True).attentions
        return {("vision", i, 0): a for i, a in enumerate(att)}


class CLIP(Arch):
    name = "clip"

    def build(self):
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=IMAGE, patch_size=PATCH)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, attn_implementation="sdpa")
        return CLIPModel(cfg)

    def make_inputs(self):
        ids = torch.randint(3, 100, (2, 7))
        ids[:, -1] = 2  # eos, pooled by CLIP's text model
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _randn_image(2)}

    def outputs(self, out):
        return [out.logits_per_image, out.text_embeds, out.image_embeds]

    def reference(self):
        with eager(self.hf), torch.no_grad():
            out = self.hf(**self.inputs, output_attentions=True)
        ref = {("text", i, 0): a for i, a in enumerate(out.text_model_output.attentions)}
        ref |= {("vision", i, 0): a for i, a in enumerate(out.vision_model_output.attentions)}
        return ref


class Llava(Arch):
    """LLaVA-1.5: CLIP vision tower (feature layer -2, CLS dropped), gelu projector, Llama with GQA."""

    name, generates = "llava", True

    def vision_config(self):
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE, patch_size=PATCH, projection_dim=32)

    def build(self):
        cfg = LlavaConfig(vision_config=self.vision_config(), text_config=_llama_text(),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        cfg._attn_implementation = "sdpa"
        hf = LlavaForConditionalGeneration(cfg)
        assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
        return hf

    def make_inputs(self):
        ids = _llava_ids()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _randn_image(1)}

    def reference(self):
        """Language from the top model's `attentions`; vision from calling the tower directly with
        output_attentions (the top model does not return the tower's attentions)."""
        with eager(self.hf), torch.no_grad():
            out = self.hf(**self.inputs, output_attentions=True)
            tower = self.hf.model.vision_tower(self.inputs["pixel_values"], output_attentions=True)
        ref = {("language", i, 0): a for i, a in enumerate(out.attentions)}
        ref |= {("vision", i, 0): a for i, a in enumerate(tower.attentions)}
        return ref


class LlavaDinov2(Llava):
    name, generates = "llava_dinov2", False

    def vision_config(self):
        return Dinov2Config(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE, patch_size=PATCH)


class Qwen2VL(Arch):
    name, generates = "qwen2_vl", True

    def build(self):
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=QWEN_PATCH,
                      spatial_merge_size=2, temporal_patch_size=QWEN_TEMPORAL, in_channels=3)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                    bos_token_id=1, eos_token_id=None, pad_token_id=0)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=101,
                            vision_start_token_id=102, vision_end_token_id=103)
        cfg._attn_implementation = "sdpa"
        return Qwen2VLForConditionalGeneration(cfg)

    def make_inputs(self):
        """What the processor would produce: flattened patches [sum(t*h*w), C*T*P*P] in 2x2-merge order
        (random values, so the order is only a convention here), image_grid_thw, and input_ids with each
        image's pad token expanded to its merged count h*w/4, framed by vision start/end tokens."""
        merged = (QWEN_GRID.prod(-1) // 4).tolist()
        pixel_values = torch.randn(int(QWEN_GRID.prod(-1).sum()), 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH)
        ids = [5, 6]
        for n in merged:
            ids += [102] + [IMAGE_TOKEN] * n + [103, 7]
        ids = torch.tensor([ids + [8, 9]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
                "image_grid_thw": QWEN_GRID.clone(), "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}

    def reference(self):
        """Language from the top model's `attentions`. Vision: Qwen2-VL's VisionAttention returns no weights
        (output_attentions on the tower gives attention outputs [seq, dim]), so the reference is what the
        model's own eager_attention_forward returns, recorded with a spy during the eager top-model pass,
        one call per image chunk (cu_seqlens), in call order."""
        modeling = sys.modules[type(self.hf).__module__]
        vision = {mod: s for mod, s in self.m.sites.items() if s.stream == "vision"}
        with eager(self.hf), torch.no_grad(), eager_spy(modeling) as calls:
            out = self.hf(**self.inputs, output_attentions=True)
        ref = {("language", i, 0): a for i, a in enumerate(out.attentions)}
        parts: dict[int, int] = {}
        for module, probs in calls:
            if module in vision:
                layer = vision[module].layer
                ref[("vision", layer, parts.get(layer, 0))] = probs
                parts[layer] = parts.get(layer, 0) + 1
        assert parts == {0: len(QWEN_GRID), 1: len(QWEN_GRID)}
        return ref


ARCHS = [GPT2, ViT, CLIP, Llava, LlavaDinov2, Qwen2VL]
_built: dict[str, Arch] = {}


def get(cls) -> Arch:
    if cls.name not in _built:
        _built[cls.name] = cls()
    return _built[cls.name]
