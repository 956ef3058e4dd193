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
