"""Review r16b: a Knockout whose source set selects nothing (positions past the prompt, image keys on a text model)
is refused instead of silently blocking nothing; a subject word is found as whole tokens inside the question, not
inside another word ('he' in 'cathedral') or in the chat template ('assistant' after the question)."""
from __future__ import annotations

import pytest
import torch

from attnscope.core.dispatch import registered_names
from attnscope.flow import TokenSetError, token_sets
from attnscope.steer import Knockout, SteerError, steer

PROMPT = "The capital of France is"


def state(model):
    hf = model.hf
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())
    return hf.config._attn_implementation, hooks, registered_names()


@pytest.mark.parametrize("source, target", [([100], "last"), ([2, 100], "last"), ("image", "last"), ("image", [1, 2])])
def test_knockout_source_that_selects_nothing_is_refused(smollm, source, target):
    x = smollm.encode(PROMPT, chat=False)
    before = state(smollm)
    with pytest.raises(SteerError, match="select nothing|image tokens"):
        with torch.no_grad(), steer(smollm, Knockout(source=source, target=target, layers=[3])):
            smollm.hf(**x)
    assert state(smollm) == before


def _words(model, x, positions):
    tmap = model.token_maps(x)["text"][0]
    return model.tokenizer.convert_tokens_to_string([tmap.tokens[i] for i in positions]).strip()


def test_subject_inside_another_word_is_refused(smollm):
    x = smollm.encode("The father of the cathedral is", chat=False)
    with pytest.raises(TokenSetError, match="inside other tokens"):
        token_sets(smollm, x, subject="he")
    x = smollm.encode("A cat sat on the catalog of", chat=False)
    assert _words(smollm, x, token_sets(smollm, x, subject="cat")["subject"]) == "cat"


def test_subject_is_found_in_the_question_not_in_the_chat_template(smollm):
    q = "Who is the assistant of Holmes?"
    x = smollm.encode(q, chat=True)
    sets = token_sets(smollm, x, question=q, subject="assistant")
    tmap = smollm.token_maps(x)["text"][0]
    start = sets["question"][0] if sets["question"][0] < sets["subject"][0] else sets["subject"][0]
    assert _words(smollm, x, sets["subject"]) == "assistant"
    assert all(start <= i <= max(sets["question"]) for i in sets["subject"]), [tmap.tokens[i] for i in sets["subject"]]


@pytest.mark.parametrize("flow", ["last->subject", "last->question"])
def test_a_flow_from_later_to_earlier_positions_is_refused(smollm, flow):
    from attnscope.flow import knockout_curve

    before = state(smollm)
    with pytest.raises(TokenSetError, match="causal attention already"):
        knockout_curve(smollm, PROMPT, subject="France", flows=[flow], window=10, stride=10, chat=False)
    assert state(smollm) == before
