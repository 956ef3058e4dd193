"""FastV: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (Chen et al., ECCV 2024).

What it changes, where: after layer K of the language model, the image tokens that received the least attention
from the last query row (the last prompt token, mean over heads) at layer K-1 are dropped from the hidden states,
so layers K.. never hold them (`DropTokens`, decoder-layer pre-hooks; position ids, RoPE and masks of the kept
tokens stay as they were). Layers 0..K-1 see every token.

During generation FastV's own repository has two forms, which give different captions; attnscope offers both:
* `FastV` ranks once, at the prompt (prefill), and keeps that set of image tokens in the KV cache for every new
  token: the fast form, equal to masking the dropped keys from layer K on at every step;
* `FastVRerank` re-ranks at every new token, by the attention of the newest token at layer K-1, recomputing the
  whole sequence without a KV cache: the form of the paper's own evaluation (`generate(..., use_cache=False)`,
  which `FastVRerank.generate_kwargs` carries; POPE/CHAIR and the CLI pass it on).

Defaults and why: K=2 and keep=0.5 (R=50%) are the paper's headline setting. The ranking uses the last query row,
not the average over all rows, so only one explicit probability row is computed (the backend keeps running)."""
from __future__ import annotations

from ..edits import DropTokens, SteerError
from ._base import Method


class FastV(Method):
    """FastV with the kept set ranked once at the prompt and kept in the KV cache (Chen et al., ECCV 2024).

    At prefill, the image tokens are ranked by the mean-over-heads attention they get from the last prompt row at
    language layer `k - 1`; from layer `k` on only the top `keep` fraction stays in the hidden states, so later
    layers and their KV cache never hold the others. Each generated token attends to that same kept set (use
    `FastVRerank` for the paper evaluation's per-token re-ranking).

    Parameters:
        k: int, default 2. The first language layer without the dropped tokens (>= 1: the ranking reads layer
            k - 1). Must be below the stream's layer count (`SteerError` otherwise).
        keep: float in [0, 1], default 0.5. Fraction of the image tokens kept (rounded to a whole token count;
            1.0 is the identity).
        role: str, default "image". Token role that is ranked and dropped (any role of `TokenMap`).
        stream: str or None. The language stream (default: the model's language/text stream).

    Raises `SteerError` for k < 1, keep outside [0, 1], or a model without tokens of `role`."""

    name = "fastv"
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, Chen et al., ECCV 2024)"
    rerank = False

    def __init__(self, k: int = 2, keep: float = 0.5, role: str = "image", stream=None):
        if int(k) < 1:
            raise SteerError(f"FastV ranks with the attention of layer K-1, so K must be >= 1; got {k}")
        self.k, self.keep, self.role, self.stream = int(k), float(keep), role, stream
        DropTokens({self.k: self.keep}, role=role)  # validates keep

    def edits(self, model):
        return self._tag([DropTokens({self.k: self.keep}, role=self.role, rank="attention", stream=self.stream,
                                     rerank=self.rerank)])


class FastVRerank(FastV):
    """FastV re-ranking the image tokens at every generated token, without a KV cache (the FastV paper's own
    evaluation; Chen et al., ECCV 2024).

    Every decoding step recomputes the whole sequence (prompt + tokens generated so far): the image tokens are
    ranked by the attention of the newest token at layer `k - 1` and the top `keep` fraction is kept from layer
    `k` on, so the kept set may change from token to token. It needs `generate(..., use_cache=False)`
    (`generate_kwargs`); inside a steer block, a decode step fed from a KV cache raises `SteerError`. Costs a
    full forward per token. Parameters as `FastV`: k (int, default 2), keep (float in [0, 1], default 0.5),
    role (default "image"), stream (default the language stream)."""

    name = "fastv_rerank"
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, Chen et al., ECCV 2024), re-ranked per token"
    rerank = True
    generate_kwargs = {"use_cache": False}
