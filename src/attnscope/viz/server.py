"""`attnscope serve`: the local viewer app (FastAPI + uvicorn), bound to 127.0.0.1 unless told otherwise.

Safety, by design rather than by convention:
- models come from the zoo or from directories found under the `model_dirs` given at start-up, picked by id;
  no endpoint takes a path, and a local id that resolves outside its folder (symlinks, "..") is refused;
- uploads are size-limited while they stream in (413), images are recognised by their first bytes (PNG,
  JPEG, WebP, GIF, BMP; other image formats 415, anything else 400) and their pixel count is checked from
  the header before any pixel is decoded (decompression bombs: 413);
- trace uploads must be safetensors (checked header, then `Trace.load`, which never unpickles);
- each model runs one request at a time; a few more wait (`queue`), the rest get 503 with Retry-After at once;
- every failure is answered as JSON {"error": ...} and leaves no lock held and no half-built state behind;
- Host headers are checked (DNS rebinding) unless the server is exposed on purpose with --host."""
from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import secrets
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import data, html, integrations, runner, summary_view

log = logging.getLogger("attnscope.serve")

ALLOWED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
OTHER_IMAGE_MAGIC = [  # recognised, but not accepted: a clear 415 instead of "not an image"
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"%!PS", "EPS"),
    (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"), (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "OpenEXR"),
]
CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}


@dataclass
class Limits:
    max_upload: int = 8 * 1024 * 1024  # bytes of one image upload request
    max_trace: int = 64 * 1024 * 1024  # bytes of one trace upload request
    max_pixels: int = 16_000_000  # width x height of an uploaded image, read from its header
    max_text: int = 20_000  # characters of a prompt
    max_tokens: int = 4096  # tokens of an encoded prompt
    max_new_tokens: int = 64
    queue: int = 2  # requests that may wait for a busy model; more get 503 at once
    wait: float = 120.0  # seconds a waiting request waits before a 503
    runs: int = 8  # finished runs kept for their lazy rows (oldest dropped first)
    budget: int = data.DEFAULT_BUDGET  # stored attention values per run


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Busy(ApiError):
    def __init__(self, what: str, retry: int = 5):
        super().__init__(503, f"{what} is busy with other requests; try again in a few seconds", {"Retry-After": str(retry)})


class _TooLarge(Exception):
    pass


class Slot:
    """One model: loaded on first use; one request at a time, `queue` more may wait."""

    def __init__(self, model_id: str, queue: int, wait: float):
        self.id, self.queue, self.wait = model_id, queue, wait
        self.lock, self.guard = threading.Lock(), threading.Lock()
        self.waiting = 0
        self.model = None

    @contextmanager
    def use(self):
        with self.guard:
            if self.waiting >= self.queue and self.lock.locked():
                raise Busy(f"model {self.id}")
            self.waiting += 1
        try:
            ok = self.lock.acquire(timeout=self.wait)
        finally:
            with self.guard:
                self.waiting -= 1
        if not ok:
            raise Busy(f"model {self.id}")
        try:
            yield
        finally:
            self.lock.release()


@dataclass
class Entry:
    result: runner.RunResult
    model_id: str | None
    created: float = field(default_factory=time.time)


