"""Self-contained HTML: the viewer's script, styles and data inline in ONE file that makes no network request.

`trace_html(trace)` / `explanation_html(expl)` / `head_table_html(table)` return the page as a string,
`write_html(obj, path)` writes it, and `notebook_html(page)` wraps a page for Jupyter's `_repr_html_` (a
sandboxed iframe, so the viewer's ids and styles cannot clash with the notebook's). The page carries a
Content-Security-Policy that forbids every fetch, so a file that tried would fail loudly in a browser."""
from __future__ import annotations

import html as _html
import json
from importlib import resources
from pathlib import Path

from PIL import Image

from . import data, integrations

STATIC = "static"
# embedded rows per file (layers x heads x queries x keys values, about one byte each before deflate)
EXPORT_MAX_VALUES = 3_000_000
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
       "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")


class AssetsMissingError(RuntimeError):
    """The built front end is not in the package (a source checkout that never ran the front-end build)."""


def asset(name: str) -> str:
    try:
        return resources.files("attnscope.viz").joinpath(STATIC, name).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise AssetsMissingError(f"attnscope/viz/static/{name} is missing; build it: cd frontend && npm ci && npm run build") from err


def json_for_script(doc: dict) -> str:
    """JSON that cannot end its <script> element early (`</script>`, `<!--` in tokens) or break HTML parsing."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def page(doc: dict, title: str = "attnscope", inline: bool = True, static_url: str = "static") -> str:
    """The viewer page around `doc`: everything inline (a file), or script/styles from `static_url` (the server)."""
    esc = _html.escape(title)
    if inline:
        head = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n<style>{asset("viewer.css")}</style>'
        # a literal "</script" inside the bundle would end the element: the bundle is built without one
        script = f"<script>{asset('viewer.js')}</script>"
    else:
        head = f'<link rel="stylesheet" href="{static_url}/viewer.css">'
        script = f'<script src="{static_url}/viewer.js"></script>'
    # the doc's notes (e.g. labels not checked) as markup: shown whether or not the script runs
    notes = "".join(f'<p class="as-warn" role="note">{_html.escape(str(n))}</p>\n' for n in doc.get("notes") or [])
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc}</title>\n{head}</head>\n"
        f"<body>{notes}<div id=\"attnscope-root\"></div>\n"
        f"<script type=\"application/json\" id=\"attnscope-data\">{json_for_script(doc)}</script>\n{script}\n</body></html>\n"
    )


def trace_html(trace, image: Image.Image | None = None, pixel_values=None, image_processor=None, title: str | None = None,
               explanations=None, max_values: int = EXPORT_MAX_VALUES, run: int = -1, row: int = 0) -> str:
    """One self-contained page for `trace.run(run)` (batch row `row`).

    Give the image as the model saw it for overlays: `image=` (PIL, same crop as the model's input) or
    `pixel_values=` with the `image_processor` that normalized them. `explanations`: Explanation objects to
    show as extra methods. Rows beyond `max_values` are thinned (see `StreamView.export_queries`). A `Summaries` gets
    its summaries view (`summary_view`; it takes no image or explanations: there are no rows to draw them over)."""
    from ..capture.summaries import Summaries

    images = [image] if image is not None else []
    if not images and pixel_values is not None:
        images = [data.seen_image(pixel_values, image_processor)]
    if isinstance(trace, Summaries):
        from .runner import from_trace

        if explanations or images:
            raise ValueError(f"the summaries view draws no {'explanation maps' if explanations else 'image overlay'} "
                             "(a summaries capture keeps no rows): drop "
                             f"{'explanations=' if explanations else 'image= / pixel_values='}, or capture rows "
                             "(capture without summaries=) to view them together")

        name = title or f"attnscope summaries: {trace.provenance.get('model', 'trace')}"
        return result_html(from_trace(trace, run=run, row=row), title=name, max_values=max_values)
    from . import lazy

    # a streamed trace (`Trace.load(dir)`): its summaries a layer at a time and only the exported rows read, as
    # `serve --trace` does; `data.stream_views` would build every row of the trace as one float array
    views_of = lazy.stream_views if lazy.is_streamed(trace.run(run)) else data.stream_views
    result_views = views_of(trace, run=run, row=row)
    views = [v.subset(v.export_queries(max_values)) for v in result_views]
    entries = [_explanation_entry(e, result_views) for e in explanations or []]
    name = title or f"attnscope: {trace.provenance.get('model', 'trace')}"
    doc = data.document(views, images, embed_rows=True, provenance=trace.provenance, title=name, explanations=entries,
                        notes=data.trace_notes(trace))
    return page(doc, name)


def result_html(result, title: str = "attnscope report", max_values: int = EXPORT_MAX_VALUES, explanations=None) -> str:
    """A page for a `runner.RunResult` (what `attnscope report` and the server's export write)."""
    doc = result.document(embed_rows=True, title=title, max_values=max_values)
    doc["explanations"] = list(doc.get("explanations") or []) + list(explanations or [])
    return page(doc, title)


def _explanation_entry(expl, views) -> dict:
    scores, tokens = integrations.explanation_scores(expl)
    stream = getattr(expl, "stream", None) or (views[0].name if views else "text")
    return data.scores_entry(str(getattr(expl, "method", "explanation")), stream, scores,
                             target=getattr(expl, "target", None), faithfulness=integrations.faithfulness(expl),
                             params=getattr(expl, "params", None))


def explanation_html(expl, image: Image.Image | None = None, title: str | None = None) -> str:
    """A page for one Explanation: its scores over the tokens (and over the image grid where it has one)."""
    import torch

    scores, tokens = integrations.explanation_scores(expl)
    flat = torch.as_tensor(scores).detach().float()
    grid = list(flat.shape) if flat.dim() == 2 else None
    if tokens is None:
        from ..core.tokens import TokenMap

        tokens = TokenMap.vision(*flat.shape, prefix=()) if grid else TokenMap.unknown(flat.numel())
    stream = getattr(expl, "stream", None) or ("vision" if grid else "text")
    view = data.StreamView(stream, tokens, [], [], [], data.np.zeros((0, 0, 0, len(tokens)), data.np.uint8),
                           data.np.zeros((0, 0, 0), data.np.float32))
    entry = data.scores_entry(str(getattr(expl, "method", "explanation")), stream, flat.reshape(-1),
                              target=getattr(expl, "target", None), faithfulness=integrations.faithfulness(expl),
                              params=getattr(expl, "params", None), grid=grid)
    if image is None and grid is None and getattr(tokens, "grids", None):
        pixels = getattr(expl, "_pixels", None)  # attnscope.explain keeps the model's pixel input for display
        if pixels is not None:
            image = Image.fromarray((data.np.clip(data.np.asarray(pixels), 0, 1) * 255).round().astype(data.np.uint8))
        elif getattr(expl, "photo", None) is not None:
            image = expl.photo
    name = title or f"attnscope explanation: {entry['method']}"
    doc = data.document([view], [image] if image is not None else [], embed_rows=True, title=name, explanations=[entry])
    return page(doc, name)


def head_table_html(table, title: str = "attnscope head table", layers: list[int] | None = None) -> str:
    """A page for a layers x heads table (attnscope.heads.table, a dict of 2-D arrays, or a DataFrame)."""
    grids = integrations.table_grids(table)
    first = next(iter(grids.values()))
    doc = data.document([], [], title=title, tables=[{"title": title, "metrics": grids,
                                                      "layers": layers or list(range(len(first)))}])
    return page(doc, title)


def html_of(obj, **kwargs) -> str:
    """The page for a Trace, Explanation, head table, RunResult, or an already-built page string."""
    from ..capture.trace import Trace
    from .runner import RunResult

    if isinstance(obj, str):
        return obj
    if isinstance(obj, Trace):
        return trace_html(obj, **kwargs)
    if isinstance(obj, RunResult):
        return result_html(obj, **kwargs)
    try:
        integrations.explanation_scores(obj)
        return explanation_html(obj, **kwargs)
    except TypeError:
        return head_table_html(obj, **kwargs)


def write_html(obj, path: str | Path, **kwargs) -> Path:
    """Write `obj`'s self-contained page to `path` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_of(obj, **kwargs), encoding="utf-8")
    return path


def notebook_html(obj, height: int = 760, **kwargs) -> str:
    """For `_repr_html_`: the page in a sandboxed iframe (scripts allowed, no same-origin access)."""
    doc = html_of(obj, **kwargs)
    return (f'<iframe sandbox="allow-scripts allow-downloads" style="width:100%;height:{height}px;border:1px solid #ddd;border-radius:4px" '
            f'srcdoc="{_html.escape(doc, quote=True)}"></iframe>')
