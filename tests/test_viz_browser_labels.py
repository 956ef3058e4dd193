"""The viewer shows what it says it shows, in a real browser (Chromium through Playwright):
- an explanation follows the clicked token (DINOv2 patches in the served app; SmolLM2 words in an exported report,
  the same rule), and every label names what is drawn;
- flow is drawn from its minimum, with its numbers explained;
- scene-vlm answers a question about a photo in the served app (its chat prompt built for it);
- the steering form comes from the method's signature (`heads` asks for its heads);
- errors are red and clear the stale result."""
import pytest
from PIL import Image

import attnscope
from attnscope.viz import report
from attnscope.viz.server import create_app
from attnscope.viz.testing import canvas_stats, running_server
from browser import VIEWPORT, chromium, expect, needs_browser  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


def watch(page) -> list:
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


@pytest.fixture(scope="module")
def server(dinov2, smollm):
    app = create_app()
    app.state.viewer.slot("dinov2-small").model = dinov2
    app.state.viewer.slot("smollm2-135m").model = smollm
    app.state.viewer.slot("scene-vlm").model = attnscope.load("scene-vlm")
    with running_server(app) as url:
        yield url


def click_at(page, selector: str, fx: float, fy: float) -> None:
    box = page.locator(selector).first.bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def brightness(page, pos: int) -> float:
    """Sum of the RGB channels of a token's heat colour in the strip (inferno: brighter = higher)."""
    colour = page.locator(f".as-tok[data-i='{pos}']").evaluate("e => getComputedStyle(e).backgroundColor")
    return sum(float(c) for c in colour[colour.index("(") + 1: colour.index(")")].split(",")[:3])


def run_dinov2(page, url):
    page.goto(url + "/")
    page.select_option("select[name=model]", "dinov2-small")
    page.wait_for_selector(".as-img:not(.as-hidden)")
    page.select_option("select[name=photo]", "chelsea")
    page.click("button.as-run")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)


def test_explanation_follows_the_clicked_patch_and_says_so(chromium, server):
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    run_dinov2(page, server)
    viewer = page.locator(".as-viewer")
    page.select_option("select.as-method", "rollout")
    expect(viewer).to_have_attribute("data-explains", "default", timeout=60_000)  # nothing clicked: CLS embedding
    expect(page.locator(".as-caption")).to_contain_text("CLS embedding")
    tops = {}
    for fx, fy, pos in ((0.70, 0.40, 108), (0.10, 0.90, 1 + 14 * 16 + 1)):
        click_at(page, "canvas.as-overlay", fx, fy)
        expect(viewer).to_have_attribute("data-explains", str(pos), timeout=60_000)
        expect(page.locator(".as-caption")).to_contain_text(f"#{pos}")
        expect(page.locator(".as-caption")).to_contain_text("output embedding of ‘patch(")
        title = page.locator(".as-dtitle").inner_text()
        assert title.startswith("rollout: output embedding") and "mean of heads" not in title
        assert "highest-scoring tokens" in page.locator(".as-detail").inner_text()
        assert "most attended keys" not in page.locator(".as-detail").inner_text()
        assert page.locator("canvas.as-lines.as-hidden").count() == 1  # no query-to-key lines under an explanation
        tops[pos] = {p: brightness(page, p) for p in (108, 226)}
        assert "rows sum to 1" in page.locator(".as-units").inner_text()
    # two clicked patches, two maps: each patch is brighter in its own map than in the other's (was one CLS map)
    assert tops[108][108] > tops[226][108] and tops[226][226] > tops[108][226], tops
    # flow: drawn from its minimum, its numbers explained; the overlay is not one colour
    page.select_option("select.as-method", "flow")
    expect(page.locator(".as-units")).to_contain_text("maximum flow", timeout=120_000)
    units = page.locator(".as-units").inner_text()
    lo = float(units.split("colours from ")[1].split(" ")[0])
    assert lo > 0.2, units  # the floor is the smallest flow, not 0
    stats = canvas_stats(page, "canvas.as-overlay")
    assert stats["std"] > 20, stats
    assert not errors, errors
    page.close()


