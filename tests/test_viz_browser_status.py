"""In a real browser (Chromium through Playwright): the served app's status line and results follow the request the
user made last, and name what is shown, whatever order the server's answers come in (a run, a trace upload, the
answer about a model's inputs). Answers are held back with page.route to force each order."""
import pytest
import torch

import attnscope
from attnscope.viz.server import create_app
from attnscope.viz.testing import running_server
from browser import VIEWPORT, chromium, expect, needs_browser  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


@pytest.fixture(scope="module")
def url(dinov2, minilm, smollm):
    app = create_app()
    for name, model in (("dinov2-small", dinov2), ("minilm", minilm), ("smollm2-135m", smollm)):
        app.state.viewer.slot(name).model = model
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def traces(minilm, tmp_path_factory):
    """Two traces told apart by their layer count: one.safetensors has 1 layer, two.safetensors 2."""
    root = tmp_path_factory.mktemp("status-traces")
    out = {}
    for name, layers in (("one", [0]), ("two", [0, 1])):
        with torch.no_grad(), attnscope.capture(minilm, layers=layers) as trace:
            minilm(**minilm.encode("the cat sat on the mat"))
        out[name] = trace.save(root / f"{name}.safetensors")
    return out


def _page(chromium, url):
    page = chromium.new_page(viewport=VIEWPORT)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector(".as-img:not(.as-hidden)")  # the first model (dinov2-small) is known
    return page, errors


def _settle(page, held, pattern: str) -> None:
    """Let a held request go and its answer be handled (nothing on screen waits for a superseded answer)."""
    with page.expect_response(pattern):
        held.continue_()
    page.wait_for_timeout(500)


def test_a_run_names_the_model_that_ran_and_a_model_switch_keeps_the_running_status(chromium, url):
    page, errors = _page(chromium, url)
    page.select_option("select[name=model]", "smollm2-135m")
    page.wait_for_selector(".as-gen:not(.as-hidden)")
    page.fill("textarea[name=text]", "The capital of France is")
    page.fill("input[name=max_new_tokens]", "1")
    held = []
    page.route("**/api/run", lambda route: held.append(route))
    page.click("button.as-run")
    status = page.locator(".as-status")
    expect(status).to_have_text("running smollm2-135m…")
    page.select_option("select[name=model]", "minilm")  # while it runs: the answer about minilm's inputs arrives
    page.wait_for_selector(".as-gen.as-hidden", state="attached")  # minilm does not generate: its answer was applied
    expect(status).to_have_text("running smollm2-135m…")  # not wiped by that answer
    held[0].continue_()
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=60_000)
    expect(status).to_contain_text("smollm2-135m: ran in")  # the model that ran, not the one chosen since
    assert not errors
    page.close()


def test_an_earlier_trace_answering_last_neither_replaces_nor_misnames_the_later(chromium, url, traces):
    page, errors = _page(chromium, url)
    held = []
    page.route("**/api/trace", lambda route: held.append(route) if not held else route.continue_())
    page.set_input_files("input[name=trace]", str(traces["two"]))
    page.wait_for_function("document.querySelector('.as-status').textContent === 'reading trace…'")
    page.set_input_files("input[name=trace]", str(traces["one"]))
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=20_000)
    expect(page.locator(".as-grid")).to_have_attribute("data-layers", "1")
    expect(page.locator(".as-status")).to_have_text("trace one.safetensors")
    _settle(page, held[0], "**/api/trace")  # the first upload's answer comes last
    expect(page.locator(".as-grid")).to_have_attribute("data-layers", "1")
    expect(page.locator(".as-status")).to_have_text("trace one.safetensors")
    assert page.locator(".as-viewer").count() == 1 and not errors
    page.close()


def test_a_trace_opened_during_a_run_stays_when_the_run_answers(chromium, url, traces):
    page, errors = _page(chromium, url)
    page.select_option("select[name=model]", "minilm")
    page.wait_for_selector(".as-txt:not(.as-hidden)")
    page.fill("textarea[name=text]", "a cat")
    held = []
    page.route("**/api/run", lambda route: held.append(route))
    page.click("button.as-run")
    page.set_input_files("input[name=trace]", str(traces["two"]))
    expect(page.locator(".as-status")).to_have_text("trace two.safetensors", timeout=20_000)
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=20_000)
    _settle(page, held[0], "**/api/run")
    expect(page.locator(".as-status")).to_have_text("trace two.safetensors")
    expect(page.locator(".as-grid")).to_have_attribute("data-layers", "2")
    expect(page.locator("button.as-run")).to_be_enabled()
    assert not errors
    page.close()


def test_switching_back_before_a_model_answers_leaves_no_stale_loading_message(chromium, url):
    page, errors = _page(chromium, url)
    held = []
    page.route("**/api/models/smollm2-135m", lambda route: held.append(route))
    page.select_option("select[name=model]", "smollm2-135m")
    status = page.locator(".as-status")
    expect(status).to_have_text("loading smollm2-135m…")
    page.select_option("select[name=model]", "dinov2-small")  # known already: no request, nothing to wait for
    held[0].continue_()
    expect(status).to_have_text("")  # the answer for a model no longer chosen does not leave its note behind
    assert not errors
    page.close()
