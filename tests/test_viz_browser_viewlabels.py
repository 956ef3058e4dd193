"""In a real browser (Chromium through Playwright), on smollm2-135m: a padded batch's padding rows are marked where a
row is chosen or shown (greyed, "pad", said to be no token's attention) in the served app, `trace.to_html` and
`attnscope view FILE`, and in the summaries viewer's query choice; the summaries viewer says where the lookback ratio
is 1 by definition; both viewers' head grids are reached and picked with the keyboard, each cell named."""
import re

import pytest
import torch

import attnscope
from attnscope.cli import main
from attnscope.viz import summary_view
from browser import VIEWPORT, chromium, expect, needs_browser, open_page, serve, upload  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser

PROMPTS = ["Hi there", "The cat sat on the mat today"]  # row 0: 5 padding positions, then 2 tokens
NOT_A_TOKEN = "its row is not a token's attention"
PADROW = re.compile(r"\bas-padrow\b")


@pytest.fixture(scope="module")
def padded(smollm, tmp_path_factory):
    """Left-padded (the default for a generating model): every row of layers 0 and 29, and per-row summaries."""
    x = smollm.encode(PROMPTS)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], queries=None) as trace:
        smollm(**x)
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], queries=None, summaries="all") as s:
        smollm(**x)
    root = tmp_path_factory.mktemp("padded")
    pads = [i for i, m in enumerate(x["attention_mask"][0].tolist()) if not m]
    return trace, trace.save(root / "rows.safetensors"), s.save(root / "sums.safetensors"), pads


@pytest.fixture(scope="module")
def url():
    yield from serve({})


def check_pad_rows(page, pads: list[int], length: int) -> None:
    view = page.locator(".as-viewer")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(view).to_have_attribute("data-q", str(length - 1))  # the default row is a token's
    expect(view).to_have_attribute("data-pad", "0")
    assert page.locator(".as-tok.as-pad").evaluate_all("es => es.map(e => Number(e.dataset.i))") == pads
    page.click(f".as-tok[data-i='{pads[1]}']")
    expect(view).to_have_attribute("data-q", str(pads[1]))
    expect(view).to_have_attribute("data-pad", "1")
    expect(view).to_have_class(PADROW)  # greyed
    expect(page.locator(".as-caption")).to_contain_text(f"#{pads[1]} (pad)")
    expect(page.locator(".as-caption .as-padnote")).to_contain_text(NOT_A_TOKEN)
    expect(page.locator(".as-dtitle")).to_contain_text("(pad: not a token's attention)")
    page.click(f".as-tok[data-i='{length - 1}']")
    expect(view).to_have_attribute("data-pad", "0")
    expect(page.locator(".as-caption .as-padnote")).to_have_count(0)
    expect(view).not_to_have_class(PADROW)


def test_padding_rows_are_marked_on_every_surface(chromium, url, padded, tmp_path):
    trace, rows_file, _, pads = padded
    length = len(trace.tokens("text", 0))
    out = tmp_path / "view.html"
    assert main(["view", str(rows_file), "--row", "0", "--out", str(out)]) == 0
    html = tmp_path / "to_html.html"
    trace.to_html(html)
    for address in (html.as_uri(), out.as_uri(), None):
        page, errors = open_page(chromium, "about:blank")
        if address is None:
            page.goto(url + "/")  # the served app (batch row 0)
            upload(page, rows_file)
        else:
            page.goto(address)
        check_pad_rows(page, pads, length)
        assert not errors, (address, errors)
        page.close()


def test_a_right_padded_row_opens_on_its_last_token(chromium, smollm, tmp_path):
    x = smollm.encode(PROMPTS, padding_side="right")
    with torch.no_grad(), attnscope.capture(smollm, layers=[0], queries=None) as trace:
        smollm(**x)
    n = int(x["attention_mask"][0].sum())
    (tmp_path / "right.html").write_text(trace.to_html(), encoding="utf-8")
    page, errors = open_page(chromium, (tmp_path / "right.html").as_uri())
    view = page.locator(".as-viewer")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(view).to_have_attribute("data-q", str(n - 1))  # not the last position, which is padding
    expect(view).to_have_attribute("data-pad", "0")
    assert not errors
    page.close()


def test_the_rows_viewers_head_grid_by_keyboard(chromium, padded, tmp_path):
    trace, _, _, _ = padded
    path = tmp_path / "keys.html"
    path.write_text(trace.to_html(), encoding="utf-8")
    page, errors = open_page(chromium, path.as_uri())
    view = page.locator(".as-viewer")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    tabbable = page.locator(".as-grid [tabindex='0']")
    expect(tabbable).to_have_count(1)  # one stop in the tab order: the picked head (the last layer's mean)
    expect(tabbable).to_have_attribute("aria-label", "layer 29, mean of heads")
    tabbable.focus()
    page.keyboard.press("ArrowLeft")
    focused = page.locator(".as-grid :focus")
    expect(focused).to_have_attribute("data-h", "8")
    value = focused.get_attribute("title").split(" ")[-1]  # the metric as the tooltip shows it
    expect(focused).to_have_attribute("aria-label", f"layer 29, head 8, entropy (nats) {value}")
    page.keyboard.press("Enter")
    expect(view).to_have_attribute("data-head", "8")
    expect(focused).to_have_attribute("aria-selected", "true")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Home")
    page.keyboard.press(" ")
    expect(view).to_have_attribute("data-layer", "0")
    expect(view).to_have_attribute("data-head", "0")
    expect(page.locator(".as-grid [aria-selected='true']")).to_have_count(1)
    expect(page.locator(".as-grid [tabindex='0']")).to_have_attribute("data-l", "0")
    assert not errors
    page.close()