def test_exported_report_explains_the_clicked_word(chromium, smollm, tmp_path):
    path = report.report(smollm, text="The capital of France is Paris", out=tmp_path / "r.html",
                         methods=["rollout", "gradattn"], faithfulness=False)
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(path.as_uri())
    page.wait_for_selector(".as-viewer[data-ready='1']")
    viewer = page.locator(".as-viewer")
    for method in ("rollout", "gradattn"):
        page.select_option("select.as-method", method)
        paris = page.locator(".as-tok", has_text="Paris").first
        pos = paris.get_attribute("data-i")
        paris.click()
        expect(viewer).to_have_attribute("data-explains", pos)
        caption = page.locator(".as-caption").inner_text()
        assert f"log p(‘ Paris’ #{pos}" in caption and f"‘ is’ #{int(pos) - 1}" in caption, caption
        france = page.locator(".as-tok", has_text="France").first
        france.click()
        expect(viewer).to_have_attribute("data-explains", france.get_attribute("data-i"))
        # no map of the first token (nothing predicts it): a red message, not another token's map
        page.locator(".as-tok[data-i='0']").click()
        expect(page.locator(".as-caption.as-error")).to_contain_text("no " + method + " map")
        assert page.locator(".as-top li").count() == 0
    assert not errors, errors
    page.close()


def test_scene_vlm_answers_in_the_viewer(chromium, server):
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(server + "/")
    page.select_option("select[name=model]", "scene-vlm")
    page.wait_for_selector(".as-raw:not(.as-hidden)", timeout=60_000)
    assert "image placeholder" in page.get_attribute("textarea[name=text]", "placeholder") or "<image>" in page.get_attribute("textarea[name=text]", "placeholder")
    page.select_option("select[name=photo]", "chelsea")
    page.fill("textarea[name=text]", "Is there a bag in the image?")
    page.fill("input[name=max_new_tokens]", "4")
    page.click("button.as-run")
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)
    answer = page.locator(".as-answer-text").inner_text().strip()
    assert answer.split()[0].strip(",.").lower() in ("yes", "no"), answer
    assert page.locator(".as-tok.as-patch").count() == 64  # the language stream's 8x8 image tokens
    page.select_option("select.as-method", "gradattn")
    expect(page.locator(".as-viewer")).to_have_attribute("data-explains", "default", timeout=120_000)
    assert page.locator(".as-caption.as-error").count() == 0
    assert not errors, errors
    page.close()


def test_steer_form_and_red_errors_that_clear_the_result(chromium, server, tmp_path):
    page = chromium.new_page(viewport=VIEWPORT)
    errors = watch(page)
    page.goto(server + "/")
    page.select_option("select[name=model]", "smollm2-135m")
    page.wait_for_selector(".as-gen:not(.as-hidden)")
    page.fill("textarea[name=text]", "The capital of France is")
    page.fill("input[name=max_new_tokens]", "2")
    page.select_option("select[name=steer]", "heads")
    heads = page.locator("input[name='steer.heads']")
    assert heads.count() == 1 and heads.get_attribute("required") is not None
    assert page.locator("input[name='steer.scale']").input_value() == "0.0"
    page.select_option("select[name=steer]", "pai")
    for name in ("alpha", "keys", "layers", "queries", "heads"):
        assert page.locator(f"input[name='steer.{name}']").count() == 1, name
    page.fill("input[name='steer.keys']", "3")
    page.fill("input[name='steer.layers']", "20:30")
    page.click("button.as-run")
    expect(page.locator(".as-viewer[data-ready='1']")).to_have_count(2, timeout=120_000)
    expect(page.locator(".as-diff")).to_have_attribute("data-ready", "1")
    # a failed run (keys past the prompt): red, and the stale result is gone
    page.fill("input[name='steer.keys']", "99")
    page.click("button.as-run")
    status = page.locator(".as-status.as-error")
    expect(status).to_contain_text("select nothing", timeout=60_000)
    assert page.locator(".as-viewer").count() == 0
    colour = status.evaluate("e => getComputedStyle(e).color")
    assert colour == "rgb(180, 35, 24)", colour
    # a 50-megapixel upload after a good run: red 413, previous result cleared
    run_dinov2(page, server)
    big = tmp_path / "big.png"
    Image.new("RGB", (7100, 7100), (90, 120, 200)).save(big)
    page.set_input_files("input[name=image]", str(big))
    page.click("button.as-run")
    expect(page.locator(".as-status.as-error")).to_contain_text("pixels", timeout=60_000)
    assert page.locator(".as-viewer").count() == 0
    page.close()
    assert not errors, errors
