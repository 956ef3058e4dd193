"""The grounding panel in a real browser (Chromium through Playwright): a scene-vlm run, ground it at a word, the box
is drawn where the server put it (cyan edge at the box's corner), points are listed; a word not in the question
shows the server's error in red and clears the drawing."""
import re

import pytest

from attnscope.scenes import SceneWorld, question
from browser import chromium, expect, needs_browser, open_run, serve  # noqa: F401 (chromium is a fixture)

pytestmark = needs_browser


@pytest.fixture(scope="module")
def server(scene_vlm):
    yield from serve({"scene-vlm": scene_vlm})


def test_grounding_box_and_points_over_the_image(chromium, server, tmp_path):
    image = tmp_path / "scene.png"
    SceneWorld(seed=0).scene("test", 0).image.save(image)
    page, errors = open_run(chromium, server, "scene-vlm", question("bag"), image=image)
    panel = page.locator(".as-ground")
    panel.locator("select").select_option("tag")
    panel.locator("input").fill("bag")
    panel.locator("button").click()
    expect(panel).to_have_attribute("data-box", re.compile(r"^\d+,\d+,\d+,\d+$"), timeout=60_000)
    x0, y0, x1, y1 = map(int, panel.get_attribute("data-box").split(","))
    assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    assert len(panel.get_attribute("data-points").split(";")) == 3
    # the box's top edge, midway along it, is drawn in cyan (scaled from 224 model-input pixels to the canvas)
    pixel = page.eval_on_selector(".as-ground-canvas", f"""c => {{
        const s = c.width / 224; return Array.from(c.getContext('2d').getImageData(
            Math.round(({x0} + {x1}) / 2 * s), Math.round({y0} * s), 1, 1).data); }}""")
    assert pixel[0] < 60 and pixel[1] > 180 and pixel[2] > 200, pixel
    expect(panel.locator(".as-ground-caption")).to_contain_text("tag at \"bag\"")
    panel.locator("input").fill("umbrella")
    panel.locator("button").click()
    expect(panel.locator(".as-ground-caption.as-error")).to_contain_text("not in the question", timeout=60_000)
    assert panel.get_attribute("data-box") is None
    assert not errors, errors
    page.close()
