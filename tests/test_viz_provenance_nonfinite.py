"""A trace whose provenance holds a non-finite number (a user's own entry: NaN, an infinity) round-trips its file and
opens in the viewer and the HTML page, the number shown as text (JSON has no NaN): it was an internal error."""
import math

import pytest
import torch

import attnscope
from attnscope.capture.trace import Trace
from attnscope.viz.html import html_of


@pytest.fixture(scope="module")
def saved(minilm, tmp_path_factory):
    with torch.no_grad(), attnscope.capture(minilm, layers=[0]) as trace:
        minilm(**minilm.encode("hello world"))
    trace.provenance["user"] = {"score": float("nan"), "bound": float("inf"), "low": -float("inf"), "ok": 0.5}
    return trace.save(tmp_path_factory.mktemp("prov") / "t.safetensors")


def test_the_file_round_trips_and_the_page_renders(saved):
    back = Trace.load(saved)
    assert math.isnan(back.provenance["user"]["score"]) and back.provenance["user"]["bound"] == math.inf
    page = html_of(back)
    assert '"score":"nan"' in page and '"bound":"inf"' in page and '"low":"-inf"' in page and '"ok":0.5' in page


def test_the_viewer_opens_the_upload(saved):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    client = TestClient(create_app(), base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.post("/api/trace", files={"trace": ("t.safetensors", saved.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
