"""In a real browser (Chromium through Playwright): a trace written before metadata checksums, opened in the served
app (the trace upload) or as a self-contained page from disk, shows the note that its labels were not checked,
above the viewer; a trace with a checksum shows none."""
import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attnscope
from attnscope.capture.checksums import METADATA_FIELD
from attnscope.capture.trace import Trace, UncheckedMetadataWarning
from attnscope.viz.data import UNCHECKED_LABELS
from attnscope.viz.html import html_of
from attnscope.viz.server import create_app
from attnscope.viz.testing import running_server
from browser import VIEWPORT, chromium, expect, needs_browser  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


@pytest.fixture(scope="module")
def files(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("unchecked-browser")
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, 1]) as trace:
        minilm(**minilm.encode("the cat sat on the mat"))
    new = trace.save(root / "new.safetensors")
    with safe_open(str(new), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta[METADATA_FIELD]
    save_file(tensors, str(root / "old.safetensors"), metadata={"attnscope": json.dumps(meta)})
    return {"new": new, "old": root / "old.safetensors", "root": root}


def test_the_served_app_shows_the_note_for_an_old_trace_only(chromium, files):
    with warnings.catch_warnings(), running_server(create_app()) as url:
        warnings.simplefilter("ignore", UncheckedMetadataWarning)
        page = chromium.new_page(viewport=VIEWPORT)
        page.goto(url)
        for age, shown in (("old", 1), ("new", 0)):
            page.set_input_files("input[name=trace]", str(files[age]))
            expect(page.locator(".as-status")).to_contain_text(f"trace {age}.safetensors", timeout=20_000)
            page.wait_for_selector(".as-viewer[data-ready='1']", timeout=20_000)
            expect(page.locator(".as-results .as-warn")).to_have_count(shown)
            if shown:
                expect(page.locator(".as-results .as-warn")).to_have_text(UNCHECKED_LABELS)
                assert page.locator(".as-results .as-warn").is_visible()
        page.close()


def test_the_exported_page_shows_the_note(chromium, files):
    with pytest.warns(UncheckedMetadataWarning):
        old = Trace.load(files["old"])
    path = files["root"] / "old.html"
    path.write_text(html_of(old), encoding="utf-8")
    page = chromium.new_page(viewport=VIEWPORT)
    page.goto(path.as_uri())
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=20_000)
    note = page.locator(".as-warn")
    expect(note).to_have_count(1)
    expect(note).to_have_text(UNCHECKED_LABELS)
    assert note.is_visible() and note.bounding_box()["y"] < page.locator(".as-viewer").bounding_box()["y"]
    page.close()


def test_a_model_answer_arriving_after_a_trace_leaves_the_trace_status(chromium, files):
    """The app asks the server which inputs the chosen model takes; if that answer comes after a trace was opened,
    it must not wipe the trace's name from the status line (it used to clear it unconditionally)."""
    held = []
    with warnings.catch_warnings(), running_server(create_app()) as url:
        warnings.simplefilter("ignore", UncheckedMetadataWarning)
        page = chromium.new_page(viewport=VIEWPORT)
        page.route("**/models/**", lambda route: held.append(route))  # hold the model answer until the trace is shown
        page.goto(url)
        expect(page.locator(".as-status")).to_have_text(re.compile(r"^loading "))
        page.set_input_files("input[name=trace]", str(files["new"]))
        page.wait_for_selector(".as-viewer[data-ready='1']", timeout=20_000)
        expect(page.locator(".as-status")).to_have_text("trace new.safetensors")
        assert len(held) == 1
        held[0].continue_()
        # the answer has been applied: the model's own input fields are shown
        expect(page.locator(".as-img:not(.as-hidden), .as-txt:not(.as-hidden)")).not_to_have_count(0, timeout=20_000)
        expect(page.locator(".as-status")).to_have_text("trace new.safetensors")
        page.close()
