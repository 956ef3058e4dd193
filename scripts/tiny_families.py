"""Tiny randomly initialised models of the model families transformers ships whose attention goes through the
AttentionInterface, for `scripts/verified_architectures.py` (no hub, no weights: hidden size 32, 2 layers).

Each `Family` builds its model from a config; `inputs` is None where `attnscope.check` builds the probe itself (random
token ids or random pixels of the config's image size), else the probe a processor would have made (VLMs: input ids
with the image tokens expanded, pixel values, grids)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

H, FF, HEADS, KV, LAYERS, VOCAB = 32, 64, 4, 2, 2, 128
IMAGE, PATCH = 32, 8  # 4 x 4 patch grid
IMG = 120  # image placeholder id of the VLMs (text ids of the probes stay below 100)
TOKENS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)


@dataclass
class Family:
    name: str
    kind: str  # what the family stands for in the table
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict] | None = None
    note: str = ""


def _lm(cls, **kw) -> dict:
    base = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=128, **TOKENS)
    return cls(**(base | kw))


def _causal(config_cls, model_cls, **kw) -> Callable:
    return lambda: getattr(tf, model_cls)(_lm(getattr(tf, config_cls), **kw))


def _vision_kw(**kw) -> dict:
    return dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                image_size=IMAGE, patch_size=PATCH) | kw


def _ids(*parts) -> torch.Tensor:
    return torch.tensor([[t for p in parts for t in (p if isinstance(p, (list, tuple)) else [p])]])


def _pixels(batch=1, *extra) -> torch.Tensor:
    return torch.randn(batch, *extra, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def _with_mask(ids: torch.Tensor, **more) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **more}


# --- VLMs -----------------------------------------------------------------------------------------------------
def _llava():
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**_vision_kw(projection_dim=H)), text_config=_lm(tf.LlamaConfig),
                         image_token_index=IMG, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(cfg)


def _llava_inputs(hf):
    return _with_mask(_ids(1, 5, 6, 7, [IMG] * 16, 8, 9, 10), pixel_values=_pixels())


QWEN_GRID = torch.tensor([[1, 4, 4]])


def _qwen2_vl():
    vision = dict(depth=LAYERS, embed_dim=H, hidden_size=H, num_heads=HEADS, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}, **TOKENS)
    cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=121,
                           vision_start_token_id=122, vision_end_token_id=123)
    return tf.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_vl_inputs(hf):
    ids = _ids(5, 6, 122, [IMG] * 4, 123, 7, 8, 9)
    pixels = torch.randn(16, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(0))
    return _with_mask(ids, pixel_values=pixels, image_grid_thw=QWEN_GRID.clone(), mm_token_type_ids=(ids == IMG).int())


def _idefics3():
    vision = tf.Idefics3VisionConfig(**_vision_kw())
    cfg = tf.Idefics3Config(vision_config=vision, text_config=_lm(tf.LlamaConfig), scale_factor=2, image_token_id=IMG)
    return tf.Idefics3ForConditionalGeneration(cfg)


def _idefics3_inputs(hf):  # one image, no splitting: 16 patches pixel-shuffled by 2 -> 4 image tokens
    return _with_mask(_ids(1, 5, [IMG] * 4, 6, 7, 8), pixel_values=_pixels(1, 1),
                      pixel_attention_mask=torch.ones(1, 1, IMAGE, IMAGE, dtype=torch.bool))


def _paligemma():
    vision = tf.SiglipVisionConfig(**_vision_kw(projection_dim=H))
    text = _lm(tf.GemmaConfig, head_dim=8, num_key_value_heads=1)
    cfg = tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMG, projection_dim=H)
    return tf.PaliGemmaForConditionalGeneration(cfg)


def _paligemma_inputs(hf):  # the image tokens first, then bos and the prefix, with the processor's token_type_ids
    # (without them transformers' own SDPA and eager paths build different masks for the image prefix)
    ids = _ids([IMG] * 16, 1, 5, 6, 7, 8)
    return _with_mask(ids, pixel_values=_pixels(), token_type_ids=torch.zeros_like(ids))


# --- encoders, vision, encoder-decoders --------------------------------------------------------------------------
def _encoder(config_cls, model_cls, **kw) -> Callable:
    base = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    return lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**(base | kw)))


def _vision(config_cls, model_cls, **kw) -> Callable:
    return lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**_vision_kw(**kw)))


def _clip():
    text = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=_vision_kw(), projection_dim=16))


def _t5():
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=FF, num_layers=LAYERS, num_heads=HEADS,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
    return tf.T5ForConditionalGeneration(cfg)


def _bart():
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FF,
                        decoder_ffn_dim=FF, max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=None,
                        pad_token_id=1, bos_token_id=0, eos_token_id=None)
    return tf.BartForConditionalGeneration(cfg)


FAMILIES = [
    # decoder-only
    Family("llama", "decoder, full attention, GQA", _causal("LlamaConfig", "LlamaForCausalLM")),
    Family("mistral", "decoder, sliding window 4 (probe of 12)", _causal("MistralConfig", "MistralForCausalLM", sliding_window=4)),
    Family("qwen2", "decoder, full attention", _causal("Qwen2Config", "Qwen2ForCausalLM")),
    Family("qwen3", "decoder, q/k norm", _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8)),
    Family("gemma", "decoder, MQA", _causal("GemmaConfig", "GemmaForCausalLM", head_dim=8, num_key_value_heads=1)),
    Family("gemma2", "decoder, soft-capping, sliding + full layers",
           _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=8)),
    Family("gemma3_text", "decoder, sliding + full layers, q/k norm",
           _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"])),
    Family("phi3", "decoder, fused qkv", _causal("Phi3Config", "Phi3ForCausalLM")),
    Family("olmo2", "decoder, q/k norm", _causal("Olmo2Config", "Olmo2ForCausalLM")),
    Family("granite", "decoder, attention multiplier", _causal("GraniteConfig", "GraniteForCausalLM", attention_multiplier=0.3)),
    Family("stablelm", "decoder, partial rotary", _causal("StableLmConfig", "StableLmForCausalLM")),
    Family("starcoder2", "decoder", _causal("Starcoder2Config", "Starcoder2ForCausalLM")),
    Family("gpt2", "decoder, learned positions", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64, **TOKENS))),
    Family("gpt_neox", "decoder, parallel residual", _causal("GPTNeoXConfig", "GPTNeoXForCausalLM")),
    Family("cohere", "decoder, parallel block", _causal("CohereConfig", "CohereForCausalLM")),
    Family("gpt_oss", "decoder, attention sinks, MoE",
           _causal("GptOssConfig", "GptOssForCausalLM", head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                   sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    # encoders
    Family("bert", "encoder", _encoder("BertConfig", "BertModel")),
    Family("roberta", "encoder", _encoder("RobertaConfig", "RobertaModel", pad_token_id=1)),
    Family("distilbert", "encoder", lambda: tf.DistilBertModel(tf.DistilBertConfig(
        dim=H, hidden_dim=FF, n_layers=LAYERS, n_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64))),
    Family("electra", "encoder", _encoder("ElectraConfig", "ElectraModel", embedding_size=H)),
    # vision transformers
    Family("vit", "vision, CLS", _vision("ViTConfig", "ViTModel")),
    Family("deit", "vision, CLS + distillation token", _vision("DeiTConfig", "DeiTModel")),
    Family("dinov2", "vision, CLS", _vision("Dinov2Config", "Dinov2Model")),
    Family("dinov2_with_registers", "vision, CLS + 4 registers",
           _vision("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", num_register_tokens=4)),
    Family("siglip_vision", "vision, no CLS", _vision("SiglipVisionConfig", "SiglipVisionModel")),
    Family("clip", "text + vision towers", _clip),
    # vision-language
    Family("llava", "VLM: CLIP tower + Llama", _llava, _llava_inputs),
    Family("qwen2_vl", "VLM: merged patches, M-RoPE", _qwen2_vl, _qwen2_vl_inputs),
    Family("idefics3", "VLM (SmolVLM's base): pixel shuffle", _idefics3, _idefics3_inputs),
    Family("paligemma", "VLM: SigLIP tower + Gemma, image prefix", _paligemma, _paligemma_inputs),
    # encoder-decoders
    Family("t5", "encoder-decoder, relative position bias", _t5),
    Family("bart", "encoder-decoder, cross-attention", _bart),
]
