"""Token sets for information-flow analysis, found from token roles and the words the user wrote, never from
hard-coded index ranges.

| set        | positions                                                                           |
|------------|-------------------------------------------------------------------------------------|
| `image`    | the image tokens (role "image"; VLMs only)                                          |
| `question` | the tokens that spell the question text (`question=`), the last position excluded   |
| `subject`  | the tokens that spell `subject=` (last occurrence in the question, else in the prompt), the last position excluded |
| `other`    | every other position of the prompt: not image, question, subject, last, or padding   |
| `last`     | the last position (the row that predicts the answer)                                |

Words are found by their characters: each position's token piece is turned back into text, whitespace is
ignored on both sides (so byte-level and SentencePiece tokenizers agree), a match starts and ends on token
boundaries (no word inside another), and the tokens it covers form the set. A word the prompt does not contain is
an error naming the fix."""
from __future__ import annotations

import re

SETS = ("image", "question", "subject", "other", "last")
_SPACE = re.compile(r"\s+")


class TokenSetError(ValueError):
    """A token set that does not exist for this model or input (unknown name, no image, words not in the prompt)."""


def check_set_names(model, names) -> None:
    """Raise TokenSetError for a name that is not a set, or `image` on a model without image tokens."""
    for name in names:
        if name not in SETS:
            raise TokenSetError(f"unknown token set {name!r}; sets are {', '.join(SETS)}")
        if name == "image" and model.spec.kind != "vlm":
            raise TokenSetError(f"{model.name} is a {model.spec.kind} model with no image tokens; use the sets "
                                "question, subject, other and last (or a vision-language model such as scene-vlm)")


def _stream_map(model, inputs):
    maps = model.token_maps(inputs)
    for stream in ("language", "text"):
        if maps.get(stream):
            if len(maps[stream]) != 1:
                raise TokenSetError(f"token sets are found for one input at a time; got a batch of {len(maps[stream])}")
            return maps[stream][0]
    raise TokenSetError(f"{model.name} has no language stream to find token sets in (streams: {sorted(maps)})")


def find_words(model, tmap, words: str, allowed: list[int]) -> list[int]:
    """Positions (among `allowed`) whose tokens spell `words` (last occurrence, whitespace ignored). The match must
    start at a token's first character and end at a token's last one: 'he' is not found inside ' cathedral', nor
    'cat' inside ' catalog'."""
    wanted = _SPACE.sub("", words or "")
    if not wanted:
        raise TokenSetError("the words to find are empty")
    tok = model.tokenizer
    text, owner, starts, ends = [], [], set(), set()
    for pos in allowed:
        piece = tmap.tokens[pos]
        piece = tok.convert_tokens_to_string([piece]) if tok is not None else piece
        piece = _SPACE.sub("", piece)
        if piece:
            starts.add(len(owner))
            ends.add(len(owner) + len(piece))
        text.append(piece)
        owner.extend([pos] * len(piece))
    joined = "".join(text)
    at, end = -1, len(joined)
    while True:
        at = joined.rfind(wanted, 0, end)
        if at < 0 or (at in starts and at + len(wanted) in ends):
            break
        end = at + len(wanted) - 1
    if at < 0:
        if wanted in joined:
            raise TokenSetError(f"{words!r} is in the prompt only inside other tokens (its text: {joined[:200]!r}); pass "
                                "whole words as they appear in the prompt")
        raise TokenSetError(f"{words!r} is not in the prompt (its text: {joined[:200]!r}); pass words exactly as they "
                            "appear in the prompt")
    return sorted(set(owner[at: at + len(wanted)]))


def token_sets(model, inputs: dict, question: str | None = None, subject: str | None = None) -> dict[str, list[int]]:
    """{set name: sorted positions} for one encoded input. `question`/`subject` are the words to find; sets that do
    not apply (no image, no words given) are left out. Sets never overlap: subject is taken out of question."""
    tmap = _stream_map(model, inputs)
    n = len(tmap)
    if n < 2:
        raise TokenSetError("the prompt has fewer than 2 tokens: nothing can flow into the last position")
    last = n - 1
    roles = tmap.roles
    image = [i for i, r in enumerate(roles) if r == "image"]
    spelled = [i for i, r in enumerate(roles) if r not in ("image", "pad")]  # words may end on the last token
    words = [i for i in spelled if i != last]
    out: dict[str, list[int]] = {"last": [last]}
    if image:
        out["image"] = image
    taken: set[int] = {last}
    spelled_q = find_words(model, tmap, question, spelled) if question is not None else None
    if subject is not None:
        try:  # the subject inside the question first (not the same word in a chat template around it)
            found = find_words(model, tmap, subject, spelled_q or spelled)
        except TokenSetError:
            if not spelled_q:
                raise
            found = find_words(model, tmap, subject, spelled)
        out["subject"] = [i for i in found if i not in taken]
        if not out["subject"]:
            raise TokenSetError(f"the subject {subject!r} is only the last token; the last position is its own set")
        taken |= set(out["subject"])
    if question is not None:
        found = [i for i in spelled_q if i not in taken]
        if not found:
            raise TokenSetError("the question has no tokens left once the subject is taken out")
        out["question"] = found
        taken |= set(found)
    other = [i for i in words if i not in taken]
    if other:
        out["other"] = other
    return out
