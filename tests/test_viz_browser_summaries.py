"""In a real browser (Chromium through Playwright): a summaries file opens in the served app (the trace upload) and as
the page `attnscope view` writes; a cell of the layers x heads grid shows the number the `Summaries` reader returns,
a clicked head lists its top-k keys as the file's tokens, and an answer that comes after the user moved to another
step is not drawn over it (answers are held back with page.route to force the order)."""
import pytest
import torch

import attnscope
from attnscope.capture.trace import Trace
from attnscope.cli import main
from attnscope.viz.data import clean_token
from browser import VIEWPORT, chromium, expect, needs_browser, open_page, serve, upload  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


@pytest.fixture(scope="module")
def summaries(smollm, tmp_path_factory):
    """smollm2-135m generating 4 tokens (steps 0..3), every layer's last row summarised; read back from its file."""
    with torch.no_grad(), attnscope.capture(smollm, queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=4, do_sample=False)
    path = s.save(tmp_path_factory.mktemp("browser-summaries") / "gen.safetensors")
    return Trace.load(path), path


@pytest.fixture(scope="module")
def url():
    yield from serve({})


def cell(page, layer: int, head: int):
    return page.locator(f"td.as-sumcell[data-l='{layer}'][data-h='{head}']")


def shown(page, layer: int, head: int) -> float:
    return float(cell(page, layer, head).get_attribute("data-value"))


def test_served_upload_shows_the_readers_numbers_and_a_late_answer_is_not_drawn(chromium, url, summaries):
    s, path = summaries
    page, errors = open_page(chromium, url + "/")
    upload(page, path)
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(page.locator(".as-status")).to_have_text("trace gen.safetensors")
    expect(view).to_have_attribute("data-step", "3")  # the last step first
    expect(view).to_have_attribute("data-metric", "lookback ratio")
    assert shown(page, 15, 3) == s.lookback("text", 15, step=3)[0, 3, 0].item()

    held = []
    page.route("**/summary/1/*", lambda route: held.append(route))
    slider = page.locator("input.as-step")
    slider.press("ArrowLeft")
    expect(view).to_have_attribute("data-step", "2")
    assert shown(page, 15, 3) == s.lookback("text", 15, step=2)[0, 3, 0].item()
    with page.expect_request("**/summary/1/*"):
        slider.press("ArrowLeft")  # step 1: its answer is held back
    expect(page.locator(".as-steplabel")).to_contain_text("decode step 1")
    slider.press("ArrowLeft")  # the prefill, answered at once
    expect(view).to_have_attribute("data-step", "0")
    assert len(held) == 1
    held[0].continue_()  # step 1's answer comes last
    expect(view).to_have_attribute("data-dropped", "1")
    expect(view).to_have_attribute("data-step", "0")
    expect(page.locator(".as-steplabel")).to_contain_text("prefill")
    assert shown(page, 15, 3) == s.lookback("text", 15, step=0)[0, 3, 0].item()

    cell(page, 15, 3).click()
    expect(view).to_have_attribute("data-head", "15:3")
    keys, probs = s.topk("text", 15, step=0)
    want = [(k, p) for k, p in zip(keys[0, 3, 0].tolist(), probs[0, 3, 0].tolist()) if p > 0]
    items = page.locator(".as-top li")
    assert [(int(k), float(v)) for k, v in items.evaluate_all("es => es.map(e => [e.dataset.k, e.dataset.value])")] \
        == want
    tokens = s.tokens("text").tokens
    assert items.locator(".as-toptok").evaluate_all("es => es.map(e => e.textContent)") == \
        [f"{clean_token(tokens[k]) or '·'} #{k}" for k, _ in want]
    assert not errors
    page.close()


def test_the_page_attnscope_view_writes(chromium, summaries, tmp_path):
    s, path = summaries
    out = tmp_path / "gen.html"
    assert main(["view", str(path), "--out", str(out)]) == 0
    page, errors = open_page(chromium, out.as_uri())
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    page.select_option("select.as-summetric", "entropy (nats)")
    expect(view).to_have_attribute("data-metric", "entropy (nats)")
    assert shown(page, 0, 0) == s.entropy("text", 0, step=3)[0, 0, 0].item()
    page.locator("input.as-step").press("Home")
    expect(view).to_have_attribute("data-step", "0")
    assert shown(page, 29, 8) == s.entropy("text", 29, step=0)[0, 8, 0].item()
    assert page.locator(".as-sumgrid").get_attribute("data-layers") == "30" and not errors
    page.close()


