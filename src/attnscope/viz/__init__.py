"""Showing attention: static figures (`figures`), self-contained HTML (`html`), the local viewer app (`server`).

`to_html(obj, path)` writes one self-contained page for a Trace, an Explanation, a head table or a viewer run;
`plot_trace(trace, ...)` (= `trace.plot(...)`) draws one captured head as a static figure;
`show(obj)` displays it in Jupyter (a sandboxed iframe) or opens it in the default browser elsewhere. The server
(FastAPI) is imported only by `attnscope serve`."""
from __future__ import annotations


def to_html(obj, path=None, **kwargs):
    """The page as a string, or written to `path` (returns the path)."""
    from . import html

    return html.write_html(obj, path, **kwargs) if path is not None else html.html_of(obj, **kwargs)


def show(obj, **kwargs):
    """In Jupyter: an object that renders inline. Elsewhere: write a temporary file and open the browser."""
    from . import html

    try:
        from IPython import get_ipython

        if get_ipython() is not None and getattr(get_ipython(), "kernel", None) is not None:
            from IPython.display import HTML

            return HTML(html.notebook_html(obj, **kwargs))
    except ImportError:
        pass
    import tempfile
    import webbrowser

    path = html.write_html(obj, tempfile.NamedTemporaryFile(suffix=".html", delete=False).name, **kwargs)
    webbrowser.open(path.resolve().as_uri())
    return path


def plot_trace(trace, *args, **kwargs):
    """One captured head (or the mean over heads) over the image, or as bars over tokens: a matplotlib figure (see
    `figures.plot_trace`; the same as `trace.plot(...)`)."""
    from .figures import plot_trace as plot

    return plot(trace, *args, **kwargs)


__all__ = ["to_html", "show", "plot_trace"]
