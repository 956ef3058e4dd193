"""Run a model on one input under capture and turn the trace into view data (used by the server, the
`report` command and `viz.html.report`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..capture.session import capture
from ..capture.trace import Trace
from ..models.images import load_image
from . import clicks, data, integrations


@dataclass
class RunResult:
    views: list[data.StreamView]
    images: list[Image.Image]
    provenance: dict
    generation: dict | None = None
    inputs: dict = field(default_factory=dict)
    seconds: float = 0.0
    steer: dict | None = None
    full_ids: torch.Tensor | None = None  # prompt + every generated token (explaining a generated word needs them)
    explanations: dict = field(default_factory=dict)  # id -> Explanation, for faithfulness asked for afterwards
    text: str | None = None  # the prompt as typed (the knockout panel's question words; grounding asks it again)
    raw_prompt: bool = False
    notes: list[str] = field(default_factory=list)  # shown above the viewer (`data.trace_notes`)
    summaries: list = field(default_factory=list)  # `summary_view.SummaryStreamView`s of a Summaries (views empty)

    def document(self, embed_rows: bool, title: str = "", max_values: int | None = None, **extra) -> dict:
        views, notes = self.views, self.notes
        if embed_rows and max_values is not None:
            views = [v.subset(v.export_queries(max_values)) for v in views]
        if self.summaries:  # per-head summaries instead of rows: the front end draws them with its summaries view
            from . import summary_view

            metas, thinned = summary_view.metas(self.summaries, embed_rows, max_values or summary_view.EXPORT_MAX_VALUES)
            extra, notes = extra | {"summaries": metas}, notes + thinned
        return data.document(views, self.images, embed_rows=embed_rows, provenance=self.provenance, title=title,
                             generation=self.generation, extra={"seconds": round(self.seconds, 3), "steer": self.steer} | extra,
                             notes=notes)


def can_generate(model) -> bool:
    try:
        return bool(model.hf.can_generate())
    except Exception:
        return False


def takes(model) -> dict:
    """What inputs the model takes: {"text": bool, "image": bool, "generate": bool}."""
    return {"text": model.tokenizer is not None, "image": model.image_processor is not None, "generate": can_generate(model),
            "vlm": model.spec.kind == "vlm", "image_token": getattr(model, "image_token", None)}


def run(model, text: str | None = None, image=None, max_new_tokens: int = 0, steer: str | None = None,
        steer_params: dict | None = None, budget: int = data.DEFAULT_BUDGET, chat: bool | None = None) -> RunResult:
    """Encode, run (or generate `max_new_tokens` greedily) under capture and build the stream views.

    Every layer and head is captured; query rows are all kept when they fit `budget` values, else the focus
    roles (CLS, specials, last, generated) and an even stride (see `data.query_plan`)."""
    can = takes(model)
    # `chat`: None (the model's default: a VLM given an image gets its chat prompt), True, or False (raw prompt)
    if text is not None and not text.strip():
        text = None
    if image is not None and not can["image"]:
        raise ValueError(f"{model.name} takes no images; type a prompt instead")
    if text is not None and not can["text"]:
        raise ValueError(f"{model.name} takes no text; give it an image")
    photo = None if image is None else load_image(image)
    inputs = model.encode(text=text, image=photo, chat=chat)
    generate = can["generate"] and max_new_tokens > 0 and "input_ids" in inputs
    queries = data.query_plan(model, inputs, budget, max_new_tokens if generate else 0)
    start = time.perf_counter()
    generation = None
    with torch.no_grad(), integrations.steering(model, steer, steer_params), capture(model, queries=queries) as trace:
        if generate:
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            model(**inputs)
    seconds = time.perf_counter() - start
    tail = []
    if generate:
        n = inputs["input_ids"].shape[1]
        new = ids[0, n:].tolist()
        fed = trace.run().steps  # decode forwards: every generated token but the last was fed back
        tail = model.tokenizer.convert_ids_to_tokens(new[fed:]) if len(new) > fed else []
        generation = {"prompt_length": n, "answer": model.tokenizer.decode(new, skip_special_tokens=True),
                      "new_tokens": len(new), "stream": "language" if "language" in model.streams else "text"}
    images = []
    if "pixel_values" in inputs and inputs["pixel_values"] is not None and inputs["pixel_values"].dim() == 4:
        images = [data.seen_image(inputs["pixel_values"], model.image_processor, i) for i in range(inputs["pixel_values"].shape[0])][:1]
    elif photo is not None:
        images = [photo]
    result = from_trace(trace, images=images, tail=tail, sinks=_sinks(model, trace, inputs, ids if generate else None))
    result.generation, result.inputs, result.seconds = generation, inputs, seconds
    result.text, result.raw_prompt = text, chat is False
    if generate:
        result.full_ids = ids.detach().cpu()
    result.steer = {"method": steer, "params": steer_params or {}} if steer else None
    return result


def _sinks(model, trace: Trace, inputs: dict, ids) -> dict:
    """{stream: SinkReport} by attnscope's one detector (`explain.sinks`), on the sequence the trace holds."""
    from ..explain import sinks as sinklib

    the_run = trace.run()
    out = {}
    for stream in sorted({s for s, _ in the_run.records}):
        x = inputs
        if ids is not None and stream in ("text", "language"):
            n = len(the_run.tokens[stream][0]) if the_run.tokens.get(stream) else ids.shape[1]
            x = dict(inputs) | {"input_ids": ids[:, :n], "attention_mask": torch.ones_like(ids[:, :n])}
        with torch.no_grad():
            out[stream] = sinklib.sink_rows(model, x, stream)[0]
    return out