def test_summaries_mark_padding_and_say_lookback_is_not_measured(chromium, url, padded):
    """A single forward's summaries: no lookback ratio offered (and why), padding rows labelled in the query choice and
    greyed with a note when picked."""
    _, _, sums_file, pads = padded
    page, errors = open_page(chromium, url + "/")
    upload(page, sums_file)
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    names = page.locator("select.as-summetric option").evaluate_all("os => os.map(o => o.value)")
    assert summary_view.LOOKBACK not in names and "entropy (nats)" in names
    expect(page.locator(".as-streamnote")).to_have_text(summary_view.NO_GENERATED_STREAM)
    options = page.locator("select.as-sumquery option")
    labels = options.evaluate_all("os => os.map(o => o.textContent)")
    assert [i for i, text in enumerate(labels) if text.endswith("(pad)")] == pads
    expect(view).to_have_attribute("data-q", str(len(labels) - 1))
    page.select_option("select.as-sumquery", str(pads[0]))
    expect(view).to_have_attribute("data-q", str(pads[0]))
    expect(view).to_have_class(PADROW)
    expect(page.locator(".as-rownote")).to_contain_text(NOT_A_TOKEN)
    page.select_option("select.as-sumquery", str(len(labels) - 1))
    expect(page.locator(".as-rownote")).to_have_text("")
    expect(view).not_to_have_class(PADROW)
    assert not errors
    page.close()


def test_summaries_of_a_generation_mark_the_prefills_lookback_and_take_the_keyboard(chromium, smollm, tmp_path):
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 15], queries="last", summaries="all") as s:
        smollm.generate(**smollm.encode("The capital of France is"), max_new_tokens=3, do_sample=False)
    out = tmp_path / "gen.html"
    assert main(["view", str(s.save(tmp_path / "gen.safetensors")), "--out", str(out)]) == 0
    page, errors = open_page(chromium, out.as_uri())
    view = page.locator(".as-sumview")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(view).to_have_attribute("data-metric", summary_view.LOOKBACK)
    cell = page.locator("td.as-sumcell[data-l='15'][data-h='3']")
    value = s.lookback("text", 15, step=2)[0, 3, 0].item()
    expect(cell).to_have_text(f"{value:.2f}")
    expect(page.locator(".as-rownote")).to_have_text("")
    page.locator("input.as-step").press("Home")  # the prefill: no generated key yet
    expect(view).to_have_attribute("data-step", "0")
    expect(cell).to_have_text("n/a")
    expect(cell).to_have_class(re.compile(r"\bas-na\b"))
    assert float(cell.get_attribute("data-value")) == s.lookback("text", 15, step=0)[0, 3, 0].item() == 1
    expect(cell).to_have_attribute("aria-label",
                                   "layer 15, head 3: lookback ratio n/a (1 by definition: no generated key)")
    expect(page.locator(".as-rownote")).to_contain_text(summary_view.NO_GENERATED_ROW)
    expect(page.locator(".as-mlegend")).to_contain_text("n/a")

    page.locator("input.as-step").press("End")
    expect(view).to_have_attribute("data-step", "2")
    expect(page.locator(".as-sumgrid [tabindex='0']")).to_have_count(1)
    cell.focus()
    page.keyboard.press("Enter")
    expect(view).to_have_attribute("data-head", "15:3")
    page.keyboard.press("ArrowRight")
    page.keyboard.press(" ")
    expect(view).to_have_attribute("data-head", "15:4")
    focused = page.locator(".as-sumgrid :focus")  # the grid was drawn again: the focus stays on the picked head
    expect(focused).to_have_attribute("data-h", "4")
    expect(focused).to_have_attribute("aria-selected", "true")
    value = s.lookback("text", 15, step=2)[0, 4, 0].item()
    label = focused.get_attribute("aria-label")
    assert label.startswith("layer 15, head 4: lookback ratio ") and abs(float(label.split()[-1]) - value) < 1e-3
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Enter")
    expect(view).to_have_attribute("data-head", "0:4")
    assert not errors
    page.close()


def test_a_row_whose_stored_rows_are_all_padding_says_why_its_grid_has_no_metric(chromium, smollm, tmp_path):
    """queries="last" on a right-padded batch stores only a padding row for the shorter prompt: the head metrics leave
    it out, so the grid had an empty "cell border" choice and blank cells without a word about why."""
    x = smollm.encode(PROMPTS, padding_side="right")
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, -1], queries="last") as trace:
        smollm(**x)
    path = tmp_path / "lastpad.html"
    trace.to_html(path, row=0)
    page, errors = open_page(chromium, path.as_uri())
    view = page.locator(".as-viewer")
    expect(view).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(view).to_have_attribute("data-pad", "1")
    expect(page.locator(".as-mlegend")).to_contain_text("every stored row of this batch row is padding")
    assert not errors
    page.close()
    trace.to_html(path, row=1)  # the longer prompt's last row is a token's: its metrics, no such note
    page, errors = open_page(chromium, path.as_uri())
    expect(page.locator(".as-viewer")).to_have_attribute("data-ready", "1", timeout=20_000)
    expect(page.locator(".as-mlegend")).not_to_contain_text("padding")
    assert page.locator("select.as-metric option").count() > 0 and not errors
    page.close()
