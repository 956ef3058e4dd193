"""`Model.encode` of several prompts: a model that generates gets its batch padded on the left (every row ends with
its own last token, as generate and `queries="last"` expect), an encoder on the right; a VLM batch with images is
padded too, and each row generates what it generates alone."""
from __future__ import annotations

import torch

PROMPTS = ["Hi", "The capital of France is"]


def test_generating_models_pad_on_the_left_encoders_on_the_right(smollm, minilm):
    lm, enc = smollm.encode(PROMPTS)["attention_mask"], minilm.encode(PROMPTS)["attention_mask"]
    assert lm[0, 0] == 0 and bool(lm[:, -1].all())
    assert enc[0, -1] == 0 and bool(enc[:, 0].all())
    right = smollm.encode(PROMPTS, padding_side="right")["attention_mask"]  # the caller's choice still wins
    assert right[0, -1] == 0


def test_a_vlm_batch_with_images_generates_each_row_as_alone(scene_vlm):
    questions = ["Is there a cat?", "Is there a bag in the picture, on the left of the image?"]
    x = scene_vlm.encode(questions, image=["chelsea", "chelsea"])
    assert x["attention_mask"][0, 0] == 0 and bool(x["attention_mask"][:, -1].all())
    with torch.no_grad():
        batch = scene_vlm.generate(**x, max_new_tokens=2, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    for row, q in enumerate(questions):
        y = scene_vlm.encode(q, image="chelsea")
        with torch.no_grad():
            alone = scene_vlm.generate(**y, max_new_tokens=2, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
        assert batch.sequences[row, -2:].tolist() == alone.sequences[0, -2:].tolist()
        torch.testing.assert_close(batch.logits[0][row], alone.logits[0][0], atol=1e-3, rtol=0)