def from_trace(trace: Trace, images: list[Image.Image] | None = None, tail: list[str] | None = None, run: int = -1,
               row: int = 0, sinks: dict | None = None) -> RunResult:
    from ..capture.summaries import Summaries
    from . import lazy, summary_view

    if isinstance(trace, Summaries):  # no rows: per-head summaries, read through the Summaries readers
        views = summary_view.stream_views(trace, run=run, row=row)
        return RunResult([], list(images or []), dict(trace.provenance), summaries=views,
                         notes=data.trace_notes(trace) + summary_view.notes(trace, run, row))
    if sinks is None and lazy.is_streamed(trace.run(run)):  # a trace on disk: read one layer at a time, on demand
        views = lazy.stream_views(trace, run=run, row=row, tail=tail)
    else:
        views = data.stream_views(trace, run=run, row=row, tail=tail, sinks=sinks)
    return RunResult(views, list(images or []), dict(trace.provenance), notes=data.trace_notes(trace))


def explain_entry(model, result: RunResult, method: str, stream: str, query: int | None = None,
                  target: int | None = None, with_faithfulness: bool = True) -> tuple[dict, object]:
    """Scores of `attnscope.explain(method)` as the viewer draws them, for the clicked token `target` (see
    `clicks.target_for`: a word's log-probability, an encoder token's embedding) or, with none clicked, the
    method's default target. `query` is the row the viewer shows; it does not choose what is explained."""
    view = next((v for v in result.views if v.name == stream), None)
    if view is None:
        raise ValueError(f"no stream {stream!r} in this run")
    inputs, goal, note = clicks.target_for(model, result, stream, target)
    expl = integrations.run_explain(model, inputs, method, goal, stream)
    scores, _ = integrations.explanation_scores(expl)
    flat = torch.as_tensor(scores).detach().float().reshape(-1)[: view.length]
    flat = torch.nn.functional.pad(flat, (0, view.length - flat.numel()))
    faith = integrations.faithfulness(expl) if with_faithfulness else None
    explains, about = clicks.label(expl, view)
    entry = data.scores_entry(method, stream, flat, target=about, faithfulness=faith, params=getattr(expl, "params", None),
                              explains=explains, note=note, units=integrations.units(method),
                              readout=_readout(expl, view))
    entry["clicked"] = target
    return entry, expl


def _readout(expl, view) -> list[int]:
    """The rows the explained target reads (its query positions), for the caption."""
    bound = getattr(expl, "_target", None)
    try:
        return [int(q) for q in bound.queries(view.tokens)] if bound is not None else []
    except Exception:
        return []
