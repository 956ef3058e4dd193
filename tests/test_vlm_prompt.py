"""A vision-language model's prompt on every surface: `Model.encode(text, image=...)` builds scene-vlm's chat prompt
with the image placeholder (a text that holds `<image>` already, or `chat=False`, is a raw prompt), the default
explanation (gradattn's bi-modal rule through the 2x2 pooling projector) works, and so do the report, explain,
capture and generate commands given --text with --image."""
import json

import pytest
import torch

import attnscope
from attnscope.cli import main

QUESTION = "Is there a bag in the image?"


@pytest.fixture(scope="module")
def vlm():
    return attnscope.load("scene-vlm")


def test_encode_builds_the_chat_prompt_with_the_image(vlm):
    x = vlm.encode(QUESTION, image="chelsea")
    ids = x["input_ids"][0]
    image_id = vlm.hf.config.image_token_id
    assert int((ids == image_id).sum()) == 64  # one placeholder, expanded to the projector's 8x8 tokens
    text = vlm.tokenizer.decode(ids[ids != image_id])
    assert text.index("user") < text.index(QUESTION) < text.rindex("assistant")  # one user turn, then the reply
    # the documented raw prompt: a text holding the placeholder is used as typed (the same ids here)
    raw = vlm.encode(vlm.prompt(QUESTION), image="chelsea")
    assert torch.equal(raw["input_ids"], x["input_ids"])
    # chat=False without a placeholder is the user's choice: transformers says the image has no place
    with pytest.raises(ValueError, match="image"):
        vlm.encode(QUESTION, image="chelsea", chat=False)
    # a text model is never wrapped unless asked
    tmap = vlm.token_maps(x)["language"][0]
    assert tmap.grids == [(8, 8)] and tmap.roles.count("image") == 64


def test_default_explanation_carries_relevance_through_the_pooling_projector(vlm):
    x = vlm.encode(QUESTION, image="chelsea")
    e = attnscope.explain(vlm, x)  # gradattn, vision="auto"
    assert e.method == "gradattn" and e.extras["bimodal"] is True and "bimodal_skipped" not in e.extras
    lm_only = attnscope.explain(vlm, x, vision=False)
    image = e.tokens.image_positions(0)
    # the rule moves relevance between image tokens but keeps the LM's total image relevance
    assert float(e.scores[image].sum()) == pytest.approx(float(lm_only.scores[image].sum()), rel=1e-4)
    assert not torch.allclose(e.scores[image], lm_only.scores[image])
    tower = torch.tensor(e.extras["tower_map"][0])
    assert tower.shape == (16, 16)  # the tower's patch grid, pooled 2x2 into the 64 tokens
    pooled = tower.reshape(8, 2, 8, 2).sum((1, 3)).reshape(-1)
    assert torch.allclose(pooled, e.scores[image], atol=1e-5)
    assert e.image_map().shape == (224, 224)


def test_every_command_takes_a_question_with_an_image(tmp_path, capsys):
    args = ["--model", "scene-vlm", "--image", "chelsea", "--text", QUESTION]
    assert main(["generate", *args, "--new-tokens", "6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["text"].split() and doc["text"].split()[0].strip(",.").lower() in ("yes", "no")  # an answer, not "\n\nA"
    assert main(["explain", *args, "--out", str(tmp_path / "e.json")]) == 0
    assert "gradattn" in capsys.readouterr().out
    assert main(["capture", *args, "--layers", "-1", "--out", str(tmp_path / "t.safetensors")]) == 0
    from attnscope.capture.trace import Trace

    trace = Trace.load(tmp_path / "t.safetensors")
    assert trace.run().tokens["language"][0].roles.count("image") == 64
    assert main(["report", *args, "--new-tokens", "3", "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 10_000
    capsys.readouterr()
    # the documented raw prompt: the user writes the placeholder and the chat markup
    raw = "<|im_start|>user\n<image>\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
    assert main(["generate", "--model", "scene-vlm", "--image", "chelsea", "--text", raw, "--raw-prompt",
                 "--new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == doc["text"]


def test_a_raw_prompt_without_the_placeholder_names_the_fix(vlm):
    with pytest.raises(ValueError, match="placeholder '<image>'"):
        vlm.encode("Is there a bag in the image?", image="chelsea", chat=False)
    x = vlm.encode("<image>\nIs there a bag in the image?", image="chelsea", chat=False)
    assert int((x["input_ids"] == vlm.hf.config.image_token_id).sum()) == 64
