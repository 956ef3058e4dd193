"""20 concurrent requests against a real server: each gets an answer or a clear busy reply, one model runs one
request at a time, and the server answers normally afterwards."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from attnscope.viz import runner  # noqa: E402
from attnscope.viz.server import Limits, create_app  # noqa: E402
from attnscope.viz.testing import running_server  # noqa: E402


def test_twenty_concurrent_requests(minilm, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real_run = runner.run

    def counted(model, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)  # hold the model a little, so requests really overlap
            return real_run(model, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(runner, "run", counted)
    app = create_app(limits=Limits(queue=3, wait=60))
    app.state.viewer.slot("minilm").model = minilm
    with running_server(app) as url:
        def post(i):
            with httpx.Client(timeout=120) as c:
                return c.post(f"{url}/api/run", data={"model": "minilm", "text": f"request number {i} about attention"})

        start = time.perf_counter()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(20)))
        seconds = time.perf_counter() - start
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1
        for a in answers:
            if a.status_code == 503:
                assert "busy" in a.json()["error"] and a.headers["retry-after"]
            else:
                assert a.json()["doc"]["streams"][0]["name"] == "text"
        assert peak[0] == 1  # one model, one request at a time
        after = httpx.post(f"{url}/api/run", data={"model": "minilm", "text": "and afterwards?"}, timeout=60)
        assert after.status_code == 200
        assert httpx.get(f"{url}/api/info", timeout=10).status_code == 200
    print(f"20 concurrent: {codes.count(200)} answered, {codes.count(503)} busy, {seconds:.2f} s")
