"""The one place that knows how transformers calls a model.

Everything attnscope relies on about transformers' calling conventions lives here, so a rename upstream is a
one-file change and every behaviour relied on is listed (and tested on the oldest and newest supported
release, see docs/architecture.md, "The seam to transformers"):

- the KV cache reaches the top-level forward as a `Cache` instance under some keyword (`past_key_values` up
  to 5.23, `cache` from 5.24); it is found by type, never by name;
- a cache's length is `get_seq_length()`; a decode step is a forward whose cache already holds keys;
- when attnscope calls a forward itself (contrastive branches), the cache goes in under the name the
  forward's own signature declares;
- beam search reorders the cache between steps through `cache.reorder_cache(beam_idx)`;
- the generate output carries the cache under the same name as the forward's keyword;
- generate without a cache re-feeds a VLM's image features it encoded once as `mm_encoder_outputs` (5.23+);
- every forward of one `generate` call runs inside the frame of `GenerationMixin.generate` (its steps share it);
- decoder blocks receive `attention_mask` (4-D, [B, 1|H, Q, K]), `position_ids` ([B, Q]),
  `position_embeddings` ((cos, sin), each [B, Q, D]) and, before 5.24, `cache_position` ([Q]).

No other module reads one of these keywords by name."""
from __future__ import annotations

import inspect
import sys

import torch
import transformers
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerationMixin

from .probs import index_on

TRANSFORMERS_VERSION = transformers.__version__

# Forward keywords by meaning. Only `cache_keyword` decides which cache name a given model takes.
MASK = "attention_mask"
POSITION_IDS = "position_ids"
CACHE_POSITION = "cache_position"  # up to 5.23; absent from 5.24
POSITION_EMBEDDINGS = "position_embeddings"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
USE_CACHE = "use_cache"
LOGITS_TO_KEEP = "logits_to_keep"
ENCODED_IMAGES = "mm_encoder_outputs"  # image features generate encoded once and re-feeds (no-cache generation)
BLOCK_ARGUMENTS = (POSITION_EMBEDDINGS, MASK, POSITION_IDS, CACHE_POSITION)  # what `slice_block_kwargs` may cut
_CACHE_NAMES = ("cache", "past_key_values")


def is_cache(value) -> bool:
    return isinstance(value, Cache)


def find_cache(inputs: dict) -> Cache | None:
    """The KV cache among a forward's arguments, whatever keyword it came under."""
    for value in inputs.values():
        if isinstance(value, Cache):
            return value
    return None


def cache_length(cache) -> int:
    """Tokens the cache has seen (0 for none). For an encoder-decoder cache: the decoder's self-attention."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def is_decode_step(inputs: dict) -> bool:
    """A forward that continues a sequence: its cache already holds keys."""
    return cache_length(find_cache(inputs)) > 0


def without_cache(inputs: dict) -> dict:
    """The arguments minus the cache (and minus None values)."""
    return {k: v for k, v in inputs.items() if v is not None and not isinstance(v, Cache)}


def has_cache(inputs: dict) -> bool:
    """Whether a forward's arguments pass a KV cache object (empty or not)."""
    return any(isinstance(v, Cache) for v in inputs.values())


def generating_without_cache(inputs: dict) -> bool:
    """Whether a forward's arguments are those `generate(use_cache=False)` passes at each step: the image features it
    encoded once (`mm_encoder_outputs`), or `use_cache=False` with `logits_to_keep` (which a hand-made call rarely
    passes)."""
    return inputs.get(ENCODED_IMAGES) is not None or (inputs.get("use_cache") is False
                                                      and inputs.get("logits_to_keep") is not None)


_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__


