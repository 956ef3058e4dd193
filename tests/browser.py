"""What the browser tests share: Chromium through Playwright (no browser download), skipped by name where either
is missing, and never skipped in CI (which installs both)."""
import os

import pytest

from attnscope.viz.testing import chromium_path

try:
    from playwright.sync_api import expect
    missing = None if chromium_path() else "no Chromium (apt-get install chromium)"
except ImportError:
    expect = None
    missing = "playwright is not installed (pip install playwright)"
if missing and os.environ.get("CI"):
    raise RuntimeError(f"browser tests cannot run in CI: {missing}")  # CI installs both: never skip silently there
needs_browser = pytest.mark.skipif(missing is not None, reason=str(missing))

VIEWPORT = {"width": 1440, "height": 1000}


@pytest.fixture(scope="module")
def chromium():
    from attnscope.viz.testing import browser

    with browser() as b:
        yield b


def serve(models: dict):
    """The viewer app with `models` ({zoo name: loaded model}) already in their slots, on a free loopback port: a
    generator for a module fixture, yielding the base URL."""
    from attnscope.viz.server import create_app
    from attnscope.viz.testing import running_server

    app = create_app()
    for name, model in models.items():
        app.state.viewer.slot(name).model = model
    with running_server(app) as url:
        yield url


def open_page(chromium, address: str):
    """A new page at `address`. Returns (page, errors): the page's uncaught script errors, to assert empty."""
    page = chromium.new_page(viewport=VIEWPORT)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(address)
    return page, errors


def upload(page, path) -> None:
    """Open `path` through the served app's trace upload (the page is on the app)."""
    page.wait_for_selector("input[name=trace]")
    page.set_input_files("input[name=trace]", str(path))


def open_run(chromium, url: str, model: str, text: str, *, image=None, max_new_tokens: int | None = None):
    """A new page on the served app that runs `model` on `text` (and `image`, a file path, for a VLM) from the
    form and waits for the viewer. Returns (page, errors): the page's uncaught script errors, to assert empty."""
    page = chromium.new_page(viewport=VIEWPORT)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.select_option("select[name=model]", model)
    page.wait_for_selector(".as-img:not(.as-hidden)" if image is not None else ".as-gen:not(.as-hidden)")
    if image is not None:
        page.set_input_files("input[name=image]", str(image))
    page.fill("textarea[name=text]", text)
    if max_new_tokens is not None:
        page.fill("input[name=max_new_tokens]", str(max_new_tokens))
    page.click("button.as-run")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)
    return page, errors
