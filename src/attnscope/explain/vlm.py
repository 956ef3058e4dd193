"""Image maps of a VLM's generated tokens and answer spans (LLaVA-style models).

Papers: the bi-modal rule of "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (Chefer et al., 2021), see `gradattn.py`; any other method of `METHODS` can be used too.

What it computes: the sequence is the prompt (with its expanded image tokens) followed by the generated tokens,
run once with teacher forcing. The target of a generated token at position p is log p(token_p | tokens before p)
(`TokenLogProb([p])`); the target of an answer span is the sum over its positions - the span's log-likelihood.
Each explanation's scores are over the language sequence; `.image_map()` is the image part at pixel resolution.

Defaults, and why: `method="gradattn"` (the bi-modal rule carries the language model's relevance to the tower's
patches; raw attention of a text token to image tokens is what "See What You Are Told" shows is dominated by
sinks); greedy decoding (`do_sample=False`) so the explained answer is reproducible. No real VLM is in the zoo yet:
the tests exercise the mechanics on tiny random LLaVA models only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import MethodError
from .targets import TokenLogProb


@dataclass
class GenerationExplanation:
    ids: torch.Tensor  # [1, prompt + generated]
    prompt_length: int
    tokens: list  # one Explanation per generated token
    span: object  # Explanation of the whole answer span

    def text(self, tokenizer=None) -> str:
        new = self.ids[0, self.prompt_length :].tolist()
        return tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new))


def _with_ids(inputs: dict, ids: torch.Tensor) -> dict:
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:
        mm = torch.zeros_like(ids)
        mm[:, : inputs["mm_token_type_ids"].shape[1]] = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = mm
    return out


def _check(model, inputs):
    if model.spec.kind != "vlm":
        raise MethodError(f"{model.name} is not a vision-language model; use attnscope.explain with NextToken/TokenLogProb")
    if inputs.get("input_ids") is None or inputs["input_ids"].shape[0] != 1:
        raise MethodError("explain one prompt at a time (input_ids of batch 1)")


def token_map(model, inputs: dict, position: int, method: str = "gradattn", **params):
    """Explanation (scores over the language sequence, image map at pixel resolution) of the token at `position`
    of `inputs["input_ids"]` (negative positions count from the end)."""
    from . import explain

    _check(model, inputs)
    return explain(model, inputs, method=method, target=TokenLogProb([position]), **params)


def span_map(model, inputs: dict, start: int, end: int | None = None, method: str = "gradattn", **params):
    """Explanation of the answer span input_ids[start:end] (its log-likelihood)."""
    from . import explain

    _check(model, inputs)
    n = inputs["input_ids"].shape[1]
    positions = list(range(n))[start:end]
    if not positions:
        raise MethodError(f"empty span [{start}:{end}] of a {n}-token sequence")
    return explain(model, inputs, method=method, target=TokenLogProb(positions), **params)


def generate_and_explain(model, inputs: dict, max_new_tokens: int = 8, method: str = "gradattn", **params) -> GenerationExplanation:
    """Generate greedily, then explain every generated token and the whole answer span."""
    _check(model, inputs)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if ids.shape[1] <= prompt:
        raise MethodError("the model generated nothing to explain")
    full = _with_ids(inputs, ids)
    per_token = [token_map(model, full, p, method, **params) for p in range(prompt, ids.shape[1])]
    span = span_map(model, full, prompt, None, method, **params)
    return GenerationExplanation(ids, prompt, per_token, span)