def generate_call():
    """The frame of the `generate` call the current forward runs in (the innermost `GenerationMixin.generate` on the
    stack: every step of one call shares it, a second call has another), or None for a forward called by hand."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _GENERATE_CODE:
            return frame
        frame = frame.f_back
    return None


def cache_keyword(forward) -> str:
    """The keyword under which `forward` (a bound forward or a module) takes its cache."""
    fn = forward.forward if isinstance(forward, torch.nn.Module) else forward
    params = inspect.signature(fn).parameters
    for name in _CACHE_NAMES:
        if name in params:
            return name
    return "cache" if _newer_than("5.23") else "past_key_values"


def output_cache(output) -> Cache | None:
    """The cache a forward or generate returned (None when it returned none)."""
    for name in _CACHE_NAMES:
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if isinstance(value, Cache):
            return value
    return None


def watch_reorder(cache: Cache, callback) -> callable:
    """Call `callback(beam_idx)` whenever beam search reorders `cache` (`generate` calls `cache.reorder_cache`
    between steps). Returns the function that stops watching; the cache object is left as it was."""
    original = cache.reorder_cache

    def reorder_cache(beam_idx, *args, **kwargs):
        out = original(beam_idx, *args, **kwargs)
        callback(beam_idx)
        return out

    cache.reorder_cache = reorder_cache

    def undo() -> None:
        if cache.__dict__.get("reorder_cache") is reorder_cache:
            del cache.reorder_cache
    return undo


def new_cache(config) -> Cache:
    """An empty dynamic cache for `config` (what generate would make)."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def cache_inputs(model, cache: Cache, **inputs) -> dict:
    """Forward arguments with `cache` under the model's own keyword and caching switched on."""
    return {**inputs, cache_keyword(model): cache, USE_CACHE: True}


def keep_logits(forward, inputs: dict, n: int = 1, override: bool = True) -> dict:
    """`inputs` asking the forward for only the last `n` positions' logits, where it supports that."""
    fn = forward.forward if isinstance(forward, torch.nn.Module) else forward
    if LOGITS_TO_KEEP not in inspect.signature(fn).parameters:
        return dict(inputs)
    if not override and LOGITS_TO_KEEP in inputs:
        return dict(inputs)
    return {**inputs, LOGITS_TO_KEEP: n}


def reuse_encoded_images(forward, inputs: dict, output) -> dict:
    """`inputs` for further forwards over the same images that skip the vision tower: the pixel values replaced by
    the image features `output` (a forward over `inputs`) carries as `image_outputs`, under ENCODED_IMAGES, where
    the forward declares it (transformers 5.23+); otherwise `inputs` unchanged."""
    fn = forward.forward if isinstance(forward, torch.nn.Module) else forward
    encoded = getattr(output, "image_outputs", None)
    if encoded is None or ENCODED_IMAGES not in inspect.signature(fn).parameters or inputs.get("pixel_values") is None:
        return dict(inputs)
    return {**{k: v for k, v in inputs.items() if k != "pixel_values"}, ENCODED_IMAGES: {"image": encoded}}


DECODER_INPUT_IDS = "decoder_input_ids"
DECODER_INPUTS_EMBEDS = "decoder_inputs_embeds"


def query_length(inputs: dict) -> int:
    """New tokens of the cached sequence in this forward (an encoder-decoder's decoder tokens, else the input's)."""
    for name in (DECODER_INPUT_IDS, DECODER_INPUTS_EMBEDS, INPUT_IDS, INPUTS_EMBEDS):
        ids = inputs.get(name)
        if ids is not None:
            return int(ids.shape[1])
    return 0


def new_token_ids(inputs: dict):
    """The ids a decode step feeds (an encoder-decoder's decoder ids, else the input ids); None for embeddings."""
    ids = inputs.get(DECODER_INPUT_IDS)
    return ids if ids is not None else inputs.get(INPUT_IDS)


def _newer_than(version: str) -> bool:
    def parts(v):
        return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())
    return parts(TRANSFORMERS_VERSION) > parts(version)


