"""What head importance is measured on: a scalar per batch row computed from the model's output.

- text / language models: the log-probability of a target continuation after the prompt (`target="Paris"`, teacher
  forced, summed over its tokens), of one token id (`target=1234`), or by default of the unablated model's own
  greedy next token;
- vision models: `target="cls"` (default) the cosine similarity of the CLS embedding (last hidden state, position
  0) to the unablated model's;
- any callable `output -> tensor [B]`."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

from ..core import seam
from ..steer.edits import SteerError


@dataclass
class Target:
    """Inputs to run and a score per batch row; `describe` says what it is."""

    inputs: dict
    score: Callable
    describe: str


def _repeat(inputs: dict, n: int) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1:
            out[k] = v.expand(n, *v.shape[1:])
        elif isinstance(v, torch.Tensor) and v.ndim >= 1 and k in ("pixel_values",) and n % v.shape[0] == 0:
            out[k] = v.repeat(n // v.shape[0], *([1] * (v.ndim - 1)))
        else:
            out[k] = v
    return out


def make_target(model, inputs: dict, target=None) -> Target:
    ids = inputs.get("input_ids")
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and k in ("input_ids", "pixel_values") and v.shape[0] != 1:
            raise SteerError("head importance takes one example (batch 1); loop over examples and average the tables")
    if callable(target):
        return Target(dict(inputs), lambda out: target(out), getattr(target, "__name__", "callable"))
    if ids is None or target == "cls":
        if target not in (None, "cls"):
            raise SteerError(f"a vision model's target is 'cls' or a callable; got {target!r}")
        with torch.no_grad():
            ref = model.hf(**inputs).last_hidden_state[:, 0].float()

        def cls_similarity(out):
            return torch.nn.functional.cosine_similarity(out.last_hidden_state[:, 0].float(), ref.expand_as(out.last_hidden_state[:, 0]), dim=-1)

        return Target(dict(inputs), cls_similarity, "cosine similarity of the CLS embedding to the unablated model's")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise SteerError("the prompt must end with a real token (left padding or none)")
    if target is None or isinstance(target, int):
        if target is None:
            with torch.no_grad():
                target = int(model.hf(**inputs).logits[0, -1].argmax())
        token = int(target)

        def token_logprob(out):
            return out.logits[:, -1].float().log_softmax(-1)[:, token]

        name = model.tokenizer.convert_ids_to_tokens(token) if model.tokenizer is not None else str(token)
        run = seam.keep_logits(model.hf, inputs, 1)  # only the last position's logits are read
        return Target(run, token_logprob, f"log p({name!r}) at the last position")
    if isinstance(target, str):
        if model.tokenizer is None:
            raise SteerError("a text target needs the model's tokenizer")
        answer = model.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"].to(ids.device)
        n = answer.shape[1]
        full = dict(inputs)
        full["input_ids"] = torch.cat([ids, answer], 1)
        if mask is not None:
            full["attention_mask"] = torch.cat([mask, torch.ones_like(answer)], 1)
        full = seam.keep_logits(model.hf, full, n + 1)

        def answer_logprob(out):
            logp = out.logits[:, -n - 1: -1].float().log_softmax(-1)
            return logp.gather(-1, answer.expand(logp.shape[0], -1)[..., None])[..., 0].sum(-1)

        return Target(full, answer_logprob, f"log p({target!r} | prompt), teacher forced")
    raise SteerError(f"target must be None, a token id, a string, 'cls' or a callable; got {target!r}")
