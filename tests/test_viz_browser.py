"""The viewer in a real browser (Debian's Chromium through Playwright): the served app end to end, an exported
file opened from disk with the network blocked, text lines, and a 2,000-token run staying responsive.

Screenshots go to pytest's tmp dir, and also to $ATTNSCOPE_SCREENSHOTS when set (docs/img is made that way)."""
import os
import shutil
import time
from pathlib import Path

import pytest

from attnscope.models.images import load_image
from attnscope.viz import html, runner
from attnscope.viz.server import create_app
from attnscope.viz.testing import canvas_stats, running_server, synthetic_trace
from browser import VIEWPORT, chromium, expect, needs_browser  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("ATTNSCOPE_SCREENSHOTS"):
        out = Path(os.environ["ATTNSCOPE_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path


def watch(page) -> list:
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return errors


@pytest.fixture(scope="module")
def server(dinov2, minilm, smollm):
    app = create_app()
    app.state.viewer.slot("dinov2-small").model = dinov2
    app.state.viewer.slot("minilm").model = minilm
    app.state.viewer.slot("smollm2-135m").model = smollm
    with running_server(app) as url:
        yield url, app


def click_at(page, selector: str, fx: float, fy: float) -> None:
    box = page.locator(selector).first.bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def check_image_viewer(page, stored_all: bool = True) -> None:
    """Grid of 12 x 6 cells; clicking a patch makes it (or, in a thinned export, the nearest stored patch) the
    query; clicking a cell picks layer and head; the overlay is a photo with a heat map, not a blank canvas."""
    viewer = page.locator(".as-viewer").first
    assert page.locator(".as-grid .as-cell").count() == 12 * 6
    assert page.locator(".as-grid").get_attribute("data-layers") == "12"
    click_at(page, "canvas.as-overlay", 0.70, 0.40)  # grid row 6, col 11 of 16 x 16: position 1 + 6*16 + 11
    if stored_all:
        expect(viewer).to_have_attribute("data-q", "108", timeout=20_000)
    else:
        expect(page.locator(".as-caption").first).to_contain_text("#108", timeout=20_000)
        q = int(viewer.get_attribute("data-q"))
        assert q != 0 and abs((q - 1) // 16 - 6) <= 2 and abs((q - 1) % 16 - 11) <= 2, q
    page.click(".as-cell[data-l='5'][data-h='2']")
    assert viewer.get_attribute("data-layer") == "5" and viewer.get_attribute("data-head") == "2"
    assert page.locator(".as-cell.as-selected").count() == 1
    overlay = canvas_stats(page, "canvas.as-overlay")
    assert overlay["opaque"] > 0.99 and overlay["colours"] > 200 and overlay["std"] > 20, overlay
    cell = canvas_stats(page, ".as-cell[data-l='5'][data-h='2'] canvas")
    assert cell["colours"] > 5, cell


def test_served_app_end_to_end(chromium, server, tmp_path):
    url, _ = server
    photo = tmp_path / "chelsea.png"
    load_image("chelsea").save(photo)
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(url + "/")
    page.select_option("select[name=model]", "dinov2-small")
    page.wait_for_selector(".as-img:not(.as-hidden)")
    page.set_input_files("input[name=image]", str(photo))
    start = time.perf_counter()
    page.click("button.as-run")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)
    print(f"served dinov2 run to first render: {time.perf_counter() - start:.2f} s")
    check_image_viewer(page)
    shot(page, tmp_path, "viewer_served_dinov2")
    assert not errors, errors
    page.close()


def test_click_a_generated_word_served(chromium, server, tmp_path):
    """SmolLM2 answers "Paris"; clicking it shows the row of the step that produced it (the query "is")."""
    url, _ = server
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(url + "/")
    page.select_option("select[name=model]", "smollm2-135m")
    page.wait_for_selector(".as-gen:not(.as-hidden)")
    page.fill("textarea[name=text]", "The capital of France is")
    page.fill("input[name=max_new_tokens]", "3")
    page.click("button.as-run")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)
    assert "Paris" in page.locator(".as-answer-text").inner_text()
    assert page.locator(".as-grid .as-cell").count() == 30 * 9
    paris = page.locator(".as-tok", has_text="Paris").first
    paris.click()
    viewer = page.locator(".as-viewer")
    expect(viewer).to_have_attribute("data-q", str(int(paris.get_attribute("data-i")) - 1))
    expect(page.locator(".as-caption")).to_contain_text("while generating ‘ Paris’")
    page.click(".as-cell[data-l='15'][data-h='mean']") if page.locator(".as-cell[data-l='15'][data-h='mean']").count() else page.click(".as-cell-mean[data-l='15']")
    assert viewer.get_attribute("data-layer") == "15" and viewer.get_attribute("data-head") == "mean"
    assert page.locator("canvas.as-lines").get_attribute("data-mode") == "full"
    shot(page, tmp_path, "viewer_smollm2_generation")
    assert not errors, errors
    page.close()


def test_exported_file_renders_with_the_network_blocked(chromium, dinov2, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(html.result_html(runner.run(dinov2, image="chelsea"), title="dinov2-small on chelsea"), encoding="utf-8")
    context = chromium.new_context(viewport=VIEWPORT)
    requests, blocked = [], []

    def route(r):
        requests.append(r.request.url)
        if r.request.url.startswith(("file:", "data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    context.set_offline(True)
    page = context.new_page()
    errors = watch(page)
    page.goto(path.as_uri())
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=30_000)
    check_image_viewer(page, stored_all=False)
    shot(page, tmp_path, "viewer_export_dinov2")
    assert blocked == [] and all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    assert not errors, errors
    context.close()


def test_text_lines_between_tokens(chromium, minilm, tmp_path):
    path = tmp_path / "minilm.html"
    text = "The animal didn't cross the street because it was too tired."
    html.write_html(runner.run(minilm, text=text), path, title="minilm")
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(path.as_uri())
    page.wait_for_selector(".as-viewer[data-ready='1']")
    assert page.locator(".as-grid .as-cell").count() == 6 * 12
    page.click(".as-tok[data-i='9']")  # "because"... any token: it becomes the query
    expect(page.locator(".as-viewer")).to_have_attribute("data-q", "9")
    page.click(".as-cell[data-l='2'][data-h='4']")
    assert page.locator("canvas.as-lines").get_attribute("data-mode") == "full"
    lines = canvas_stats(page, "canvas.as-lines")
    assert lines["opaque"] > 0.02, lines
    shot(page, tmp_path, "viewer_minilm_lines")
    assert not errors, errors
    page.close()


def test_two_thousand_tokens_stay_responsive(chromium, server, tmp_path):
    url, app = server
    state = app.state.viewer
    result = runner.from_trace(synthetic_trace(layers=30, heads=9, length=2000))
    rid = state.keep(result, None)
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    start = time.perf_counter()
    page.goto(f"{url}/?run={rid}")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=60_000)
    first = time.perf_counter() - start
    assert page.locator(".as-tok").count() == 2000 and page.locator(".as-grid .as-cell").count() == 270
    clicks = []
    for pos in (1203, 402, 1800):
        t = time.perf_counter()
        page.click(f".as-tok[data-i='{pos}']")
        expect(page.locator(".as-viewer")).to_have_attribute("data-q", str(state.entry(rid).result.views[0].nearest(pos)))
        clicks.append(time.perf_counter() - t)
    select_ms = float(page.locator(".as-viewer").get_attribute("data-select-ms"))
    print(f"2000 tokens: first render {first:.2f} s, clicks {[round(c, 3) for c in clicks]} s, in-page {select_ms:.0f} ms")
    assert not errors, errors
    page.close()
