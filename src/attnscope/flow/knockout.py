"""Information flow by attention knockout over sliding windows of layers ("Cross-modal Information Flow in Multimodal
Large Language Models", Zhang et al., CVPR 2025; the knockout of "Dissecting Recall of Factual Associations in
Auto-Regressive Language Models", Geva et al., EMNLP 2023).

For each flow source->target and each window of `window` consecutive language layers, the target rows cannot read
the source keys in those layers (`steer.Knockout`, a `MaskKeys` edit), and the answer token's probability at the
last position is compared with the unedited forward: (p_knockout - p) / p. A large drop in a window says the answer
needs information to move from the source positions into the target positions there. Cost: one forward per window
and flow, plus one."""
from __future__ import annotations

import torch

from ..core import seam
from ..steer.edits import SteerError, lm_stream
from ..steer.methods.knockout import Knockout
from ..steer.session import as_model, steer
from .curve import KnockoutCurve, flow_name
from .sets import TokenSetError, check_set_names, token_sets

VLM_FLOWS = (("image", "question"), ("image", "last"), ("question", "last"))
TEXT_FLOWS = (("subject", "last"), ("question", "last"))


def parse_flows(flows) -> list[tuple[str, str]]:
    """[(source, target)] from pairs or strings "image->question" (also "image:question")."""
    out = []
    for item in flows:
        if isinstance(item, str):
            parts = item.replace("->", ":").split(":")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise TokenSetError(f"a flow is written source->target, e.g. image->question; got {item!r}")
            item = (parts[0].strip(), parts[1].strip())
        source, target = item
        if source == target:
            raise TokenSetError(f"flow {source}->{target}: source and target must be different sets")
        out.append((str(source), str(target)))
    if not out:
        raise TokenSetError("no flows to knock out")
    return out


def check_window(n_layers: int, window, stride, stream: str) -> tuple[int, int]:
    if isinstance(window, bool) or not isinstance(window, int) or isinstance(stride, bool) or not isinstance(stride, int):
        raise SteerError(f"window and stride are whole numbers of layers; got window={window!r}, stride={stride!r}")
    if window < 1:
        raise SteerError(f"a knockout window covers at least 1 layer; got window={window}")
    if window > n_layers:
        raise SteerError(f"window={window} is beyond the layer count: stream '{stream}' has {n_layers} layers; "
                         f"use a window of 1..{n_layers}")
    if stride < 1:
        raise SteerError(f"stride must be >= 1; got {stride}")
    return window, stride


def window_starts(n_layers: int, window: int, stride: int) -> list[int]:
    """First layers of the knockout windows: 0, stride, 2*stride, ... and always a last window ending at the last
    layer (start n_layers - window), so the curve reaches the top of the stack whatever the stride; that last step
    can be shorter than `stride`. With stride > window the layers between two windows are in none (a sparse sweep;
    the curve's windows say which were knocked out)."""
    starts = list(range(0, n_layers - window + 1, stride))
    return starts if starts[-1] == n_layers - window else starts + [n_layers - window]


def answer_token(model, answer) -> int:
    """A token id from an int, or from a word (its first token; write a leading space where the prompt needs one)."""
    vocab = model.hf.get_output_embeddings().weight.shape[0] if model.hf.get_output_embeddings() is not None else None
    if isinstance(answer, int) and not isinstance(answer, bool):
        tid = answer
    elif isinstance(answer, str) and answer:
        if model.tokenizer is None:
            raise TokenSetError(f"{model.name} has no tokenizer to read the answer {answer!r}; pass a token id")
        ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TokenSetError(f"the answer {answer!r} has no tokens")
        tid = int(ids[0])
    else:
        raise TokenSetError(f"answer must be a word or a token id; got {answer!r}")
    if vocab is not None and not 0 <= tid < vocab:
        raise TokenSetError(f"answer token id {tid} is outside the vocabulary (0..{vocab - 1})")
    return tid


def _forward(model, inputs: dict):
    with torch.no_grad():
        return model.hf(**seam.keep_logits(model.hf, inputs, 1))


def _answer_probs(model, inputs: dict) -> torch.Tensor:
    return _forward(model, inputs).logits[0, -1].float().softmax(-1)


