"""Attention from chosen prompt tokens: the image tokens the target word's tokens attend to.

Paper: "Attention-driven GUI Grounding: Leveraging Pretrained Multimodal Large Language Models without Fine-Tuning"
(TAG, Tuning-free Attention-driven Grounding): the attention from chosen prompt tokens (the
words naming the target) to the image tokens locates the target, with no training.

Here: `target="bag"` picks the tokens spelling "bag" in the question (`common.word_positions`); without a target the
query is the last prompt position, i.e. plain answer-position attention (the baseline the relative method divides).
The map is the attention of those rows to the image tokens, averaged over heads, query tokens and the chosen layers.
Cost: one forward, backend untouched.

Defaults, and why: `layers="all"` (on 40 objects of scene-vlm's val scenes the mean over all layers pointed best,
0.675, against 0.55 for the middle third and 0.625 for early bands; single layers vary widely)."""
from __future__ import annotations

from . import common

NAME = "tag"
DEFAULTS = {"layers": "all"}
FORWARDS = 1


def run(model, inputs, photo, question, queries, layers="all"):
    chosen = common.layer_range(layers, model.streams["language"])
    rows = common.rows_to_image(model, inputs, queries, chosen)  # [layers, heads, queries, image tokens]
    return rows.mean(dim=(0, 1, 2)), {"layers": chosen}
