"""Helpers for tests and benchmarks of the viewer: a server on a free loopback port in a thread, and Debian's
Chromium driven by Playwright (no browser download: `executable_path` points at the system's Chromium)."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
import json
import re
from html.parser import HTMLParser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-default-apps", "--disable-extensions", "--mute-audio"]


def chromium_path() -> str | None:
    for cand in (os.environ.get("ATTNSCOPE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.exists(cand):
            return cand
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, host: str = "127.0.0.1", timeout: float = 20.0):
    """Serve `app` with uvicorn in a daemon thread on a free port; yields the base URL; stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the viewer server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def browser():
    """A headless Chromium (Debian's) through Playwright."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError("no Chromium found: apt-get install chromium (or set ATTNSCOPE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def canvas_stats(page, selector: str) -> dict:
    """Pixel statistics of a canvas: how many pixels are not fully transparent, distinct colours, spread."""
    return page.eval_on_selector(selector, """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let opaque = 0, sum = 0, sum2 = 0; const colours = new Set();
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] > 0) opaque++;
            const v = d[i] + d[i + 1] + d[i + 2]; sum += v; sum2 += v * v;
            if (i % 16 === 0) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        }
        const n = d.length / 4, mean = sum / n;
        return {width: c.width, height: c.height, opaque: opaque / n, colours: colours.size, std: Math.sqrt(sum2 / n - mean * mean)};
    }""")


def synthetic_trace(layers: int = 30, heads: int = 9, length: int = 2000, queries=None, seed: int = 0, causal: bool = True):
    """A text `Trace` of `length` tokens with causal rows that have a first-token sink, for size and speed
    tests of the viewer without running a model. `queries`: stored positions (default: every 40th + the last)."""
    import torch

    from ..capture.trace import Record, Run, Trace
    from ..core.tokens import TokenMap

    g = torch.Generator().manual_seed(seed)
    queries = sorted(set(queries if queries is not None else [*range(0, length, 40), length - 1]))
    q = torch.tensor(queries)
    logits = torch.randn(1, heads, len(queries), length, generator=g) * 2
    logits[..., 0] += 9  # a sink on the first token (about a third of a long row: > 20x a uniform share)
    if causal:
        logits = logits.masked_fill(torch.arange(length)[None, :] > q[:, None], float("-inf"))
    run = Run()
    roles = ["special"] + ["text"] * (length - 1)
    run.tokens["text"] = [TokenMap(roles, ["<s>"] + [f"w{i}" for i in range(1, length)])]
    for layer in range(layers):
        probs = torch.softmax(logits + 0.1 * layer, dim=-1)
        run.records[("text", layer)] = [Record(probs, list(range(heads)), queries, None)]
    return Trace([run], {"model": "synthetic", "inputs": []})


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.data_json = [], None
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_data = tag == "script" and dict(attrs).get("id") == "attnscope-data"

    def handle_data(self, data):
        if self._in_data:
            self.data_json = (self.data_json or "") + data

    def handle_endtag(self, tag):
        self._in_data = False


def parse(page: str) -> Tags:
    p = Tags()
    p.feed(page)
    return p


def assert_self_contained(page: str) -> dict:
    """Assert a page needs nothing outside itself (no external src/href, inline scripts only, a CSP that
    forbids fetches) and return its embedded view document."""
    p = parse(page)
    for tag, attrs in p.tags:
        for key in ("src", "href", "action", "srcset", "data", "poster"):
            value = attrs.get(key)
            assert value is None or value.startswith(("data:", "#", "blob:")), f"<{tag} {key}={value!r}> points outside the file"
    scripts = [a for t, a in p.tags if t == "script"]
    assert len(scripts) == 2 and all("src" not in a for a in scripts)  # the data and the inline bundle
    assert not [t for t, _ in p.tags if t in ("link", "iframe", "object", "embed", "base")]
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) is None
    assert "Content-Security-Policy" in page and "connect-src 'none'" in page
    return json.loads(p.data_json)
