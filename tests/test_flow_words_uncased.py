"""Token sets on an uncased WordPiece tokenizer (MiniLM lowercases and strips accents): words are found as the user
wrote them in the prompt ('Eiffel Tower', 'café', 'Кошка'), since the words are read as the tokenizer reads them; a
character outside the vocabulary is not matched to another one's [UNK]."""
from __future__ import annotations

import pytest

from attnscope.flow import TokenSetError, token_sets


def _spelled(model, x, positions):
    return [model.token_maps(x)["text"][0].tokens[p] for p in positions]


@pytest.mark.parametrize("text,subject,tokens", [
    ("Is the Eiffel Tower in Paris?", "Eiffel Tower", ["e", "##iff", "##el", "tower"]),
    ("Is the Eiffel Tower in Paris?", "Paris", ["paris"]),
    ("A naïve café owner.", "café", ["cafe"]),
    ("Кошка сидит на ковре.", "Кошка", ["к", "##о", "##ш", "##ка"]),
])
def test_words_as_written_are_found_in_an_uncased_prompt(minilm, text, subject, tokens):
    x = minilm.encode(text=text)
    sets = token_sets(minilm, x, question=text, subject=subject)
    assert _spelled(minilm, x, sets["subject"]) == tokens


def test_an_unknown_character_is_not_matched_to_another_unknown_one(minilm):
    x = minilm.encode(text="猫 and 爱 here")
    with pytest.raises(TokenSetError, match="not in the prompt"):
        token_sets(minilm, x, subject="狗")
