"""The sequence ledger: which absolute position every query row and key column of an attention call belongs to.

Capture and steer each keep one `Ledger` per session and ask it, for every top-level forward, whether the forward
starts a sequence or continues the one in flight, and, for every attention call of a cached stream, the absolute
positions of its query rows and key columns. Everything comes from what the model really holds, never from an
assumption that the cache keeps every past key:

- a forward continues the sequence in flight only if it brings the same cache object, holding exactly the tokens
  the ledger has seen (fewer only when token pruning, published in `kept_positions`, dropped some); a cache
  cropped back (assisted or speculative decoding rejecting drafts) is refused, since the rejected tokens would
  stay in the labels; a cache that already held tokens when the ledger first saw it (a prefix cache made before
  the block) starts a sequence whose first `prefix` positions were never seen;
- a call's keys are the last `K` positions of the sequence (a sliding-window or cropped cache layer returns a
  window ending at the current token; a full layer returns all of them); keys that cannot be placed that way
  (a pre-allocated static cache) are an error, never a guess;
- beam search reorders the cache between steps (`Cache.reorder_cache`); the ledger sees each reorder and tells
  its owner, so token maps follow the beams.

Streams without a cache (vision towers, encoders) have positions 0..K-1 within each call; the ledger has no say
there."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import seam


_KEPT: dict[int, dict] = {}


def kept_positions(model, create: bool = True, reset: bool = False) -> dict:
    """{(stream, layer): original positions [B, n] of the keys a layer still holds} for the sequence in flight on
    `model`, after token pruning (FastV, PyramidDrop, VTC-CLS). Steer fills it; capture reads it, so rows of a
    pruned layer are labelled with the positions they really are."""
    key = id(model)
    if reset or (create and key not in _KEPT):
        _KEPT[key] = {}
    return _KEPT.get(key, {})


def forget_kept(model) -> None:
    _KEPT.pop(id(model), None)


class LedgerError(RuntimeError):
    """Keys or queries whose absolute positions cannot be known."""


@dataclass(frozen=True)
class Begin:
    """What a top-level forward is: a new sequence (with `prefix` cached tokens made elsewhere) or the next step."""

    new: bool
    base: int  # tokens of the sequence before this forward's queries
    prefix: int = 0  # of `base`, tokens cached before the ledger saw the sequence (roles unknown)


class Ledger:
    def __init__(self, on_reorder: Callable[[torch.Tensor], None] | None = None):
        self.on_reorder = on_reorder
        self.cache = None
        self.length = 0  # tokens of the sequence in flight, this forward's included
        self._unwatch: list[Callable[[], None]] = []

    # --- forwards --------------------------------------------------------------------------------------------
    def begin(self, inputs: dict, pruning: bool = False) -> Begin:
        """Place a top-level forward: read its cache (by type) and its number of new tokens. `pruning`: token
        pruning is dropping keys from this sequence's cache, so the cache may hold fewer tokens than were seen."""
        cache = seam.find_cache(inputs)
        seen = seam.cache_length(cache)
        q = seam.query_length(inputs)
        if seen > 0 and cache is self.cache and seen < self.length and not pruning:
            raise LedgerError(f"the cache was cropped from {self.length} to {seen} tokens between two forwards "
                              "(assisted or speculative decoding rejecting draft tokens); attnscope does not follow "
                              "rejected drafts yet, so it refuses rather than label them. Generate without "
                              "assistant_model / prompt_lookup_num_tokens inside this block")
        if seen > 0 and cache is self.cache and seen <= self.length:  # fewer: token pruning dropped some
            out = Begin(False, self.length)
        else:
            out = Begin(True, seen, prefix=seen)
            if cache is not self.cache:
                self._watch(cache)
        self.cache, self.length = cache, out.base + q
        return out

    def close(self) -> None:
        for undo in self._unwatch:
            undo()
        self._unwatch = []
        self.cache = None

    def _watch(self, cache) -> None:
        for undo in self._unwatch:
            undo()
        self._unwatch = []
        if cache is not None and self.on_reorder is not None:
            self._unwatch.append(seam.watch_reorder(cache, self.on_reorder))

    # --- attention calls ---------------------------------------------------------------------------------------
    def placed(self, q_len: int, kv_len: int, where: str = "") -> tuple[int, int]:
        """(first query position, first key position) of a call of a cached stream (see `place`)."""
        return place(self.length, q_len, kv_len, where)


def place(total: int, q_len: int, kv_len: int, where: str = "") -> tuple[int, int]:
    """(first query position, first key position) of an attention call with `q_len` queries and `kv_len` keys in a
    cached sequence of `total` tokens: keys are the last `kv_len` positions (all of them, or a sliding-window or
    cropped layer's window), queries the last `q_len`; positions are consecutive from there. Used by capture
    (`Ledger.placed`) and by steer (`CallContext`)."""
    if q_len > total or kv_len < q_len and kv_len != total:
        raise LedgerError(f"{where}an attention call with {q_len} queries and {kv_len} keys does not fit a sequence "
                          f"of {total} tokens")
    if kv_len > total:
        raise LedgerError(f"{where}the attention call sees {kv_len} keys but the sequence holds {total} tokens: a "
                          "pre-allocated (static) cache or keys from elsewhere; attnscope cannot place them. Use the "
                          "default dynamic cache (cache_implementation=None)")
    return total - q_len, total - kv_len
