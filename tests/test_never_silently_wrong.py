"""Families and attention terms attnscope either gets right (checked against eager) or refuses by name.

- attention sinks (gpt-oss `s_aux`): captured rows equal eager, which sum below 1; edits of explicit
  probabilities refuse instead of dropping the sink;
- T5's relative position bias (`position_bias`) is part of the recomputed logits;
- a keyword the recomputation does not know raises `UnsupportedAttentionError`;
- encoder-decoders get encoder, decoder and cross-attention streams from their structure (cross rows are decoder
  positions, its keys encoder positions) and refuse steering by name; unlisted vision-language families are
  refused at wrap; PaliGemma is mapped (SigLIP tower without CLS, image tokens in the language stream);
- an offloaded model (accelerate `cpu_offload`) keeps its trace, fingerprints its real weights and encodes onto
  its execution device;
- `layers="all"` means every layer; another string is a clear error."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GemmaConfig,
    GptOssConfig,
    GptOssForCausalLM,
    Idefics3Config,
    LlamaConfig,
    LlamaForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

import attnscope
from attnscope.core.probs import UnsupportedAttentionError, attention_probs
from attnscope.models.spec import UnmappedModelError, spec_for
from attnscope.steer import PAI, steer
from attnscope.steer.edits import Redistribute
from tiny_models import eager

ATOL = 1e-5


def _eager_attentions(hf, **inputs):
    with eager(hf), torch.no_grad():
        out = hf(**inputs, output_attentions=True)
    return getattr(out, "attentions", out)  # encoder-decoders: the whole output (encoder, decoder, cross)


def test_gpt_oss_sinks_are_recomputed_and_explicit_edits_refuse():
    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=128, num_local_experts=2, num_experts_per_tok=1,
                       sliding_window=4, layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    cfg._attn_implementation = "eager"  # gpt-oss has no SDPA path in transformers
    hf = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # large enough that the sink takes visible mass
    m = attnscope.wrap(hf)
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad(), attnscope.capture(m) as trace:
        m(input_ids=ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_attentions=True).attentions
    for layer in range(2):
        got = trace.attention("text", layer)
        torch.testing.assert_close(got, ref[layer], atol=ATOL, rtol=0)
        assert float(got.sum(-1).min()) < 0.99  # the sink took mass: rows do not sum to 1
    with pytest.raises(UnsupportedAttentionError, match="sinks"), torch.no_grad():
        with steer(m, Redistribute(0.5, source="last", keys="text")):
            m(input_ids=ids)
    assert attnscope.core.dispatch.registered_names() == []


def test_t5_relative_position_bias_is_recomputed():
    torch.manual_seed(0)
    hf = T5EncoderModel(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128)).eval()
    m = attnscope.wrap(hf)
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad(), attnscope.capture(m) as trace:
        m(input_ids=ids)
    ref = _eager_attentions(hf, input_ids=ids)
    for layer in range(2):
        torch.testing.assert_close(trace.attention("text", layer), ref[layer], atol=ATOL, rtol=0)


def test_an_unknown_attention_keyword_is_refused():
    q = k = torch.randn(1, 2, 3, 4)
    with pytest.raises(UnsupportedAttentionError, match="mystery_bias"):
        attention_probs(torch.nn.Module(), q, k, None, {"scaling": 0.5, "mystery_bias": torch.ones(1)})
    attention_probs(torch.nn.Module(), q, k, None, {"scaling": 0.5, "mystery_flag": None})  # None is no term


def _encoder_decoders():
    torch.manual_seed(0)
    yield "t5", T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                   vocab_size=128, decoder_start_token_id=0)).eval()
    yield "bart", BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, forced_eos_token_id=None, eos_token_id=None)).eval()


@pytest.mark.parametrize("family, hf", list(_encoder_decoders()), ids=["t5", "bart"])
def test_encoder_decoders_get_encoder_decoder_and_cross_streams(family, hf):
    """Three streams from the model's structure; cross-attention rows are decoder positions, its keys encoder
    positions; generate is one run whose decode steps equal eager attention of the full sequence."""
    m = attnscope.wrap(hf)
    assert m.streams == {"encoder": 2, "decoder": 2, "cross": 2}
    ids, dec = torch.randint(3, 100, (1, 7)), torch.randint(3, 100, (1, 4))
    with torch.no_grad(), attnscope.capture(m) as trace:
        m(input_ids=ids, decoder_input_ids=dec)
    ref = _eager_attentions(hf, input_ids=ids, decoder_input_ids=dec)
    for stream, eager_probs in (("encoder", ref.encoder_attentions), ("decoder", ref.decoder_attentions),
                                ("cross", ref.cross_attentions)):
        for layer in range(2):
            torch.testing.assert_close(trace.attention(stream, layer), eager_probs[layer], atol=ATOL, rtol=0)
    assert len(trace.tokens("cross")) == 7 and len(trace.tokens("decoder")) == 4
    with torch.no_grad(), attnscope.capture(m, queries="last") as gen:
        out = m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    run = gen.run()
    assert len(gen.runs) == 1 and run.steps == out.shape[1] - 2 > 0
    assert gen.tokens("decoder").positions("generated") == list(range(1, out.shape[1] - 1))
    ref = _eager_attentions(hf, input_ids=ids, decoder_input_ids=out[:, :-1])
    for step in range(run.steps + 1):
        for stream, eager_probs in (("decoder", ref.decoder_attentions), ("cross", ref.cross_attentions)):
            rec = gen.record(stream, 1, step=step)
            assert rec.queries == [step]
            width = rec.probs.shape[-1]
            assert width == (step + 1 if stream == "decoder" else 7)
            torch.testing.assert_close(rec.probs[0, :, 0], eager_probs[1][0, :, step, :width], atol=ATOL, rtol=0)
    with pytest.raises(attnscope.steer.SteerError, match="encoder-decoder"), steer(m, PAI(alpha=1.0)):
        pass


def test_unlisted_vision_language_family_is_refused_by_name():
    with pytest.raises(UnmappedModelError, match="idefics3.*vision tower"):
        spec_for(Idefics3Config())


def test_paligemma_is_mapped_without_a_cls():
    torch.manual_seed(0)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=100, projection_dim=32)
    cfg.text_config.num_image_tokens = 16
    hf = PaliGemmaForConditionalGeneration(cfg).eval()
    m = attnscope.wrap(hf)
    assert set(m.streams) == {"vision", "language"}
    ids = torch.tensor([[100] * 16 + [1, 5, 6, 7]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 32, 32),
         "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad(), attnscope.capture(m, streams="language", keys="image") as trace:
        plain = m(**x).logits
    lang = trace.tokens("language")
    assert lang.positions("image") == list(range(16)) and lang.patch[5] == (0, 1, 1)
    ref = _eager_attentions(hf, **x)
    for layer in range(2):
        torch.testing.assert_close(trace.attention("language", layer), ref[layer][..., :16], atol=ATOL, rtol=0)
    with torch.no_grad(), attnscope.capture(m, streams="vision") as vision:
        m(**x)
    assert len(vision.tokens("vision")) == 16 and not vision.tokens("vision").positions("cls")
    with torch.no_grad(), steer(m, PAI(alpha=1.0, layers=[0, 1])):
        steered = m(**x).logits
    assert float((steered - plain).abs().max()) > 0  # image tokens found and amplified


def test_offloaded_model_keeps_its_trace_and_real_fingerprint():
    from accelerate import cpu_offload

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)).eval()
    before = attnscope.wrap(hf).fingerprint
    ids = torch.randint(3, 100, (1, 7))
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
        ref = _eager_attentions(hf, input_ids=ids)
    cpu_offload(hf, execution_device="cpu")
    m = attnscope.wrap(hf)
    assert next(hf.parameters()).device.type == "meta" and m.device.type == "cpu"
    with torch.no_grad(), attnscope.capture(m, layers="all") as trace:
        out = hf(input_ids=ids).logits
    assert torch.equal(out, plain) and trace.provenance["weights"] == before
    torch.testing.assert_close(trace.attention("text", 1), ref[1], atol=ATOL, rtol=0)


def test_layers_all_and_bad_strings(smollm):
    x = smollm.encode("Hello there")
    with torch.no_grad(), attnscope.capture(smollm, layers="all", queries="last") as trace:
        smollm(**x)
    assert trace.layers("text") == list(range(30))
    with pytest.raises(TypeError, match="'all'"):
        attnscope.capture(smollm, layers="a").__enter__()