# --- decoder-block arguments (token pruning cuts them to the kept positions) -----------------------------------
def slice_block_kwargs(kwargs: dict, kept: torch.Tensor, L: int) -> dict:
    """A decoder block's position embeddings, mask, position ids (and cache position, where the release passes
    one) for a full-length prefill of `L` tokens, cut to the kept positions `kept` [B, n]."""
    B, n = kept.shape
    out = dict(kwargs)
    pe = kwargs.get(POSITION_EMBEDDINGS)
    if isinstance(pe, tuple) and pe and isinstance(pe[0], torch.Tensor) and pe[0].ndim == 3 and pe[0].shape[1] == L:
        out[POSITION_EMBEDDINGS] = tuple(t.expand(B, -1, -1).gather(1, index_on(kept, t.device)[..., None].expand(-1, -1, t.shape[-1]))
                                         for t in pe)
    mask = kwargs.get(MASK)
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == L:
        idx = index_on(kept, mask.device)
        if mask.shape[2] == L:
            mask = mask.expand(B, -1, -1, -1).gather(2, idx[:, None, :, None].expand(-1, mask.shape[1], -1, L))
        mask = mask.expand(B, -1, -1, -1).gather(3, idx[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        out[MASK] = mask
    pid = kwargs.get(POSITION_IDS)
    if isinstance(pid, torch.Tensor) and pid.ndim == 2 and pid.shape[1] == L:
        out[POSITION_IDS] = pid.expand(B, -1).gather(1, index_on(kept, pid.device))
    cp = kwargs.get(CACHE_POSITION)
    if isinstance(cp, torch.Tensor) and cp.ndim == 1 and cp.shape[0] == L:
        out[CACHE_POSITION] = torch.arange(n, device=cp.device) + cp[0]
    return out


# --- the attention and mask registries, and the per-config backend ---------------------------------------------
def register_attention(name: str, fn, mask_like: str) -> None:
    """Register `fn` as attention implementation `name`, with the mask builder of backend `mask_like`, so the
    model prepares exactly the mask that backend expects."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(mask_like)
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)


def unregister_attention(name: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def registered_attention() -> list[str]:
    """Every name in the global attention registry."""
    from transformers import AttentionInterface

    return list(AttentionInterface._global_mapping)


def backend_function(backend: str, module):
    """The attention function a module would call for `backend` ("eager" is its modeling file's own)."""
    if backend == "eager":
        import sys

        modeling = sys.modules[type(module).__module__]
        fn = getattr(modeling, "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward; load it with attn_implementation='sdpa'")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[backend]


def uses_attention_interface(modeling) -> bool:
    """Whether a modeling module dispatches attention through the registry."""
    return hasattr(modeling, "ALL_ATTENTION_FUNCTIONS")


def get_implementation(config) -> str | None:
    """The attention implementation a config names (None: not set yet, transformers picks at load)."""
    return getattr(config, "_attn_implementation_internal", None)


def set_implementation(config, name: str | None) -> None:
    """Switch a config's attention implementation without the checks `set_attn_implementation` runs (it is put
    back exactly on exit, None included)."""
    config._attn_implementation_internal = name


def sub_configs(config) -> list:
    """The configs nested in a config (vision and text towers of a VLM)."""
    return [getattr(config, k, None) for k in getattr(config, "sub_configs", {})]


# --- the model's own eager attention (the reference `attnscope check` compares against) ---------------------------
def eager_weights(modules, callback) -> callable:
    """While switched to eager, call `callback(module, weights)` with the probabilities each of `modules` gets from
    its modeling file's `eager_attention_forward` (what `output_attentions=True` reports; towers whose attention
    module returns no weights, such as Qwen2-VL's vision, included). Returns the function that stops watching."""
    import sys

    wanted = set(modules)
    patched = {}
    for module in wanted:
        modeling = sys.modules[type(module).__module__]
        original = getattr(modeling, "eager_attention_forward", None)
        if original is None or modeling in patched:
            continue

        def spy(mod, *args, _original=original, **kwargs):
            out = _original(mod, *args, **kwargs)
            if mod in wanted and isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                callback(mod, out[1])
            return out

        patched[modeling] = original
        modeling.eager_attention_forward = spy

    def undo() -> None:
        for modeling, original in patched.items():
            modeling.eager_attention_forward = original
    return undo
