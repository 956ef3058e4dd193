"""The viewer's knockout panel: a served run's prompt -> `attnscope.flow` knockout curve as JSON (the panel is
`frontend/src/knockout.ts`). The curve runs on the unsteered model, over the prompt (the first answer token)."""
from __future__ import annotations

from .server import WHOLE  # the server's whole numbers: one optional minus, ASCII digits

MAX_FORWARDS = 200  # one request may not run more forwards than this (windows x flows)


def _int(body: dict, key: str, default: int) -> int:
    value = body.get(key, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not WHOLE.fullmatch(str(value).strip()):
        raise ValueError(f"{key} must be a whole number; got {value!r}")  # "--2" too, not int()'s own message
    return int(value)


def knockout_view(model, result, body: dict) -> dict:
    """Run the knockout asked for by `body` {source, target (both or neither: the model's default flows), window,
    stride, question, subject} on the run's prompt; ValueError for anything it cannot do."""
    from ..flow import knockout_inputs
    from ..flow.knockout import _default_flows, check_window, window_starts
    from ..steer.edits import lm_stream

    if not isinstance(body, dict):
        raise ValueError("send JSON {source, target, window, stride}")
    source, target = body.get("source") or None, body.get("target") or None
    if (source is None) != (target is None):
        raise ValueError("choose both a source and a target set (or neither, for the default flows)")
    flows = _default_flows(model, [(str(source), str(target))] if source else None, body.get("subject") or None)
    stream = lm_stream(model)
    n = model.streams[stream]
    window, stride = check_window(n, _int(body, "window", 4), _int(body, "stride", 1), stream)
    forwards = len(window_starts(n, window, stride)) * len(flows) + 1
    if forwards > MAX_FORWARDS:
        raise ValueError(f"{forwards} forwards asked ({len(flows)} flows x windows); the viewer runs at most "
                         f"{MAX_FORWARDS}: raise the stride or the window, or choose one flow")
    inputs = result.inputs
    if not inputs or inputs.get("input_ids") is None:
        raise ValueError("this run has no prompt to knock out (a knockout needs a language model's prompt)")
    question = body.get("question") or result.text
    curve = knockout_inputs(model, inputs, question=question, subject=body.get("subject") or None, flows=flows,
                            window=window, stride=stride, text=result.text)
    ex = curve.examples[0]
    return {"curve": curve.to_dict(intervals=False), "answer": ex["answer"], "p": ex["p"],
            "sets": {k: len(v) for k, v in ex["sets"].items()}, "forwards": forwards}
