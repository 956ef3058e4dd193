"""The viewer's grounding endpoint on the real scene-vlm: the box and points it sends lie in the image the viewer
shows, the map is a distribution, and bad requests get a clear 4xx naming the fix."""
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.models import zoo  # noqa: E402
from attnscope.scenes import SceneWorld, question  # noqa: E402
from attnscope.viz.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(minilm):
    try:
        vlm = zoo.load("scene-vlm")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    app = create_app()
    app.state.viewer.slot("scene-vlm").model = vlm
    app.state.viewer.slot("minilm").model = minilm
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_ground_a_viewer_run_and_refuse_what_cannot_be_grounded(client):
    info = client.get("/api/info").json()
    assert set(info["ground"]) == {"relative", "gradattn", "flow", "tag"}
    scene = SceneWorld(seed=0).scene("test", 0)
    r = client.post("/api/run", data={"model": "scene-vlm", "text": question("bag")},
                    files={"image": ("s.png", _png(scene.image), "application/octet-stream")})
    assert r.status_code == 200, r.text
    rid = r.json()["rid"]
    g = client.post(f"/api/runs/{rid}/ground", json={"method": "tag", "target": "bag"})
    assert g.status_code == 200, g.text
    body = g.json()
    h, w = body["pixel_size"]
    x0, y0, x1, y1 = body["box"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and all(0 <= x < w and 0 <= y < h for x, y in body["points"])
    assert abs(np.sum(body["map"]) - 1) < 1e-4 and body["target"] == "bag" and body["question"] == question("bag")
    bad = client.post(f"/api/runs/{rid}/ground", json={"method": "tag", "target": "umbrella"})
    assert bad.status_code == 400 and "not in the question" in bad.json()["error"]
    assert client.post(f"/api/runs/{rid}/ground", json={"method": "nope"}).status_code == 400
    assert client.post(f"/api/runs/{rid}/ground", content=b"{").status_code == 400
    text_run = client.post("/api/run", data={"model": "minilm", "text": "Is there a bag?"}).json()["rid"]
    refused = client.post(f"/api/runs/{text_run}/ground", json={"method": "tag"})
    assert refused.status_code == 400 and "not a vision-language model" in refused.json()["error"]
