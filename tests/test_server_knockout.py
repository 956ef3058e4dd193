"""The viewer's knockout endpoint: a served run's prompt gives a knockout curve as JSON (the panel's data), bad
requests get a clear 400, and the model is untouched afterwards."""
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.core.dispatch import registered_names  # noqa: E402
from attnscope.viz.server import create_app  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(smollm):
    app = create_app()
    app.state.viewer.slot("smollm2-135m").model = smollm
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def rid(client):
    r = client.post("/api/run", data={"model": "smollm2-135m", "text": PROMPT, "max_new_tokens": "0"})
    assert r.status_code == 200, r.text
    return r.json()["rid"]


def state(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
    return model.hf.config._attn_implementation, hooks, registered_names()


def test_knockout_curve_as_json(client, rid, smollm):
    before = state(smollm)
    r = client.post(f"/api/runs/{rid}/knockout", json={"source": "subject", "target": "last", "subject": "France",
                                                        "window": 10, "stride": 10})
    assert r.status_code == 200, r.text
    doc = r.json()
    curve = doc["curve"]
    assert curve["windows"] == [[0, 9], [10, 19], [20, 29]] and curve["flows"] == ["subject->last"]
    assert len(curve["mean"]["subject->last"]) == 3 and all(v >= -1 for v in curve["mean"]["subject->last"])
    assert doc["answer"] == " Paris" and 0 < doc["p"] <= 1 and doc["sets"]["subject"] == 1
    assert doc["forwards"] == 4
    assert state(smollm) == before


@pytest.mark.parametrize("body, match", [
    ({"window": 31}, "beyond the layer count"),
    ({"source": "image", "target": "last"}, "no image tokens"),
    ({"source": "nouns", "target": "last"}, "unknown token set"),
    ({"source": "subject"}, "both a source and a target"),
    ({"window": "four"}, "whole number"),
    ({"window": 1, "stride": 1, "cap": 10}, "at most"),
    ({"source": "subject", "target": "last", "subject": "Berlin", "window": 30}, "not in the prompt"),
])
def test_bad_requests_get_a_clear_400(client, rid, smollm, body, match, monkeypatch):
    from attnscope.viz import knockout

    if "cap" in body:
        monkeypatch.setattr(knockout, "MAX_FORWARDS", body.pop("cap"))
    before = state(smollm)
    r = client.post(f"/api/runs/{rid}/knockout", json=body)
    assert r.status_code == 400 and match in r.json()["error"], r.text
    assert state(smollm) == before


def test_unknown_run_is_a_404(client):
    assert client.post("/api/runs/nope/knockout", json={}).status_code == 404