def knockout_curve(model, text: str, image=None, *, flows=None, window: int = 4, stride: int = 1,
                   question: str | None = None, subject: str | None = None, answer=None, chat: bool | None = None,
                   extra_sets: dict[str, list[int]] | None = None, group=None) -> KnockoutCurve:
    """The knockout curve of one prompt: for each flow (default for a VLM: image->question, image->last,
    question->last; for a text model: subject->last and question->last, subject only when `subject` is given) and
    each window of `window` layers (starts 0, stride, 2*stride, ..., and a last window ending at the last layer:
    `window_starts`), the relative change of the answer's probability at the last position.

    `text` is the prompt (a VLM puts it in its chat template with the image); `question` the words of the question
    set (default: `text`), `subject` those of the subject set (taken out of the question set). `answer` is a word
    (first token) or a token id; default the unedited model's most likely next token. Everything is validated
    before the model runs; each window runs in its own `steer` block, so the model is restored after each.
    `extra_sets` adds named sets of positions computed elsewhere (e.g. the image tokens that show the asked object,
    from the scene world's masks); they must lie inside the prompt. `group` labels the example for clustered
    bootstrap intervals when curves are combined.
    Raises TokenSetError / SteerError (both ValueError) for unknown sets, image sets on a text model, words not in
    the prompt, empty sets, a flow whose source lies wholly after its target (causal attention already blocks it),
    a window of 0 layers or beyond the layer count."""
    model = as_model(model)
    vlm = model.spec.kind == "vlm"
    flows = _default_flows(model, flows, subject)
    check_set_names(model, {name for pair in flows for name in pair} - set(extra_sets or {}))
    check_window(model.streams[lm_stream(model)], window, stride, lm_stream(model))
    if image is not None and not vlm:
        raise TokenSetError(f"{model.name} is a {model.spec.kind} model: it takes no image")
    if vlm and image is None and any("image" in pair for pair in flows):
        raise TokenSetError("flows with the image set need an image; pass image=...")
    inputs = model.encode(text, image=image, chat=chat) if image is not None else model.encode(text, chat=chat)
    return knockout_inputs(model, inputs, question=question if question is not None else text, subject=subject,
                           flows=flows, window=window, stride=stride, answer=answer, extra_sets=extra_sets,
                           group=group, text=text)


def _default_flows(model, flows, subject) -> list[tuple[str, str]]:
    if flows is None:
        flows = VLM_FLOWS if model.spec.kind == "vlm" else (TEXT_FLOWS if subject is not None else TEXT_FLOWS[1:])
    return parse_flows(flows)


def knockout_inputs(model, inputs: dict, *, question: str | None = None, subject: str | None = None, flows=None,
                    window: int = 4, stride: int = 1, answer=None, extra_sets: dict[str, list[int]] | None = None,
                    group=None, text: str | None = None) -> KnockoutCurve:
    """`knockout_curve` on inputs already encoded (one sequence): the question set is the tokens spelling
    `question` (none if not given), the rest as `knockout_curve`."""
    model = as_model(model)
    stream = lm_stream(model)
    n_layers = model.streams[stream]
    window, stride = check_window(n_layers, window, stride, stream)
    flows = _default_flows(model, flows, subject)
    extra = {str(k): sorted({int(i) for i in v}) for k, v in (extra_sets or {}).items()}
    check_set_names(model, {name for pair in flows for name in pair} - set(extra))
    sets = token_sets(model, inputs, question=question, subject=subject)
    n_tokens = sets["last"][0] + 1
    for name, positions in extra.items():
        if name in sets:
            raise TokenSetError(f"extra set {name!r} has the name of a built-in set; rename it")
        if any(not 0 <= i < n_tokens for i in positions):
            raise TokenSetError(f"extra set {name!r} has positions outside the {n_tokens}-token prompt")
        sets[name] = positions
    for source, target in flows:
        for name in (source, target):
            if not sets.get(name):
                hint = {"subject": " (pass subject=...)", "question": " (pass question=...)"}.get(name, "")
                hint = hint if (name == "subject" and subject is None) or (name == "question" and question is None) else ""
                raise TokenSetError(f"flow {source}->{target}: the {name!r} set is empty in this prompt{hint}; sets "
                                    f"found: {', '.join(k for k, v in sets.items() if v)}")
        if min(sets[source]) > max(sets[target]):
            raise TokenSetError(f"flow {source}->{target}: every {source} position comes after every {target} position, "
                                f"so causal attention already keeps {target} from reading {source}; the knockout would "
                                f"change nothing (did you mean {target}->{source}?)")
    tid = answer_token(model, answer) if answer is not None else None
    spec = {name: ("last" if name == "last" else positions) for name, positions in sets.items()}
    starts = window_starts(n_layers, window, stride)
    windows = [(s, s + window - 1) for s in starts]
    edits = {(f, s): Knockout(source=spec[f[0]], target=spec[f[1]], layers=range(s, s + window), stream=stream)
             for f in flows for s in starts}  # built (validated) before the first forward
    for edit in edits.values():
        edit.edits(model)

    first = _forward(model, inputs)
    probs = first.logits[0, -1].float().softmax(-1)
    # the windows only edit the language model: its image features are the same in every forward, encode them once
    # (positions were found above with the full inputs; the edits select by positions, not by roles)
    inputs = seam.reuse_encoded_images(model.hf, inputs, first)
    if tid is None:
        tid = int(probs.argmax())
    p0 = float(probs[tid])
    if p0 <= 0:
        raise TokenSetError(f"the answer token has probability {p0} before any knockout; a relative change is undefined")
    changes = {}
    for flow in flows:
        row = []
        for s in starts:
            with steer(model, edits[(flow, s)]):
                p = float(_answer_probs(model, inputs)[tid])
            row.append((p - p0) / p0)
        changes[flow_name(*flow)] = [row]
    tok = model.tokenizer
    example = {"text": text if text is not None else question, "answer_id": tid, "answer": tok.decode([tid]) if tok is not None else str(tid),
               "top1": int(probs.argmax()) == tid, "p": p0, "sets": sets}
    if group is not None:
        example["group"] = group
    return KnockoutCurve(model.name, stream, n_layers, window, windows, changes, [p0], [example],
                         {"window": window, "stride": stride, "flows": [flow_name(*f) for f in flows]})
