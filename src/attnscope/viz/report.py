"""`attnscope report`: one input through a model, written as ONE self-contained HTML file (the viewer with its
data inline: open it from disk, mail it, attach it to an issue; it makes no network request)."""
from __future__ import annotations

from pathlib import Path

from . import html, integrations, runner


def shorten(text: str, limit: int = 48) -> str:
    """`text` on one line, cut at a word boundary to at most `limit` characters (with "…" when cut)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,.;:") + "…"


PER_TOKEN_MAX = 48  # explain every word of a stream up to this many positions (beyond: the default target only)


def report(model, text: str | None = None, image=None, out: str | Path = "attnscope-report.html", max_new_tokens: int = 0,
           methods: list[str] | tuple[str, ...] = (), title: str | None = None, faithfulness: bool = True,
           max_values: int = html.EXPORT_MAX_VALUES, chat: bool | None = None) -> Path:
    """Run `model` (a zoo name, a local directory or a loaded Model) on `text` and/or `image` (photo name, path,
    PIL image), generating `max_new_tokens` for language models, and write the viewer page to `out`.

    `chat`: as `Model.encode` (None: a VLM given text and an image gets its chat prompt; False: the text as typed).
    `methods`: `attnscope.explain` methods to add beside raw attention: each for the method's default target (CLS,
    the next token, the last generated token's prediction) with its faithfulness score unless `faithfulness=False`,
    and, for a stream of at most `PER_TOKEN_MAX` positions, for every token a click can explain (`clicks`), so the
    file shows the clicked token's map as the served viewer does."""
    from ..models.zoo import load

    m = load(model) if isinstance(model, (str, Path)) else model
    result = runner.run(m, text=text, image=image, max_new_tokens=max_new_tokens, chat=chat)
    available = integrations.explain_methods()
    entries = []
    for method in methods:
        if method == integrations.RAW:
            continue
        if method not in available:
            raise ValueError(f"unknown or unavailable method {method!r}; available: {', '.join(available)}")
        stream = result.generation["stream"] if result.generation else result.views[0].name
        view = next(v for v in result.views if v.name == stream)
        entry, _ = runner.explain_entry(m, result, method, stream, None, None, with_faithfulness=faithfulness)
        entries.append(entry)
        if view.length + len(view.tail) <= PER_TOKEN_MAX:
            for pos in range(view.length + len(view.tail)):
                try:
                    entry, _ = runner.explain_entry(m, result, method, stream, None, pos, with_faithfulness=False)
                except ValueError:
                    continue
                if entry["target"] == pos:  # only clicks the rule follows; others show the default entry
                    entries.append(entry)
    if isinstance(image, (str, Path)):  # where the image came from, beside the trace's checksum of its pixels
        result.provenance["inputs"] = [f"image: {image}", *result.provenance.get("inputs", [])]
    what = ", ".join(x for x in (str(image) if isinstance(image, (str, Path)) else ("image" if image is not None else ""),
                                 repr(shorten(text)) if text else "") if x)
    name = title or f"attnscope: {m.name}" + (f" on {what}" if what else "")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html.result_html(result, title=name, max_values=max_values, explanations=entries), encoding="utf-8")
    return out
