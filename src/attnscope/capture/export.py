"""Exports of a Trace to other tools' formats.

BertViz (Vig, "A Multiscale Visualization of Attention in the Transformer Model", ACL 2019 demos) draws
`head_view(attention, tokens)` / `model_view(attention, tokens)`, where `attention` is one tensor per layer of shape
[batch=1, heads, N, N] (layer 0 first) and `tokens` the N token strings. Note that BertViz's views load require.js,
d3 and jQuery from a CDN when shown; attnscope's own HTML (`Trace.to_html`) is self-contained and fetches nothing."""
from __future__ import annotations


def to_bertviz(trace, stream: str | None = None, run: int = -1, row: int = 0) -> dict:
    """{"attention": [per layer [1, heads, N, N]], "tokens": [N strings]} for `bertviz.head_view(**...)`.

    Needs, for every layer 0..L-1 of the stream, every head, every query and every key of the prefill (step 0)
    captured: `capture(model)` with its defaults. Raises ValueError naming what is missing otherwise (BertViz
    labels layers by list index, so a gap would put a layer under the wrong number)."""
    records = trace.run(run).records
    streams = sorted({s for s, _ in records})
    if stream is None:
        if len(streams) != 1:
            raise ValueError(f"the trace holds streams {streams}; pass stream=")
        stream = streams[0]
    layers = trace.layers(stream, run)
    if not layers:
        raise ValueError(f"nothing captured in stream {stream!r}; streams: {streams}")
    total = (trace.provenance.get("streams") or {}).get(stream, max(layers) + 1)
    if layers != list(range(total)):
        raise ValueError(f"BertViz needs every layer 0..{total - 1} of {stream!r}; the trace has {layers}: capture "
                         "with layers=None")
    tmap = trace.tokens(stream, row, run)
    n = len(tmap)
    attention = []
    for layer in layers:
        rec = trace.record(stream, layer, 0, 0, run)
        if rec.keys is not None or rec.queries != list(range(n)) or rec.heads != list(range(len(rec.heads))):
            raise ValueError(f"BertViz needs every query, key and head at layer {layer}; this capture selected "
                             f"queries {rec.queries[:6]}..., keys {'all' if rec.keys is None else rec.keys[:6]}, heads "
                             f"{rec.heads}: capture with queries=None, keys=None, heads=None")
        attention.append(rec.probs[row: row + 1].detach().float().cpu().contiguous())
    return {"attention": attention, "tokens": list(tmap.tokens)}

