"""The role builder reads padding from the attention mask's last columns (transformers' mask covers the cached
positions, then the new ids) and refuses a mask narrower than the ids by name, rather than mislabelling or crashing."""
from __future__ import annotations

import pytest
import torch

from attnscope.models.roles import TokenMapError, text_maps


def test_pads_come_from_the_mask_columns_of_these_ids(smollm):
    ids = smollm.encode(["Hi", "The capital of France is"])["input_ids"]
    mask = smollm.encode(["Hi", "The capital of France is"])["attention_mask"]
    plain = text_maps(smollm.tokenizer, ids, mask)
    assert plain[0].roles[0] == "pad" and "pad" not in plain[1].roles
    cached = torch.cat([torch.zeros(2, 3, dtype=mask.dtype), mask], 1)  # a padded cache in front: same labels
    assert [m.roles for m in text_maps(smollm.tokenizer, ids, cached)] == [m.roles for m in plain]


def test_a_mask_narrower_than_the_ids_is_refused(smollm):
    x = smollm.encode("The capital of France is")
    with pytest.raises(TokenMapError, match="static or pre-allocated cache"):
        text_maps(smollm.tokenizer, x["input_ids"], x["attention_mask"][:, :-2])