class Viewer:
    """State of one server: model registry, slots, finished runs."""

    def __init__(self, model_dirs=(), limits: Limits | None = None):
        self.limits = limits or Limits()
        self.model_dirs = [Path(d).resolve() for d in model_dirs]
        self.slots: dict[str, Slot] = {}
        self.runs: OrderedDict[str, Entry] = OrderedDict()
        self.pinned: dict[str, Entry] = {}  # trace directories opened at start-up: never dropped
        self._runs_lock, self._slots_lock = threading.Lock(), threading.Lock()

    # --- models ------------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        from ..models.zoo import ZOO, zoo_state

        state = {row["name"]: row for row in zoo_state()}
        out = [{"id": name, "label": name, "about": about, "installed": state.get(name, {}).get("installed", True)}
               for name, (about, _) in ZOO.items()]
        for root in self.model_dirs:
            for path in sorted([root, *[p for p in root.iterdir() if p.is_dir()]] if root.is_dir() else []):
                real = path.resolve()
                if not (real == root or real.is_relative_to(root)):  # a symlink out of the folder: not offered
                    continue
                if (real / "config.json").is_file():
                    rel = "." if path == root else path.name
                    out.append({"id": f"local:{root.name}/{rel}", "label": f"{path.name} (local)", "about": str(real), "installed": True})
        return out

    def model_path(self, model_id: str) -> str:
        """Zoo name, or the resolved directory of a local id; anything else is refused."""
        from ..models.zoo import ZOO

        if model_id in ZOO:
            return model_id
        if model_id.startswith("local:"):
            known = {m["id"]: m for m in self.models()}
            if model_id in known:
                path = Path(known[model_id]["about"]).resolve()
                if any(path == root or path.is_relative_to(root) for root in self.model_dirs):
                    return str(path)
        raise ApiError(404, f"unknown model {model_id!r}: pick one of the ids listed by /api/info (zoo names, or "
                            "directories under the --models-dir folders given when the server started)")

    def slot(self, model_id: str) -> Slot:
        path = self.model_path(model_id)
        with self._slots_lock:
            if model_id not in self.slots:
                self.slots[model_id] = Slot(model_id, self.limits.queue, self.limits.wait)
            slot = self.slots[model_id]
        slot.path = path
        return slot

    def loaded(self, slot: Slot):
        """The slot's model (call while holding the slot)."""
        if slot.model is None:
            from ..models.zoo import load

            slot.model = load(slot.path)
        return slot.model

    # --- runs --------------------------------------------------------------------------------------------
    def keep(self, result: runner.RunResult, model_id: str | None) -> str:
        rid = secrets.token_urlsafe(9)
        with self._runs_lock:
            self.runs[rid] = Entry(result, model_id)
            while len(self.runs) > self.limits.runs:
                self.runs.popitem(last=False)
        return rid

    def open_trace(self, path) -> str:
        """Open a trace directory streamed by `capture(..., out=dir)` (given at start-up, never by a request) as a
        run that stays: its rows are read from disk when asked for (`viz.lazy`), never loaded whole. A trace or
        summaries file opens too (a summaries file's blocks are made when asked for, `viz.summary_view`)."""
        from ..capture.trace import Trace

        trace = Trace.load(path)
        result = runner.from_trace(trace)
        rid = secrets.token_urlsafe(9)
        with self._runs_lock:
            self.pinned[rid] = Entry(result, None)
        return rid

    def entry(self, rid: str) -> Entry:
        with self._runs_lock:
            entry = self.runs.get(rid) or self.pinned.get(rid)
            if rid in self.runs:
                self.runs.move_to_end(rid)
        if entry is None:
            raise ApiError(404, f"run {rid!r} is gone (the server keeps the last {self.limits.runs} runs); run it again")
        return entry

    def summary(self, rid: str, stream: str):
        """The `summary_view.SummaryStreamView` of a run opened from a summaries file."""
        views = self.entry(rid).result.summaries
        for v in views:
            if v.name == stream:
                return v
        raise ApiError(404, f"run {rid!r} has no summaries of stream {stream!r}" + (
            f"; streams: {[v.name for v in views]}" if views else " (it holds attention rows, not summaries)"))

    def view(self, rid: str, stream: str) -> data.StreamView:
        for v in self.entry(rid).result.views:
            if v.name == stream:
                return v
        raise ApiError(404, f"run {rid!r} has no stream {stream!r}")

    def describe(self, rid: str, result: runner.RunResult, model_id: str | None) -> dict:
        doc = result.document(embed_rows=False, title=model_id or "trace")
        return {"rid": rid, "model": model_id, "doc": doc | {"rid": rid}}


# --- input checks (pure functions, tested directly) --------------------------------------------------------
WHOLE = re.compile(r"-?[0-9]+")


