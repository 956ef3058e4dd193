"""Viewer responsiveness at 2,000 tokens: server answer times and time-to-render in Chromium.

Runs the real server (uvicorn, loopback) and Debian's Chromium through Playwright, in one process:
  1. SmolLM2-135M on a ~2,000-token prompt + 4 generated tokens, run through the app's own /api/run;
  2. a synthetic 2,000-token trace with the same shape (30 layers x 9 heads), injected as a run, so the
     viewer's own cost is measured without the model;
  3. DINOv2-S on chelsea: the served run and the exported self-contained file.
Writes bench/results/viewer.md and viewer.json. Usage: python bench/viewer.py [--no-model]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

import attnscope
from attnscope.viz import html, runner
from attnscope.viz.server import Limits, create_app
from attnscope.viz.testing import browser, running_server, synthetic_trace

OUT = Path(__file__).parent / "results"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def time_queries(url: str, rid: str, stream: str, positions) -> dict:
    times, sizes = [], []
    with httpx.Client(timeout=60) as c:
        for q in positions:
            t = time.perf_counter()
            r = c.get(f"{url}/api/runs/{rid}/{stream}/query/{q}")
            times.append(time.perf_counter() - t)
            sizes.append(len(r.content))
            r.raise_for_status()
    return {"median_ms": ms(statistics.median(times)), "max_ms": ms(max(times)), "bytes": int(statistics.median(sizes)), "n": len(times)}


def time_page(b, url: str, clicks: list[str], expect_q: list[str] | None = None) -> dict:
    from playwright.sync_api import expect

    page = b.new_page(viewport={"width": 1440, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    t = time.perf_counter()
    page.goto(url)
    page.wait_for_selector(".as-viewer[data-ready='1']", timeout=120_000)
    first = time.perf_counter() - t
    viewer = page.locator(".as-viewer").first
    walls, inpage = [], []
    for i, sel in enumerate(clicks):
        t = time.perf_counter()
        page.click(sel)
        if expect_q:
            expect(viewer).to_have_attribute("data-q", expect_q[i], timeout=60_000)
        walls.append(time.perf_counter() - t)
        inpage.append(float(viewer.get_attribute("data-select-ms") or 0))
    draw = float(viewer.get_attribute("data-draw-ms") or 0)
    tokens = page.locator(".as-tok").count()
    cells = page.locator(".as-grid .as-cell").count()
    page.close()
    if errors:
        raise RuntimeError(errors)
    return {"first_render_ms": ms(first), "click_wall_median_ms": ms(statistics.median(walls)) if walls else None,
            "click_in_page_median_ms": round(statistics.median(inpage), 1) if inpage else None,
            "redraw_ms": round(draw, 1), "tokens": tokens, "cells": cells}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2 2,000-token run (about a minute on 2 cores)")
    args = ap.parse_args()
    results: dict = {}
    dinov2 = attnscope.load("dinov2-small")
    app = create_app(limits=Limits(max_tokens=4096, max_new_tokens=8))
    state = app.state.viewer
    state.slot("dinov2-small").model = dinov2
    with running_server(app) as url, browser() as b:
        # 2: synthetic 2,000 tokens (viewer cost only)
        trace = synthetic_trace(layers=30, heads=9, length=2000)
        t = time.perf_counter()
        result = runner.from_trace(trace)
        views_s = time.perf_counter() - t
        rid = state.keep(result, None)
        view = result.views[0]
        with httpx.Client(timeout=60) as c:
            t = time.perf_counter()
            doc = c.get(f"{url}/api/runs/{rid}")
            doc_s = time.perf_counter() - t
        positions = [7, 333, 1000, 1500, 1999, 1203, 402, 1800]
        results["synthetic_2000"] = {
            "shape": "30 layers x 9 heads x 2000 keys, 51 stored query rows",
            "build_views_ms": ms(views_s), "run_doc_ms": ms(doc_s), "run_doc_bytes": len(doc.content),
            "query_block": time_queries(url, rid, "text", positions),
            "browser": time_page(b, f"{url}/?run={rid}", [f".as-tok[data-i='{p}']" for p in positions[:5]],
                                 [str(view.nearest(p)) for p in positions[:5]]),
        }
        print("synthetic", json.dumps(results["synthetic_2000"]), flush=True)

        # 1: the real model at ~2,000 tokens
        if not args.no_model:
            smol = attnscope.load("smollm2-135m")
            state.slot("smollm2-135m").model = smol
            sentence = "Attention maps show which earlier tokens each position reads from. "
            ids = smol.tokenizer(sentence * 200)["input_ids"][:1996]
            prompt = smol.tokenizer.decode(ids)
            with httpx.Client(timeout=600) as c:
                t = time.perf_counter()
                r = c.post(f"{url}/api/run", data={"model": "smollm2-135m", "text": prompt, "max_new_tokens": "4"})
                run_s = time.perf_counter() - t
                r.raise_for_status()
            body = r.json()
            s = body["doc"]["streams"][0]
            view = state.entry(body["rid"]).result.views[0]
            gen = [i for i, role in enumerate(s["roles"]) if body["doc"]["roles"][role] == "generated"]
            clicks = [gen[-1], 1500, 100, 1900, 0] if gen else [1500, 100, 1900, 0]
            results["smollm2_2000"] = {
                "tokens": s["length"], "stored_rows": len(s["queries"]), "generated": body["doc"]["generation"]["answer"],
                "run_request_s": round(run_s, 2), "model_and_capture_s": body["doc"]["seconds"],
                "run_doc_bytes": len(r.content),
                "query_block": time_queries(url, body["rid"], "text", [q for q in s["queries"][::5]][:10]),
                "browser": time_page(b, f"{url}/?run={body['rid']}", [f".as-tok[data-i='{p}']" for p in clicks],
                                     [str(view.nearest(p - 1 if p in gen else p)) for p in clicks]),
            }
            print("smollm2", json.dumps(results["smollm2_2000"]), flush=True)

        # 3: DINOv2 served and exported
        result = runner.run(dinov2, image="chelsea")
        rid = state.keep(result, "dinov2-small")
        results["dinov2_served"] = {"query_block": time_queries(url, rid, "vision", [0, 37, 108, 200, 256]),
                                    "browser": time_page(b, f"{url}/?run={rid}", ["canvas.as-overlay", ".as-cell[data-l='5'][data-h='2']"])}
        page = html.result_html(result, title="dinov2-small on chelsea")
        path = Path(tempfile.mkdtemp()) / "viewer-dinov2-export.html"
        path.write_text(page, encoding="utf-8")
        try:
            results["dinov2_export"] = {"file_bytes": len(page.encode()),
                                        "browser": time_page(b, path.resolve().as_uri(), [".as-cell[data-l='5'][data-h='2']"])}
        finally:
            path.unlink()
        print("dinov2", json.dumps(results["dinov2_served"]), json.dumps(results["dinov2_export"]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "viewer.json").write_text(json.dumps(results, indent=1))
    write_md(results)
    return 0


def write_md(r: dict) -> None:
    lines = ["# Viewer responsiveness", "",
             "`python bench/viewer.py` (real uvicorn server on 127.0.0.1 and Debian Chromium via Playwright, one process,",
             "2 shared CPU cores). *first render*: page load to the viewer drawn; *click*: a token/patch click to the new",
             "row drawn (wall, from Playwright; *in page*: fetch + decode + draw measured inside the page).", ""]
    s = r["synthetic_2000"]
    lines += ["## 2,000 tokens, 30 layers x 9 heads (synthetic trace: the viewer's own cost)", "",
              "| what | value |", "|---|---|",
              f"| building the views (quantize, metrics, thumbnails) | {s['build_views_ms']} ms |",
              f"| run document (tokens, roles, metrics, thumbnails; no rows) | {s['run_doc_bytes'] / 1e3:.0f} kB in {s['run_doc_ms']} ms |",
              f"| one query's rows, all layers and heads | {s['query_block']['bytes'] / 1e3:.0f} kB, median {s['query_block']['median_ms']} ms, max {s['query_block']['max_ms']} ms |",
              f"| first render in Chromium ({s['browser']['tokens']} tokens, {s['browser']['cells']} grid cells) | {s['browser']['first_render_ms']} ms |",
              f"| click a token → redrawn | median {s['browser']['click_wall_median_ms']} ms wall, {s['browser']['click_in_page_median_ms']} ms in page |",
              ""]
    if "smollm2_2000" in r:
        m = r["smollm2_2000"]
        lines += ["## SmolLM2-135M, real 2,000-token prompt + 4 generated tokens, through /api/run", "",
                  "| what | value |", "|---|---|",
                  f"| tokens / stored query rows | {m['tokens']} / {m['stored_rows']} |",
                  f"| /api/run answer (model + capture of every layer and head + views) | {m['run_request_s']} s (model and capture {m['model_and_capture_s']} s) |",
                  f"| run document | {m['run_doc_bytes'] / 1e3:.0f} kB |",
                  f"| one query's rows | {m['query_block']['bytes'] / 1e3:.0f} kB, median {m['query_block']['median_ms']} ms |",
                  f"| first render in Chromium | {m['browser']['first_render_ms']} ms |",
                  f"| click a token (incl. a generated one) → redrawn | median {m['browser']['click_wall_median_ms']} ms wall, {m['browser']['click_in_page_median_ms']} ms in page |",
                  "", "The model's forward dominates; once a run is done, every interaction is answered from stored rows.", ""]
    d, e = r["dinov2_served"], r["dinov2_export"]
    lines += ["## DINOv2-S/14 on chelsea (257 tokens, 12 x 6)", "", "| what | value |", "|---|---|",
              f"| query rows (served) | {d['query_block']['bytes'] / 1e3:.0f} kB, median {d['query_block']['median_ms']} ms |",
              f"| served page: first render / click | {d['browser']['first_render_ms']} ms / {d['browser']['click_wall_median_ms']} ms |",
              f"| exported file (everything inline) | {e['file_bytes'] / 1e6:.2f} MB, first render {e['browser']['first_render_ms']} ms |", ""]
    (OUT / "viewer.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