def test_an_answer_that_fails_leaves_nothing_of_another_step_beside_its_error(chromium, url, summaries):
    """A block the server cannot give: the error is shown, and the picked head's numbers and top keys of the step
    before are gone with the grid (not left beside it as if they were this step's)."""
    s, path = summaries
    page, errors = open_page(chromium, url + "/")
    upload(page, path)
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    cell(page, 15, 3).click()
    expect(view).to_have_attribute("data-head", "15:3")
    expect(page.locator(".as-top li")).not_to_have_count(0)
    page.route("**/summary/2/*", lambda route: route.fulfill(status=500, content_type="application/json",
                                                             body='{"error": "disk gone"}'))
    page.locator("input.as-step").press("ArrowLeft")
    expect(page.locator(".as-caption")).to_contain_text("could not load the summaries of step 2")
    expect(page.locator(".as-caption")).to_contain_text("disk gone")
    expect(view).to_have_attribute("data-step", "2")
    expect(view).to_have_attribute("data-head", "")
    expect(page.locator(".as-top li")).to_have_count(0)
    expect(page.locator(".as-stats span")).to_have_count(0)
    expect(page.locator(".as-sumcell")).to_have_count(0)
    assert not errors
    page.close()


def test_beam_search_steps_are_labelled_with_the_tokens_their_row_held(chromium, smollm, tmp_path):
    """A batch row of a beam search that holds another hypothesis at the last step than at the end: the query row and
    the top keys at a step carry that step's tokens (`Trace.tokens(..., step=)`), at the last step and the prefill."""
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=4, do_sample=False, num_beams=3,
                        num_return_sequences=3)
    last = max(r.step for r in s.run().records[("text", 0)])
    (q_last,) = s.record("text", 0, step=last).queries
    rows = [b for b in range(3) if s.tokens("text", b, step=last).tokens[q_last] != s.tokens("text", b).tokens[q_last]]
    assert rows  # some row switched hypothesis at the last step: the final tokens would mislabel it
    row = rows[0]
    out = tmp_path / "beams.html"
    assert main(["view", str(s.save(tmp_path / "beams.safetensors")), "--row", str(row), "--out", str(out)]) == 0
    page, errors = open_page(chromium, out.as_uri())
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    for key, step in (("End", last), ("Home", 0)):
        page.locator("input.as-step").press(key)
        expect(view).to_have_attribute("data-step", str(step))
        q = int(view.get_attribute("data-q"))
        held = [clean_token(t) for t in s.tokens("text", row, step=step).tokens]
        expect(page.locator("select.as-sumquery option")).to_have_text([f"‘{held[q]}’ #{q}"])
        expect(page.locator(".as-caption")).to_contain_text(f"of query ‘{held[q]}’ #{q}")
        cell(page, 0, 0).click()
        expect(view).to_have_attribute("data-head", "0:0")
        keys, probs = s.topk("text", 0, step=step)
        want = [f"{held[k] or '·'} #{k}" for k, p in zip(keys[row, 0, 0].tolist(), probs[row, 0, 0].tolist()) if p > 0]
        assert page.locator(".as-top .as-toptok").evaluate_all("es => es.map(e => e.textContent)") == want
    assert not errors
    page.close()


def test_switching_stream_while_its_answer_is_in_flight_draws_no_other_streams_numbers(chromium, url, scene_vlm,
                                                                                        tmp_path):
    """scene-vlm's two streams: after picking the vision stream, whose answer is held back, a summary picked meanwhile
    draws nothing (the language block is not laid out as vision's layers and heads); the vision answer then draws
    vision's numbers."""
    from attnscope.scenes import SceneWorld, question

    scene = SceneWorld(seed=0).scene("test", 3)
    x = scene_vlm.encode(scene_vlm.prompt(question(scene.classes[0])), scene.image)
    with torch.no_grad(), attnscope.capture(scene_vlm, streams=["vision", "language"], queries="last",
                                            layers={"vision": [11], "language": [0, 29]}, summaries="all") as s:
        scene_vlm.generate(**x, max_new_tokens=2, do_sample=False)
    path = s.save(tmp_path / "vlm.safetensors")
    page, errors = open_page(chromium, url + "/")
    upload(page, path)
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(view).to_have_attribute("data-stream", "language")
    held = []
    page.route("**/vision/summary/*/*", lambda route: held.append(route))
    with page.expect_request("**/vision/summary/*/*"):
        page.select_option("select.as-stream", label="vision")
    page.select_option("select.as-summetric", "entropy (nats)")
    expect(page.locator("select.as-summetric")).to_have_value("entropy (nats)")
    expect(page.locator(".as-sumcell")).to_have_count(0)  # no vision numbers yet: nothing drawn, not language's
    assert len(held) == 1
    held[0].continue_()
    expect(view).to_have_attribute("data-stream", "vision")
    expect(view).to_have_attribute("data-metric", "entropy (nats)")
    entropy = s.entropy("vision", 11, step=0)[0, :, 0]
    assert [shown(page, 11, h) for h in range(entropy.shape[0])] == entropy.tolist()
    assert not errors
    page.close()