def whole_number(value, name: str, valid: str) -> int:
    """`value` (a path segment, form field or JSON value) as an int, else a 400 naming `name` and the `valid` range.
    Only whole numbers pass: "2.5", 2.5, true, "" and "two" are refused, never rounded or read as 1."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and WHOLE.fullmatch(text):  # one optional minus, ASCII digits ("--2" is no number)
        return int(text)
    raise ApiError(400, f"{name} must be a whole number {valid}; got {value!r}")


def read_image(raw: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes, or ApiError 400/413/415 with a message that names the fix."""
    if not raw:
        raise ApiError(400, "the uploaded image is empty")
    head = raw[:16]
    fmt = None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        fmt = "PNG"
    elif head.startswith(b"\xff\xd8\xff"):
        fmt = "JPEG"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        fmt = "WEBP"
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        fmt = "GIF"
    elif head[:2] == b"BM":
        fmt = "BMP"
    if fmt is None:
        lower = raw[:256].lstrip().lower()
        for magic, name in OTHER_IMAGE_MAGIC:
            if head.startswith(magic) or lower.startswith(magic.lower()):
                raise ApiError(415, f"{name} images are not supported; upload PNG, JPEG, WebP, GIF or BMP")
        if raw[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
            raise ApiError(415, "HEIC/AVIF images are not supported; upload PNG, JPEG, WebP, GIF or BMP")
        raise ApiError(400, "the upload is not an image (PNG, JPEG, WebP, GIF or BMP expected)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=[fmt])
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ApiError(413, f"image is {w}x{h} = {w * h:,} pixels, above this server's limit of {max_pixels:,}; downscale it")
            if img.mode not in CONVERTIBLE_MODES:
                raise ApiError(415, f"image mode {img.mode} is not supported; save it as 8-bit RGB or greyscale")
            img.seek(0)
            img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ApiError(413, f"image rejected as a decompression bomb: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ApiError(400, f"the {ALLOWED_FORMATS[fmt]} image is corrupt or truncated ({err})") from err
    return img.convert("RGB")


def check_safetensors(raw: bytes) -> None:
    """Refuse anything that is not a safetensors file before it is written anywhere (pickles included)."""
    if len(raw) < 10:
        raise ApiError(400, "not a trace: the file is too short to be safetensors")
    n = int.from_bytes(raw[:8], "little")
    if not 2 <= n <= len(raw) - 8 or raw[8:9] != b"{":
        raise ApiError(400, "not a safetensors file: traces load as safetensors only (pickle and other formats are refused)")


# --- the app ---------------------------------------------------------------------------------------------
def create_app(model_dirs=(), limits: Limits | None = None, allowed_hosts: list[str] | None = None):
    state = Viewer(model_dirs, limits)
    lim = state.limits
    app = FastAPI(title="attnscope viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = state

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):  # a parameter FastAPI itself parsed: the same shape
        said = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                         for e in err.errors())
        return JSONResponse({"error": f"bad request: {said}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("request failed")
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {str(err)[:300]}"}, status_code=500)

    def _limit_for(path: str) -> int:
        return lim.max_trace if path.startswith("/api/trace") else lim.max_upload

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                                    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        return response

    static_dir = resources.files("attnscope.viz").joinpath(html.STATIC)
    app.mount("/static", StaticFiles(directory=str(static_dir), check_dir=False), name="static")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return html.page({"format": data.FORMAT, "mode": "server", "api": "api"}, "attnscope viewer", inline=False)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/api/info")
    def info():
        from ..models.images import PHOTOS

        steer = {k: {x: v[x] for x in ("doc", "help", "params", "syntax")} for k, v in integrations.steer_methods().items()}
        from . import grounding

        return {"models": state.models(), "photos": list(PHOTOS), "explain": integrations.explain_methods(),
                "ground": grounding.methods(),
                "steer": steer, "limits": {k: getattr(lim, k) for k in ("max_upload", "max_pixels", "max_text", "max_tokens", "max_new_tokens")}}

    @app.get("/api/models/{model_id:path}")
    def model_info(model_id: str):
        slot = state.slot(model_id)
        with slot.use():
            model = state.loaded(slot)
            return {"id": model_id, "takes": runner.takes(model), "streams": model.streams}

    async def _form(request: Request):
        limit = _limit_for(request.url.path)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"upload is {int(length):,} bytes, above this server's limit of {limit:,}")
        total = 0
        chunks = []
        async for chunk in request.stream():  # counted while it streams in, also without Content-Length
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"upload is above this server's limit of {limit:,} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        form_request = Request(request.scope, replay)
        try:
            return await form_request.form(max_files=2, max_fields=20, max_part_size=256 * 1024)
        except Exception as err:
            raise ApiError(400, f"could not read the form: {err}") from err

    async def _file_bytes(form, name: str) -> bytes | None:
        item = form.get(name)
        if item is None or isinstance(item, str):
            return None
        return await item.read()

    @app.post("/api/run")
    async def run(request: Request):
        form = await _form(request)
        model_id = str(form.get("model") or "")
        text = str(form.get("text") or "") or None
        photo = str(form.get("photo") or "") or None
        new_tokens = whole_number(form.get("max_new_tokens") or 0, "max_new_tokens",
                                  f"between 0 and {lim.max_new_tokens}")
        if not 0 <= new_tokens <= lim.max_new_tokens:
            raise ApiError(400, f"max_new_tokens must be between 0 and {lim.max_new_tokens}")
        if text is not None and len(text) > lim.max_text:
            raise ApiError(413, f"the prompt has {len(text):,} characters; this server takes at most {lim.max_text:,}")
        steer = str(form.get("steer") or "") or None
        try:
            steer_params = json.loads(str(form.get("steer_params") or "{}"))
            assert isinstance(steer_params, dict)
        except (ValueError, AssertionError) as err:
            raise ApiError(400, "steer_params must be a JSON object") from err
        # the prompt: the model's default (None: a VLM given an image gets its chat prompt), chat template, or raw
        chat = False if str(form.get("raw") or "") in ("1", "true", "on") else (
            True if str(form.get("chat") or "") in ("1", "true", "on") else None)
        raw = await _file_bytes(form, "image")
        image = None
        if raw:
            image = await run_in_threadpool(read_image, raw, lim.max_pixels)
        elif photo:
            from ..models.images import PHOTOS

            if photo not in PHOTOS:
                raise ApiError(400, f"unknown photo {photo!r}; photos: {', '.join(PHOTOS)}")
            image = photo
        if text is None and image is None:
            raise ApiError(400, "nothing to run: type a prompt and/or give an image")
        slot = state.slot(model_id)
        return await run_in_threadpool(_run_sync, slot, text, image, new_tokens, steer, steer_params, chat)

    def _run_sync(slot, text, image, new_tokens, steer, steer_params, chat):
        with slot.use():
            model = state.loaded(slot)
            if text is not None and model.tokenizer is not None:
                n = len(model.tokenizer(text)["input_ids"])
                if n > lim.max_tokens:
                    raise ApiError(413, f"the prompt is {n:,} tokens; this server takes at most {lim.max_tokens:,}")
            try:
                base = runner.run(model, text=text, image=image, max_new_tokens=new_tokens, budget=lim.budget, chat=chat)
                steered = None
                if steer:
                    steered = runner.run(model, text=text, image=image, max_new_tokens=new_tokens, budget=lim.budget,
                                         chat=chat, steer=steer, steer_params=steer_params)
            except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as err:
                raise ApiError(400, str(err)) from err
        out = state.describe(state.keep(base, slot.id), base, slot.id)
        if steered is not None:
            out["steered"] = state.describe(state.keep(steered, slot.id), steered, slot.id)
        return out

    @app.post("/api/trace")
    async def trace_upload(request: Request):
        form = await _form(request)
        raw = await _file_bytes(form, "trace")
        if not raw:
            raise ApiError(400, "no trace file in the form field 'trace'")
        check_safetensors(raw)
        return await run_in_threadpool(_trace_sync, raw)

    def _trace_sync(raw: bytes):
        from ..capture.summaries import Summaries
        from ..capture.trace import Trace, TraceFileError

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.safetensors"
            path.write_bytes(raw)
            try:
                trace = Trace.load(path)
                if isinstance(trace, Summaries):  # read now: its packs are read lazily, and the file goes with `tmp`
                    trace.verify()
                bad = [] if isinstance(trace, Summaries) else sorted(  # summaries: each block checks its own (`block`)
                    {key for run in trace.runs for key, recs in run.records.items() for rec in recs
                     if not bool(rec.probs.float().isfinite().all())})
                if bad:  # written so by a model that produced them: nothing the viewer can draw (nor JSON hold)
                    raise TraceFileError(f"the trace holds NaN or infinite probabilities at {bad[:4]}")
                result = runner.from_trace(trace)
                return state.describe(state.keep(result, None), result, None)
            except (TraceFileError, ValueError, KeyError, TypeError, IndexError) as err:
                raise ApiError(400, f"not a readable attnscope trace: {str(err).replace(str(path), 'upload')}") from err

    @app.get("/api/runs/{rid}")
    def run_doc(rid: str):
        entry = state.entry(rid)
        return state.describe(rid, entry.result, entry.model_id)

    # numbers in paths arrive as text and are parsed here, so a bad one gets a 400 naming the valid range
    @app.get("/api/runs/{rid}/{stream}/query/{query}")
    def query_block(rid: str, stream: str, query: str):
        view = state.view(rid, stream)
        if not len(view.queries):
            raise ApiError(404, f"stream {stream!r} of run {rid!r} has no stored rows")
        query = whole_number(query, "query", f"in 0..{view.length - 1}")
        if not 0 <= query < view.length:
            raise ApiError(400, f"query {query} is out of range 0..{view.length - 1}")
        q, u8, scale = view.block(query)
        return {"q": q, "b64": data.b64(u8), "scale": data.b64(scale)}

    @app.get("/api/runs/{rid}/{stream}/layer/{layer}")
    def layer_block(rid: str, stream: str, layer: str):
        view = state.view(rid, stream)
        layer = whole_number(layer, "layer", f"(captured layers: {view.layers})")
        if layer not in view.layers:
            raise ApiError(404, f"layer {layer} was not captured; layers: {view.layers}")
        li = view.layers.index(layer)
        if len(view.queries) * len(view.heads) * view.length > 16_000_000:
            raise ApiError(413, "this layer is too large to send whole; ask for query rows")
        u8, scale = view.layer_block(li)
        return {"layer": layer, "queries": view.queries, "b64": data.b64(u8), "scale": data.b64(scale)}

    @app.get("/api/runs/{rid}/{stream}/summary/{step}/{query}")
    def summary_block(rid: str, stream: str, step: str, query: str):
        view = state.summary(rid, stream)
        steps = sorted({s for s, _ in view.rows})
        step = whole_number(step, "step", f"in {steps[0]}..{steps[-1]}" if steps else "(this stream has no steps)")
        queries = [q for s, q in view.rows if s == step]
        query = whole_number(query, "query", f"(query rows at step {step}: {summary_view.span(queries)})" if queries
                             else f"(step {step} is not one of this stream's steps {steps[0]}..{steps[-1]})")
        try:
            return view.block(step, query).to_json()
        except KeyError as err:
            raise ApiError(404, err.args[0]) from err
        except ValueError as err:
            raise ApiError(400, str(err)) from err

    @app.post("/api/runs/{rid}/explain")
    async def explain(rid: str, request: Request):
        try:
            body = await request.json()
            method, stream, query, target = str(body["method"]), str(body["stream"]), body["query"], body.get("target")
        except Exception as err:
            raise ApiError(400, "send JSON {method, stream, query, target}") from err
        query = whole_number(query, "query", "(a position of the stream)")
        target = None if target is None else whole_number(target, "target", "(a position of the stream, or null)")
        entry = state.entry(rid)
        if entry.model_id is None:
            raise ApiError(400, "this run came from a trace file: explanations need the model; run it in the viewer")
        view = state.view(rid, stream)
        if not 0 <= query < view.length:
            raise ApiError(400, f"query {query} is out of range 0..{view.length - 1}")
        last = view.length + len(view.tail) - 1  # a generated token never fed back (the tail) can be clicked too
        if target is not None and not 0 <= target <= last:  # a negative one was read from the end of the prompt
            raise ApiError(400, f"target {target} is out of range 0..{last} (a position of stream {stream!r})")
        if method not in integrations.explain_methods() or method == integrations.RAW:
            raise ApiError(400, f"method {method!r} is not available here; methods: {integrations.explain_methods()}")
        slot = state.slot(entry.model_id)

        def _sync():
            with slot.use():
                try:
                    out, expl = runner.explain_entry(state.loaded(slot), entry.result, method, stream, query, target,
                                                     with_faithfulness=False)
                except (ValueError, TypeError, KeyError, IndexError, NotImplementedError, RuntimeError) as err:
                    raise ApiError(400, f"{method}: {err}") from err
            kept = entry.result.explanations
            fid = secrets.token_urlsafe(6)
            kept[fid] = expl
            while len(kept) > 16:
                kept.pop(next(iter(kept)))
            return out | {"fid": fid}

        return await run_in_threadpool(_sync)

    async def _with_model(rid: str, what: str, work, prefix: str | None = None):
        """Run `work(model, result)` on the run's own model (one request at a time per model), off the event loop;
        the model's errors become 400s starting with `prefix` (default `what`)."""
        entry = state.entry(rid)
        if entry.model_id is None:
            raise ApiError(400, f"this run came from a trace file: {what} needs the model; run it in the viewer")
        slot = state.slot(entry.model_id)

        def _sync():
            with slot.use():
                try:
                    return work(state.loaded(slot), entry.result)
                except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as err:
                    raise ApiError(400, f"{prefix or what}: {err}") from err

        return await run_in_threadpool(_sync)

    @app.post("/api/runs/{rid}/knockout")
    async def knockout(rid: str, request: Request):
        from .knockout import knockout_view

        try:
            body = await request.json()
        except Exception as err:
            raise ApiError(400, "send JSON {source, target, window, stride}") from err
        return await _with_model(rid, "a knockout", lambda model, result: knockout_view(model, result, body), "knockout")

    @app.post("/api/runs/{rid}/ground")
    async def ground(rid: str, request: Request):
        from . import grounding

        try:
            body = await request.json()
            method, target = str(body["method"]), body.get("target")
            target = None if target in (None, "") else str(target)
        except Exception as err:
            raise ApiError(400, "send JSON {method, target}") from err

        def work(model, result):
            if method not in grounding.methods(model):
                raise ApiError(400, f"grounding {method!r} is not available for this model; methods: "
                                    f"{grounding.methods(model) or 'none (not a vision-language model)'}")
            return grounding.ground_run(model, result, method, target)

        return await _with_model(rid, "grounding", work, method)

    @app.post("/api/runs/{rid}/faithfulness/{fid}")
    def faithfulness(rid: str, fid: str):
        entry = state.entry(rid)
        expl = entry.result.explanations.get(fid)
        if expl is None:
            raise ApiError(404, "that explanation is gone; pick the method again")
        with state.slot(entry.model_id).use():
            return {"faithfulness": integrations.faithfulness(expl)}

    @app.get("/api/runs/{rid}/export")
    def export(rid: str):
        entry = state.entry(rid)
        page = html.result_html(entry.result, title=f"attnscope: {entry.model_id or 'trace'}")
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="attnscope-{rid}.html"'})

    hosts = allowed_hosts if allowed_hosts is not None else ["127.0.0.1", "localhost", "[::1]", "::1"]
    if "*" not in hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServeError(RuntimeError):
    """The viewer cannot start (the address is taken or cannot be bound)."""


def bind(host: str, port: int):
    """A listening socket on (host, port), bound before anything is printed: a busy port fails here, clearly."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise ServeError(f"cannot resolve host {host!r}: {err.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (another attnscope serve?); stop it or pass "
                             "--port N") from None
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def serve(host: str = "127.0.0.1", port: int = 8765, model_dirs=(), limits: Limits | None = None, log_level: str = "info",
          stop_timeout: float = 2.0, traces=()) -> None:
    """Run the viewer until interrupted (Ctrl+C or SIGTERM). A non-loopback `host` exposes it to the network: on
    purpose only. The port is bound before the URL is printed (`ServeError` if it is taken); on a stop signal,
    requests still running get `stop_timeout` seconds, then the server exits without waiting for a model that is
    still computing. `traces`: streamed trace directories, trace or summaries files to open at start-up (each printed
    with its URL)."""
    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the server log for every model load
    if is_loopback(host):
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"]
    else:
        log.warning("serving on %s: anyone who can reach this address can run models here", host)
        hosts = ["*"]
    sock = bind(host, port)
    try:
        app = create_app(model_dirs, limits, allowed_hosts=hosts)
        base = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
        opened = [(path, app.state.viewer.open_trace(path)) for path in traces]
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=stop_timeout))
        print(f"attnscope viewer on {base}  (Ctrl+C stops it)", flush=True)
        for path, rid in opened:
            print(f"  trace {path}: {base}?run={rid}", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
