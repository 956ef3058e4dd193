"""Summaries reduced in the attention call on scene-vlm: both streams, every generate step, under steering, and the
Lookback Lens traces read from them, each equal to the same quantity from captured rows (themselves checked against
the model's eager attention by `attnscope check` and tests/test_capture_*)."""
import numpy as np
import pytest
import torch

import attnscope
from attnscope.core.tokens import ROLES
from test_capture_summaries import assert_matches, reference


@pytest.fixture(scope="module")
def vlm(scene_vlm):
    return scene_vlm


def test_scene_vlm_image_ratio_and_vision_summaries_equal_captured_rows(vlm):
    """Both streams of the VLM: the language model's image ratio at every generate step and the DINOv2 tower's
    summaries equal those computed from full captured rows (themselves checked against eager by `attnscope check`)."""
    from attnscope.scenes import SceneWorld, question

    scene = SceneWorld(seed=0).scene("test", 3)
    x = vlm.encode(vlm.prompt(question(scene.classes[0])), scene.image)
    select = {"streams": ["vision", "language"], "layers": {"vision": [0, 11], "language": [0, 15, 29]},
              "queries": "last"}
    with torch.no_grad():
        with attnscope.capture(vlm, **select) as rows:
            out = vlm.generate(**x, max_new_tokens=3, do_sample=False)
        with attnscope.capture(vlm, **select, summaries="all") as s:
            out2 = vlm.generate(**x, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, out2)
    for stream, layers in select["layers"].items():
        for layer in layers:
            for rec in rows.run().records[(stream, layer)]:
                roles = rows.tokens(stream).roles[:rec.probs.shape[-1]]
                assert_matches(s.record(stream, layer, step=rec.step), reference(rec.probs, roles), rec.probs)
    image = torch.tensor([r == "image" for r in rows.tokens("language").roles])
    assert image.sum() == 64
    for layer in (0, 15, 29):
        ratio = s.image_ratio("language", layer, step=None)  # [steps, B, heads]
        want = torch.stack([rec.probs[:, :, 0, image[:rec.probs.shape[-1]]].sum(-1)
                            for rec in rows.run().records[("language", layer)]])
        torch.testing.assert_close(ratio, want, atol=1e-5, rtol=0)


def test_lookback_traces_from_summaries_equal_those_from_rows(vlm):
    """`evaluate.lookback.generate_traced` reads its means from the summaries; the same means from the rows of a
    capture of the same generation agree to 1e-5."""
    from attnscope.evaluate.lookback import generate_traced
    from attnscope.scenes import SceneWorld

    scene = SceneWorld(seed=0).scene("test", 5)
    fast = generate_traced(vlm, scene.image, "Describe the image.", max_new_tokens=6)
    rows = generate_traced(vlm, scene.image, "Describe the image.", max_new_tokens=6, keep_image_share=True)
    assert fast.token_ids == rows.token_ids and fast.text == rows.text
    for name in ("ctx_mean", "image_mean", "new_mean", "image_mass"):
        a, b = getattr(fast, name), getattr(rows, name)
        assert a.shape == b.shape == (len(rows.token_ids), 30, 9)
        assert abs(a - b).max() < 1e-5, name
    assert abs(fast.lookback_ratio() - rows.lookback_ratio()).max() < 1e-5


def test_summaries_under_steering_equal_rows_under_steering(vlm):
    """Inside a steer block (PAI edits the probabilities; FastV drops image tokens from layer 2 on, so later layers'
    keys are kept positions, not a range) the summaries equal those of the rows captured under the same steering."""
    from attnscope.scenes import SceneWorld, question
    from attnscope.steer import PAI, FastV

    scene = SceneWorld(seed=0).scene("test", 7)
    x = vlm.encode(vlm.prompt(question(scene.classes[0])), scene.image)
    for method in (PAI(), FastV(k=2, keep=0.5)):
        results = []
        for summaries in (None, "all"):
            with torch.no_grad(), attnscope.steer(vlm, method), attnscope.capture(
                    vlm, streams="language", layers=[1, 3, 20], queries="last", summaries=summaries) as result:
                vlm.generate(**x, max_new_tokens=2, do_sample=False)
            results.append(result)
        rows, s = results
        for layer in (1, 3, 20):
            for rec in rows.run().records[("language", layer)]:
                keys = rec.keys if rec.keys is not None else list(range(rec.probs.shape[-1]))
                roles = [rows.tokens("language").roles[k] for k in keys]
                got = s.record("language", layer, step=rec.step)
                want = reference(rec.probs, roles)
                for name in ("role_mass", "entropy", "lookback"):
                    torch.testing.assert_close(getattr(got, name), want[name], atol=1e-5, rtol=0)
                torch.testing.assert_close(got.topk_value, want["top"], atol=1e-5, rtol=0)
                column = {k: i for i, k in enumerate(keys)}  # absolute position -> column of the rows
                cols = got.topk_index.clone().apply_(lambda k: column[k])
                torch.testing.assert_close(rec.probs.gather(-1, cols), got.topk_value, atol=1e-5, rtol=0)
        image_keys = s.record("language", 3).key_count[0, ROLES.index("image")]
        assert image_keys == (32 if isinstance(method, FastV) else 64)  # FastV kept half of the 64 image tokens


def test_contrastive_branch_steps_are_not_recorded(scene_vlm):
    """VCD runs a second (distorted-image) forward at every step, in its steer block's `exclusive`: the capture beside
    it records the main sequence only, so every step can be read at once, its prefill equals an unsteered capture's,
    and generate_traced's per-step means run under VCD."""
    from attnscope.evaluate.lookback import generate_traced
    from attnscope.steer import VCD

    x = scene_vlm.encode("Is there a bag in the image?", image="chelsea")
    with torch.no_grad():
        with attnscope.capture(scene_vlm, streams="language", layers=[5], queries="last", summaries="all") as plain:
            scene_vlm(**x)
        with attnscope.steer(scene_vlm, VCD()), attnscope.capture(
                scene_vlm, streams="language", layers=[5], queries="last", summaries="all") as s:
            scene_vlm.generate(**x, max_new_tokens=3, do_sample=False)
    assert [r.step for r in s.run().records[("language", 5)]] == [0, 1, 2]
    for read in ("lookback", "entropy", "key_count"):
        every = getattr(s, read)("language", 5, step=None)
        assert every.shape[0] == 3
        torch.testing.assert_close(every[0].flatten(), getattr(plain, read)("language", 5, step=0).flatten(), atol=0, rtol=0)
    for share in (False, True):
        traced = generate_traced(scene_vlm, "chelsea", "Is there a bag in the image?", max_new_tokens=2, steer=VCD(),
                                 keep_image_share=share)
        assert traced.ctx_mean.shape[0] == len(traced.token_ids) and np.isfinite(traced.image_mass).all()
        assert (traced.image_share is not None) == share
