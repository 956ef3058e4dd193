"""The knockout panel in a real browser: a served SmolLM2 run, a knockout over 3 windows drawn as a curve with its
legend, and a bad window answered by a red error that replaces the stale curve."""
import pytest

from browser import chromium, expect, needs_browser, open_run, serve  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


@pytest.fixture(scope="module")
def server(smollm):
    yield from serve({"smollm2-135m": smollm})


def test_knockout_panel_draws_the_curve_and_shows_errors(chromium, server):
    page, errors = open_run(chromium, server, "smollm2-135m", "The capital of France is", max_new_tokens=1)
    panel = page.locator(".as-knockout")
    page.select_option("select[aria-label='knockout source']", "subject")
    page.select_option("select[aria-label='knockout target']", "last")
    page.fill("input[aria-label='knockout subject']", "France")
    page.fill("input[aria-label='knockout window']", "10")
    page.fill("input[aria-label='knockout stride']", "10")
    page.click("button.as-korun")
    expect(panel).to_have_attribute("data-ready", "1", timeout=120_000)
    line = panel.locator("polyline[data-flow='subject->last']")
    assert len(line.get_attribute("points").split()) == 3
    expect(panel.locator(".as-kolegend")).to_contain_text("subject->last")
    expect(panel.locator(".as-panel-caption")).to_contain_text("Paris")
    page.fill("input[aria-label='knockout window']", "31")
    page.click("button.as-korun")
    expect(panel.locator(".as-panel-caption.as-error")).to_contain_text("beyond the layer count", timeout=60_000)
    assert panel.locator("polyline").count() == 0 and panel.get_attribute("data-ready") == "0"
    assert not errors, errors
    page.close()
