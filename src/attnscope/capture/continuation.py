"""Generation without a KV cache (`generate(use_cache=False)`, which FastVRerank needs): every step runs the whole
sequence again, so the capture sees a new run per step, whose input ids are the previous forward's plus one token per
row (rows possibly reordered by beam search). Those runs' token maps are built from the ids by the text role builder,
which cannot know that the tokens after the prompt were generated; `Continuation` tells them apart.

A chain is the forwards of one `generate` call (`seam.generate_call`: they run in the same call's frame); where the
forward's own arguments also say it is such a generation step (`seam.generating_without_cache`), the tokens after the
chain's first forward (the prompt) are labelled "generated", so that per-run readers (lookback ratio, role masses)
see them as a cached generation's steps would. A forward of another generate call is a new chain even where its
prompt extends the last forward by one token per row (a call on a prefix one token longer, or on the last call's
output): its prompt keeps its prompt labels, as with a cache. Where the same ids are fed by hand (a prefix scored a
token at a time), the labels stay the prompt's and the capture warns once: a guess either way would be a plausible
wrong label.
Each step stays its own run (`steps == 0`), so `step=None` readers do not stack them."""
from __future__ import annotations

import os
import sys
import warnings

import torch

from ..core import seam
from ..core.tokens import CACHED_STREAMS


_INSIDE = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__name__.split(".")[0]]))


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside torch and attnscope, counted from the caller: the user's call of
    the model, not torch's module call that runs the hook."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


class Continuation:
    """The chain of no-cache forwards in one capture block: the last forward's ids, the prompt's length and the
    generate call they ran in (its frame, held so that a later call cannot reuse its id; None: called by hand)."""

    def __init__(self):
        self._last: tuple[torch.Tensor, int, object] | None = None
        self._warned = False

    def reset(self) -> None:
        self._last = None

    def _continues(self, ids: torch.Tensor) -> bool:
        last = self._last
        if last is None or ids.shape[0] != last[0].shape[0] or ids.shape[1] != last[0].shape[1] + 1:
            return False
        before = last[0].to(ids.device)
        # every row is some row of the last forward plus one token (beam search reorders the rows)
        return bool((ids[:, None, :-1] == before[None]).all(-1).any(1).all())

    def label(self, run, inputs: dict, prefix: int, call=None) -> None:
        """Label `run` (just started by a forward with `inputs`, a cache prefix of `prefix` positions, inside the
        generate call `call`, `seam.generate_call()`) if it continues the chain."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or prefix or seam.has_cache(inputs):
            self._last = None
            return
        # a step of the same generate call, or one more forward by hand after forwards by hand
        follows = self._continues(ids) and self._last[2] is call
        prompt = self._last[1] if follows else ids.shape[1]
        self._last = (ids, prompt, call)
        if not follows:
            return
        generated = ids.shape[1] - prompt
        if call is not None and seam.generating_without_cache(inputs):
            for stream in CACHED_STREAMS:
                for tmap in run.tokens.get(stream) or []:
                    for i in range(len(tmap.roles) - generated, len(tmap.roles)):
                        tmap.roles[i] = "generated"
        elif not self._warned:
            self._warned = True
            warnings.warn(f"a forward without a KV cache continued the last one by one token per row ({generated} "
                          "tokens after the first forward of the chain), but its arguments are not those of "
                          "generate(use_cache=False): the tokens after the prompt are labelled as the prompt's "
                          "(text), not 'generated', and each forward is its own run. Generate with the cache, or "
                          "through generate(), to have them labelled as generated", stacklevel=_caller_level())
