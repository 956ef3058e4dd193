"""FastV's two generation forms on the trained scene-vlm (64 image tokens, 30 language layers):

* `FastV` ranks the image tokens once at the prompt and keeps that set in the KV cache: generating with it equals
  generating with the dropped keys masked from layer K on, at every step;
* `FastVRerank` (the FastV paper's evaluation) re-ranks at every new token without a cache: at each step the kept
  image tokens are the top ones by the newest token's attention at layer K-1 in the plain model, the kept set
  changes across steps, and its continuation equals a manual loop of one fresh FastV forward per token."""
from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope.steer import FastV, FastVRerank, MaskKeys, SteerError, generate_kwargs, parse, steer

NEW = 5
K, KEEP = 2, 0.5


@pytest.fixture(scope="module")
def vlm():
    from attnscope.scenes import SceneWorld

    model = attnscope.load("scene-vlm")
    image = SceneWorld(seed=0).scene("test", 0).image
    return model, model.encode(model.prompt("Describe the image."), image)


def image_positions(model, x) -> list[int]:
    return [i for i, t in enumerate(x["input_ids"][0].tolist()) if t == model.hf.config.image_token_id]


def test_the_two_forms_have_their_own_names():
    assert (FastV.name, FastVRerank.name) == ("fastv", "fastv_rerank")
    assert generate_kwargs([FastV()]) == {} and generate_kwargs([parse("fastv_rerank:k=3")]) == {"use_cache": False}
    assert "KV cache" in FastV.__doc__ and "re-rank" in FastVRerank.__doc__


def test_fastv_cached_set_equals_masking(vlm):
    model, x = vlm
    with torch.no_grad(), steer(model, FastV(k=K, keep=KEEP)) as session:
        pruned = model.generate(**x, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kept = session.state.kept[("language", K)][0].tolist()
    image = image_positions(model, x)
    dropped = [p for p in image if p not in kept]
    assert len(dropped) == len(image) - round(KEEP * len(image))
    n = model.streams["language"]
    with torch.no_grad(), steer(model, MaskKeys(layers=range(K, n), keys=dropped)):
        masked = model.generate(**x, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(pruned.sequences, masked.sequences)
    for a, b in zip(pruned.logits, masked.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_fastv_rerank_reranks_at_every_step(vlm):
    model, x = vlm
    kept_per_step = []
    with torch.no_grad(), steer(model, FastVRerank(k=K, keep=KEEP)) as session:
        keep = session._keep

        def spy(st, stream, layer, prev, fraction):
            out = keep(st, stream, layer, prev, fraction)
            kept_per_step.append((st.length(stream), out[0].tolist()))
            return out

        session._keep = spy
        ids = model.generate(**x, max_new_tokens=NEW, do_sample=False, **FastVRerank.generate_kwargs)
    prompt = x["input_ids"].shape[1]
    assert [length for length, _ in kept_per_step] == list(range(prompt, prompt + NEW))  # one ranking per token
    image = image_positions(model, x)
    sets = []
    for length, kept in kept_per_step:
        # the plain model's attention of the newest token at layer K-1, mean over heads, picks the kept set
        seq = {"input_ids": ids[:, :length], "attention_mask": torch.ones_like(ids[:, :length]),
               "pixel_values": x["pixel_values"]}
        with torch.no_grad(), attnscope.capture(model, streams="language", layers=K - 1, queries="last") as trace:
            model(**seq)
        scores = trace.attention("language", K - 1)[0, :, 0].mean(0)[image]
        top = sorted(image[i] for i in scores.topk(round(KEEP * len(image))).indices.tolist())
        assert [p for p in kept if p in image] == top
        sets.append(tuple(top))
    assert len(set(sets)) > 1  # the kept set moved with the generated tokens (the cached form never moves it)
    # the same continuation as one fresh FastV forward per token (what the paper's evaluation loop runs)
    seq = x["input_ids"]
    for _ in range(NEW):
        step = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "pixel_values": x["pixel_values"]}
        with torch.no_grad(), steer(model, FastV(k=K, keep=KEEP)):
            nxt = model(**step).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq, ids)


def test_fastv_rerank_refuses_a_cached_decode_step(vlm):
    model, x = vlm
    with pytest.raises(SteerError, match="use_cache=False"), torch.no_grad(), steer(model, FastVRerank()):
        model.generate(**x, max_new_tokens=2, do_sample=False)


def test_pope_generator_runs_fastv_rerank_without_a_cache(vlm):
    from attnscope.evaluate.pope import Generator

    model, x = vlm
    image = attnscope.scenes.SceneWorld(seed=0).scene("test", 0).image
    answer, _, tokens = Generator(model, max_new_tokens=3, steer="fastv_rerank")(image, "Is there a bag in the image?")
    assert tokens >= 1 and answer
