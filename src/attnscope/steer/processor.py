"""Contrastive decoding as a `transformers.LogitsProcessor`, for use outside a `steer` block:

    proc = ContrastiveProcessor(model, VCD())          # or a `Contrast` primitive
    model.generate(**inputs, logits_processor=[proc], max_new_tokens=32)

It runs the method's branch beside generate with its own KV cache (prefill on the first call, then one token per
step) and combines the scores exactly as inside `steer` (`Contrast.combine`). Inside a `steer` block the same
combination is applied by the block's forward hook, so do not pass both."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .edits import Contrast, SteerError


class ContrastiveProcessor(LogitsProcessor):
    def __init__(self, model, contrast, inputs: dict | None = None):
        from .session import as_model

        self.model = as_model(model)
        if not isinstance(contrast, Contrast):
            found = [e for e in contrast.edits(self.model) if isinstance(e, Contrast)] if hasattr(contrast, "edits") else []
            if not found:
                raise SteerError(f"{contrast!r} is not a contrastive decoder")
            contrast = found[0]
        contrast.check(self.model)
        self.contrast = contrast
        self.inputs = inputs
        self._session = None
        self._prompt = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from .session import steer

        if self.contrast.identity:
            return scores
        if self._session is None or self._prompt is None or input_ids.shape[1] <= self._prompt:
            main = dict(self.inputs or {})
            main["input_ids"] = input_ids
            if "attention_mask" not in main or main["attention_mask"].shape[1] != input_ids.shape[1]:
                main["attention_mask"] = torch.ones_like(input_ids)
            self._prompt = input_ids.shape[1]
            self._session = steer(self.model, *self.contrast.branch_edits)
            with self._session:
                branch = self._session.branch_logits_for(self.contrast, main, first=True)
        else:
            with self._session:
                branch = self._session.branch_logits_for(self.contrast, {"input_ids": input_ids[:, -1:]}, first=False)
        step = input_ids.shape[1] - self._prompt
        return self.contrast.combine(step, scores, branch.to(scores.device)).to(scores.dtype)
