"""Targets: the scalar of the forward pass an explanation explains.

A target is called as `target(output, inputs) -> Tensor[B]` on the model's output and the (possibly perturbed)
inputs, so the same target serves the explanation and the faithfulness curves. `bind(model, inputs, output)`
fixes what the clean pass decides (the predicted class, the greedy next token, the reference embedding) so that
perturbed inputs are scored against the same class/token/reference. `queries(tmap)` names the positions whose
output the target reads; attention-only methods (raw, rollout, flow) explain those rows.

Built in:
  - `ClassLogit(head=None, index=None)`: a class logit (`output.logits`, or `head(output.<on>)`).
  - `EmbeddingSimilarity(reference=None, pool="auto")`: DINOv2 CLS or MiniLM mean-pooled sentence embedding
    compared with a reference (cosine similarity); with no reference, the projection of the unnormalised
    embedding on the clean input's own (unit) embedding. Cosine similarity to oneself is flat at the clean input
    (its gradient is zero there), so the projection is used instead: it has the same direction and a gradient.
  - `TokenEmbedding(position)`: an encoder's output embedding at one position (a clicked patch or word),
    projected on its own clean (unit) embedding, as the self-reference of `EmbeddingSimilarity`.
  - `NextToken(token=None)`: log-probability of the next token after the last position (default: greedy).
  - `TokenLogProb(positions)`: sum of log p(token at p | tokens before p) over `positions` (a generated token,
    an answer span: its likelihood).
  - any callable `f(output, inputs) -> Tensor[B]` (wrapped as `Custom`)."""
from __future__ import annotations

import copy

import torch


class TargetError(ValueError):
    """A target that cannot be explained (e.g. it does not depend on the inputs)."""


