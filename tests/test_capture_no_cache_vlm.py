"""A VLM generating without a cache (`generate(..., use_cache=False)`, which `FastVRerank` needs): every step is a
whole-sequence forward that transformers feeds the image features it encoded once (`mm_encoder_outputs`), not the
pixel values. The capture labels the image positions of every step's run as image tokens, as the model used them
(they read "text" before: image ratio 0, no image roles, at every step after the first)."""
from __future__ import annotations

import torch

import attnscope
import attnscope.steer as st


def _prompt(vlm):
    return vlm.encode("Describe the image.", image="coffee")


def test_every_step_of_a_no_cache_generation_labels_the_image_tokens(scene_vlm):
    x = _prompt(scene_vlm)
    with torch.no_grad(), attnscope.capture(scene_vlm, streams="language", queries="last", layers=[0, -1]) as trace:
        scene_vlm.generate(**x, max_new_tokens=3, do_sample=False, use_cache=False)
    first = trace.tokens("language", run=0)
    assert first.roles.count("image") == 64
    assert len(trace.runs) == 3
    for run in range(1, len(trace.runs)):
        tmap = trace.tokens("language", run=run)
        assert tmap.roles[:len(first)] == first.roles, run  # the prompt's positions keep their roles
        assert tmap.patch[:len(first)] == first.patch, run
    assert any("pixel_values" in item for item in trace.provenance["inputs"][1:])


def test_summaries_under_fastv_rerank_see_the_image_tokens_at_every_step(scene_vlm):
    x = _prompt(scene_vlm)
    with torch.no_grad(), st.steer(scene_vlm, st.FastVRerank(keep=0.5)), attnscope.capture(
            scene_vlm, streams="language", queries="last", layers=[1, 5], summaries="all") as s:
        scene_vlm.generate(**x, max_new_tokens=3, do_sample=False, use_cache=False)
    image = attnscope.core.tokens.ROLES.index("image")
    for run in range(len(s.runs)):
        assert int(s.key_count("language", 1, step=0, run=run)[0, image]) == 64, run  # before the pruning layer
        assert int(s.key_count("language", 5, step=0, run=run)[0, image]) == 32, run  # after it: half kept
        assert float(s.image_ratio("language", 5, step=0, run=run).max()) > 0, run
