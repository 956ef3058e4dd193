"""Token sets for information-flow analysis, found from token roles and the words the user wrote, never from
hard-coded index ranges.

| set        | positions                                                                           |
|------------|-------------------------------------------------------------------------------------|
| `image`    | the image tokens (role "image"; VLMs only)                                          |
| `question` | the tokens that spell the question text (`question=`), the last position excluded   |
| `subject`  | the tokens that spell `subject=` (last occurrence in the question, else in the prompt), the last position excluded |
| `other`    | every other position of the prompt: not image, question, subject, last, or padding   |
| `last`     | the last position (the row that predicts the answer)                                |

Words are found by their characters, in any script: the tokens are decoded by the tokenizer itself, and a
character whose bytes a byte-level BPE (or SentencePiece's byte fallback) splits over several tokens (Cyrillic, CJK,
emoji) belongs to each of them (`token_characters`). Whitespace is ignored on both sides (so byte-level and
SentencePiece tokenizers agree), a match starts and ends on token boundaries (no word inside another), and the
tokens it covers form the set. A word the prompt does not contain is an error naming the fix."""
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


def token_characters(tok, pieces: list[str], context: int = 8) -> tuple[str, list[set[int]]]:
    """(text, owners): the text that the token `pieces` spell, as the tokenizer decodes them, and for each character
    the indices of the pieces that hold it. Each piece's text is what decoding it after up to `context` pieces adds
    (so WordPiece's '##' and SentencePiece's leading '▁' read as the tokenizer writes them); a character that the
    earlier pieces left incomplete (a byte-level BPE or byte-fallback piece with the first byte of 'Р' or '中'
    decodes to U+FFFD) is replaced by the one the later piece completes, and belongs to every piece in between. Pieces the tokenizer's
    vocabulary does not hold (and every piece without a tokenizer) are their own text."""
    if tok is None:
        return "".join(pieces), [{k} for k, p in enumerate(pieces) for _ in p]
    ids = tok.convert_tokens_to_ids(list(pieces))
    unk = getattr(tok, "unk_token_id", None)
    chars: list[str] = []
    owners: list[set[int]] = []
    start = 0  # the decoding context begins here (after the last piece outside the vocabulary)
    for k, (piece, tid) in enumerate(zip(pieces, ids)):
        if tid is None or (tid == unk and piece != tok.unk_token):
            chars += piece
            owners += [{k} for _ in piece]
            start = k + 1
            continue
        start = max(start, k - context)
        before = tok.decode(ids[start:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        after = tok.decode(ids[start:k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        same = next((c for c, (x, y) in enumerate(zip(before, after)) if x != y), min(len(before), len(after)))
        new = after[same:]
        if not new:  # a middle byte of a character still incomplete (decoded as U+FFFD before and after it)
            if chars and chars[-1] == "\ufffd":
                owners[-1].add(k)
            continue
        drop = min(len(before) - same, len(chars))  # characters this piece rewrites (completes)
        replaced = owners[len(owners) - drop:] if drop else []
        del chars[len(chars) - drop:], owners[len(owners) - drop:]
        chars += new
        owners += [{k} for _ in new]
        for i, own in enumerate(replaced):
            owners[len(owners) - len(new) + min(i, len(new) - 1)] |= own
    return "".join(chars), owners


def _as_tokenized(tok, words: str) -> str:
    """`words` as the prompt's decoded tokens spell them: an uncased tokenizer (MiniLM's WordPiece) lowercases and
    strips accents, so 'Paris' reads 'paris' in its prompt. Words with a character the vocabulary lacks are kept as
    written (their [UNK] would match any other unknown character)."""
    if tok is None or not words.strip():
        return words
    ids = tok(words, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids:
        return words
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_words(model, tmap, words: str, allowed: list[int]) -> list[int]:
    """Positions (among `allowed`) whose tokens spell `words` (last occurrence, whitespace ignored). The match must
    start at a token's first character and end at a token's last one: 'he' is not found inside ' cathedral', nor
    'cat' inside ' catalog'."""
    wanted = _SPACE.sub("", _as_tokenized(model.tokenizer, words or ""))
    if not wanted:
        raise TokenSetError("the words to find are empty")
    text, owners = token_characters(model.tokenizer, [tmap.tokens[pos] for pos in allowed])
    kept = [(ch, [allowed[k] for k in own]) for ch, own in zip(text, owners) if not ch.isspace()]
    joined = "".join(ch for ch, _ in kept)
    first, last = {}, {}
    for c, (_, own) in enumerate(kept):
        for pos in own:
            first.setdefault(pos, c)
            last[pos] = c + 1
    starts, ends = set(first.values()), set(last.values())
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
    return sorted({pos for _, own in kept[at: at + len(wanted)] for pos in own})


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