class Target:
    name = "target"
    query_roles: tuple[str, ...] = ()

    def bind(self, model, inputs: dict, output) -> Target:
        return self

    def __call__(self, output, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def queries(self, tmap) -> list[int]:
        """Positions whose output the target reads (for attention-only methods): the first of `query_roles` (role
        names, "last", or integer positions) that the sequence has."""
        for role in self.query_roles:
            if isinstance(role, int):
                return [role % len(tmap)]
            found = tmap.positions(role)
            if found:
                return found
        return [len(tmap) - 1]

    def protected(self, tmap) -> list[int]:
        """Positions a perturbation test must not remove (the positions a next-token target predicts from)."""
        return []

    def label(self, output, inputs: dict) -> torch.Tensor | None:
        """The predicted class per row, for targets that are class scores (None otherwise)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}


def _logits_of(output):
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TargetError("the model output has no `logits`; pass a head: ClassLogit(head=...) or another target")
    return logits


class ClassLogit(Target):
    """Logit of class `index` (default: the clean input's predicted class). `head(getattr(output, on))` gives the
    logits when the model has no classification head of its own (e.g. the canvas classifier's linear head)."""

    name = "class_logit"

    def __init__(self, head=None, index: int | None = None, on: str = "last_hidden_state", queries=("cls", "last")):
        self.head, self.index, self.on = head, index, on
        self.query_roles = tuple(queries)

    def logits(self, output) -> torch.Tensor:
        if self.head is None:
            logits = _logits_of(output)
            return logits[:, -1] if logits.dim() == 3 else logits
        return self.head(getattr(output, self.on))

    def bind(self, model, inputs, output):
        bound = copy.copy(self)
        if bound.index is None:
            bound.index = int(self.logits(output)[0].argmax())
        return bound

    def __call__(self, output, inputs):
        return self.logits(output)[:, self.index]

    def label(self, output, inputs):
        return self.logits(output).argmax(-1)

    def describe(self):
        return {"name": self.name, "index": self.index, "head": type(self.head).__name__ if self.head is not None else None}


class EmbeddingSimilarity(Target):
    """Similarity of a pooled embedding to a reference.

    `pool`: "cls" (DINOv2's CLS after the final norm), "mean" (MiniLM / sentence-transformers: mean over the
    attention mask), "auto" (cls for vision models, mean for text encoders). `reference`: a tensor [D], or
    encoded inputs (a dict) of another image/sentence, or None for the clean input itself (see module doc)."""

    name = "embedding_similarity"

    def __init__(self, reference=None, pool: str = "auto"):
        if pool not in ("auto", "cls", "mean"):
            raise ValueError(f"pool must be 'auto', 'cls' or 'mean'; got {pool!r}")
        self.reference, self.pool = reference, pool
        self.self_reference = reference is None
        self.ref: torch.Tensor | None = None

    def embed(self, output, inputs) -> torch.Tensor:
        hidden = output.last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        mask = inputs.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)

    def bind(self, model, inputs, output):
        bound = copy.copy(self)
        if bound.pool == "auto":
            bound.pool = "cls" if model.spec.kind == "vision" else "mean"
        with torch.no_grad():
            if self.reference is None:
                ref = bound.embed(output, inputs)[0]
            elif isinstance(self.reference, dict):
                ref = bound.embed(model(**self.reference), self.reference)[0]
            else:
                ref = torch.as_tensor(self.reference, dtype=torch.float32)
        bound.ref = torch.nn.functional.normalize(ref.detach().float().flatten(), dim=0)
        return bound

    def __call__(self, output, inputs):
        emb = self.embed(output, inputs).float()
        if self.self_reference:
            return emb @ self.ref.to(emb.device)
        return torch.nn.functional.normalize(emb, dim=-1) @ self.ref.to(emb.device)

    def queries(self, tmap):
        if self.pool == "cls" and tmap.positions("cls"):
            return tmap.positions("cls")
        return [i for i, r in enumerate(tmap.roles) if r != "pad"]

    def describe(self):
        return {"name": self.name, "pool": self.pool,
                "reference": "self (projection)" if self.self_reference else "given (cosine)"}


class TokenEmbedding(EmbeddingSimilarity):
    """The output embedding at `position` (negative counts from the end) projected on its clean unit embedding:
    "what makes this token's representation", for encoders (DINOv2 patches, MiniLM words)."""

    name = "token_embedding"

    def __init__(self, position: int):
        super().__init__(reference=None, pool="cls")
        self.position = int(position)

    def embed(self, output, inputs) -> torch.Tensor:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise TargetError("TokenEmbedding reads `last_hidden_state`; this model's output has none (an LM: use "
                              "TokenLogProb)")
        if not -hidden.shape[1] <= self.position < hidden.shape[1]:
            raise TargetError(f"position {self.position} is out of range for {hidden.shape[1]} tokens")
        return hidden[:, self.position]

    def bind(self, model, inputs, output):
        bound = super().bind(model, inputs, output)
        bound.position = self.position % output.last_hidden_state.shape[1]
        bound.pool = "position"
        return bound

    def queries(self, tmap):
        return [self.position % len(tmap)]

    def describe(self):
        return {"name": self.name, "position": self.position, "reference": "self (projection)"}


def _log_probs(output) -> torch.Tensor:
    return torch.log_softmax(_logits_of(output).float(), dim=-1)


class NextToken(Target):
    """log p(token | the whole input) at the last position (or `position`); default token: the greedy one."""

    name = "next_token_logprob"

    def __init__(self, token: int | None = None, position: int = -1):
        self.token, self.position = token, position

    def bind(self, model, inputs, output):
        bound = copy.copy(self)
        if bound.token is None:
            bound.token = int(_logits_of(output)[0, self.position].argmax())
        n = inputs["input_ids"].shape[1] if inputs.get("input_ids") is not None else _logits_of(output).shape[1]
        bound.position = self.position % n
        bound.text = model.tokenizer.convert_ids_to_tokens(bound.token) if model.tokenizer is not None else str(bound.token)
        return bound

    def __call__(self, output, inputs):
        return _log_probs(output)[:, self.position, self.token]

    def queries(self, tmap):
        return [self.position % len(tmap)]

    def protected(self, tmap):
        return [self.position % len(tmap)]

    def describe(self):
        return {"name": self.name, "token": self.token, "text": getattr(self, "text", None), "position": self.position}


class TokenLogProb(Target):
    """Sum over `positions` p of log p(ids[p] | ids[<p]): the likelihood of a generated token (one position) or
    of an answer span (several). The ids are read from the clean inputs at bind time."""

    name = "token_logprob"

    def __init__(self, positions: int | list[int]):
        self.positions = [positions] if isinstance(positions, int) else list(positions)
        if not self.positions:
            raise TargetError("TokenLogProb needs at least one position")

    def bind(self, model, inputs, output):
        ids = inputs.get("input_ids")
        if ids is None:
            raise TargetError("TokenLogProb reads the tokens from `input_ids`; encode the text with the model")
        n = ids.shape[1]
        bad = [p for p in self.positions if not -n < p < n or p % n == 0]
        if bad:
            raise TargetError(f"positions {bad} are out of range 1..{n - 1} (position 0 has no prefix to predict it)")
        bound = copy.copy(self)
        bound.positions = sorted(p % n for p in self.positions)
        bound.ids = [int(ids[0, p]) for p in bound.positions]
        bound.text = model.tokenizer.decode(bound.ids) if model.tokenizer is not None else str(bound.ids)
        return bound

    def __call__(self, output, inputs):
        logp = _log_probs(output)
        pos = torch.tensor([p - 1 for p in self.positions], device=logp.device)
        ids = torch.tensor(self.ids, device=logp.device)
        return logp[:, pos, ids].sum(-1)

    def queries(self, tmap):
        return [p - 1 for p in self.positions]

    def protected(self, tmap):
        return sorted(set(self.positions) | {p - 1 for p in self.positions})

    def describe(self):
        return {"name": self.name, "positions": self.positions, "text": getattr(self, "text", None)}


class Custom(Target):
    """Any callable f(output, inputs) -> Tensor[B] (or a scalar for batch 1)."""

    name = "custom"

    def __init__(self, fn, queries=("cls", "last")):
        self.fn = fn
        self.query_roles = tuple(queries)

    def __call__(self, output, inputs):
        value = self.fn(output, inputs)
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=torch.float32)
        return value.reshape(-1) if value.dim() else value.reshape(1)

    def describe(self):
        return {"name": self.name, "fn": getattr(self.fn, "__name__", type(self.fn).__name__)}


def default_target(model) -> Target:
    """Class logit for models with a classification head, next-token log-probability for language models and
    VLMs, embedding similarity (self-reference) for encoders."""
    kind = model.spec.kind
    if kind == "vlm" or hasattr(model.hf, "lm_head") or type(model.hf).__name__.endswith("ForCausalLM"):
        return NextToken()
    if type(model.hf).__name__.endswith("ForImageClassification") or type(model.hf).__name__.endswith("ForSequenceClassification"):
        return ClassLogit(head=None)
    return EmbeddingSimilarity()


def as_target(target, model) -> Target:
    if target is None:
        return default_target(model)
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        named = {"next_token": NextToken, "embedding": EmbeddingSimilarity, "class": ClassLogit}
        if target not in named:
            raise TargetError(f"unknown target {target!r}; use one of {sorted(named)}, a Target, or a callable(output, inputs)")
        return named[target]()
    if callable(target):
        return Custom(target)
    raise TargetError(f"target must be a Target, a name or a callable(output, inputs) -> Tensor; got {type(target).__name__}")
