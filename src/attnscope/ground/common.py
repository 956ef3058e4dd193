"""What every grounding method shares: the model check, the prompt, the query positions (the answer position or a
chosen word of the question) and the attention rows of those queries over the image tokens, read with `capture`
(the model's own backend, SDPA, stays on; only the selected rows are recomputed beside it)."""
from __future__ import annotations

import re

import torch

GENERIC_PROMPT = "Write a general description of the image."  # the reference prompt of relative attention


class GroundingError(ValueError):
    """A grounding request the model or the input cannot serve (the message names the fix)."""


def check_model(model) -> None:
    """Grounding reads a vision-language model's attention from text to image tokens; refuse anything else."""
    if model.spec.kind != "vlm" or model.image_token is None:
        raise GroundingError(f"{model.name} is a {model.spec.kind} model without image tokens; grounding maps a question "
                             "onto an image through a vision-language model's attention: load one, e.g. "
                             "attnscope.load('scene-vlm')")


def image_positions(model, inputs: dict) -> tuple[list[int], tuple[int, int]]:
    """(positions of image 0's tokens in the language sequence in row-major order, its (rows, cols) grid)."""
    tmap = model.token_maps(inputs)["language"][0]
    if not tmap.grids:
        raise GroundingError("the prompt holds no image tokens; pass image=... with the question")
    return tmap.image_positions(0), tmap.grids[0]


def word_positions(model, inputs: dict, question: str, word: str) -> list[int]:
    """Positions of the tokens that spell `word` (whole word, case-insensitive) inside the question's part of the
    prompt: TAG's query tokens. Raises GroundingError naming the words there are when `word` is not in the question."""
    if not isinstance(word, str) or not word.strip():
        raise GroundingError("target must be a non-empty word of the question")
    ids = inputs["input_ids"][0].tolist()
    # each token's (start, end) in the decoded prompt; the tokens of a character whose bytes they split (an emoji)
    # decode alone to replacement characters, so they are decoded together and share the character's span
    text, spans, k = "", [], 0
    while k < len(ids):
        j = k + 1
        piece = model.tokenizer.decode(ids[k:j])
        while piece.endswith("\ufffd") and j < len(ids) and j - k < 8:
            longer = model.tokenizer.decode(ids[k:j + 1])
            j, piece = j + 1, longer
            if not longer.endswith("\ufffd"):
                break
        if piece.endswith("\ufffd"):  # not a split character after all: keep the token alone
            j, piece = k + 1, model.tokenizer.decode(ids[k:k + 1])
        spans += [(len(text), len(text) + len(piece))] * (j - k)
        text += piece
        k = j
    q_at = text.rfind(question.strip())
    pattern = re.compile(rf"(?<![\w-]){re.escape(word.strip())}(?![\w-])", re.IGNORECASE)
    found = pattern.search(question.strip())
    if q_at < 0 or found is None:
        words = sorted(set(re.findall(r"[\w-]+", question)))
        raise GroundingError(f"target word {word!r} is not in the question {question!r}; choose one of its words "
                             f"({', '.join(words)}) or leave target unset to ground the answer position")
    lo, hi = q_at + found.start(), q_at + found.end()
    out = [k for k, (s, e) in enumerate(spans) if s < hi and e > lo]
    return out


def query_positions(model, inputs: dict, question: str, target: str | None) -> list[int]:
    """The rows whose attention grounds the question: the last prompt position (the one that predicts the answer's
    first token) by default, or the tokens of `target` in the question."""
    if target is None:
        return [int(inputs["input_ids"].shape[1]) - 1]
    return word_positions(model, inputs, question, target)


def layer_range(layers, n: int) -> list[int]:
    """"all", "middle" (the middle third), an int or a list of ints (negatives count from the end)."""
    if layers == "all" or layers is None:
        return list(range(n))
    if layers == "middle":
        return list(range(n // 3, (2 * n + 2) // 3))
    items = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in items if not isinstance(i, int) or not -n <= i < n]
    if bad or not items:
        raise GroundingError(f"layers {bad or items} out of range: the language model has {n} layers (0..{n - 1}, "
                             "negatives allowed, or 'all' / 'middle')")
    return sorted({i % n for i in items})


def rows_to_image(model, inputs: dict, queries: list[int], layers: list[int]) -> torch.Tensor:
    """Attention of the query rows to image 0's tokens: [layers, heads, queries, rows*cols] (float32), one forward
    under `capture` (only the chosen rows are recomputed; the model's backend and outputs are unchanged)."""
    from ..capture.session import capture

    positions, _ = image_positions(model, inputs)
    with capture(model, streams="language", layers=layers, queries=queries) as trace, torch.no_grad():
        model.hf(**inputs)
    return torch.stack([trace.attention("language", l)[0][..., positions].float().cpu() for l in layers])


def full_attention(model, inputs: dict, layers: list[int]) -> list[torch.Tensor]:
    """Every row of the language model's attention at `layers`: a list of [heads, N, N] on the CPU (the layers of a
    model on a GPU, or split over several devices, live on their own devices), one forward."""
    from ..capture.session import capture

    with capture(model, streams="language", layers=layers) as trace, torch.no_grad():
        model.hf(**inputs)
    return [trace.attention("language", l)[0].float().cpu() for l in layers]


def normalise(grid: torch.Tensor) -> torch.Tensor:
    """Non-negative, summing to 1 (a uniform map where nothing is positive)."""
    grid = grid.float().clamp_min(0)
    total = grid.sum()
    return grid / total if float(total) > 0 else torch.full_like(grid, 1.0 / grid.numel())
