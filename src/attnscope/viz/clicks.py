"""What the viewer's explanation of a clicked token explains, and the words that say so.

One rule for the served app, `attnscope report` and exported files, so a click means the same everywhere:
- nothing clicked: the method's default target (CLS embedding, next token after the prompt, ...);
- a word of a language model (prompt or generated) at position p >= 1: log p(token_p | tokens before p)
  (`TokenLogProb`), read at row p - 1;
- a token of an encoder (a DINOv2 patch, a MiniLM word): that token's output embedding (`TokenEmbedding`);
- anything else (padding, an image token inside a language model, the first token, a VLM's tower): the default
  target, and the label says why the click could not be followed."""
from __future__ import annotations

import torch

from . import integrations

LM_STREAMS = ("text", "language")
WORD_ROLES = ("text", "generated", "special", "system")


def _causal(model) -> bool:
    from .runner import can_generate

    return can_generate(model)


def target_for(model, result, stream: str, pos: int | None):
    """(inputs, target or None for the default, note or None) for explaining `pos` of `stream`."""
    view = next(v for v in result.views if v.name == stream)
    if pos is None:
        return result.inputs, None, None
    generated = pos >= view.length or view.tokens.roles[pos] == "generated"
    role = "generated" if generated else view.tokens.roles[pos]
    explain = integrations._module("attnscope.explain")
    if role == "pad":  # a batch's filler: no token of the input, whose target would explain nothing
        return result.inputs, None, "a padding position is no token of the input; showing the default target"
    if stream in LM_STREAMS and _causal(model):
        if role not in WORD_ROLES:
            return result.inputs, None, f"a {role} token has no word to predict; showing the default target"
        if pos == 0:
            return result.inputs, None, "the first token has no prefix to predict it from; showing the default target"
        inputs = result.inputs
        if pos >= inputs["input_ids"].shape[1]:
            if result.full_ids is None or pos >= result.full_ids.shape[1]:
                raise ValueError(f"position {pos} is past the generated tokens this run kept")
            ids = result.full_ids[:, : pos + 1].to(model.device)
            inputs = dict(inputs) | {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return inputs, explain.TokenLogProb([pos]), None
    if stream in ("vision", "text") and model.spec.kind in ("vision", "text", "dual"):
        return result.inputs, explain.TokenEmbedding(pos), None
    return result.inputs, None, f"{stream} tokens of this model have no target of their own; showing the default target"


def _tok(view, pos: int) -> str:
    from .data import clean_token

    if pos < view.length:
        return f"‘{clean_token(view.tokens.tokens[pos])}’ #{pos}"
    tail = view.tail[pos - view.length] if 0 <= pos - view.length < len(view.tail) else "?"
    return f"‘{clean_token(tail)}’ #{pos}"


def label(expl, view) -> tuple[str, int | None]:
    """(what the map explains, in words; the token position it is about, or None for the default target)."""
    t = dict(getattr(expl, "target", None) or {})
    name = t.get("name")
    if name == "token_logprob":
        ps = t.get("positions") or []
        if len(ps) == 1:
            return f"log p({_tok(view, ps[0])} | the tokens before it)", ps[0]
        return f"log-likelihood of {t.get('text')!r} at {ps}", None
    if name == "token_embedding":
        return f"output embedding of {_tok(view, t['position'])} (its projection on itself)", t["position"]
    if name == "next_token_logprob":
        where = t.get("position")
        after = f" after {_tok(view, where)}" if isinstance(where, int) and where < view.length else ""
        from .data import clean_token

        return f"log p(next token{after} = ‘{clean_token(str(t.get('text')))}’)", None
    if name == "embedding_similarity":
        pooled = "CLS embedding" if t.get("pool") == "cls" else "mean-pooled embedding"
        return f"{pooled} ({t.get('reference', 'self')})", None
    if name == "class_logit":
        return f"logit of class {t.get('index')}", None
    return str(name or "the method's default target"), None
