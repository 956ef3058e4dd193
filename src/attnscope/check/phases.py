"""The phases of `attnscope.check`: one forward, a greedy generate, strength-0 edits. Each adds rows to the result;
an error becomes a row (REFUSED when attnscope refused on purpose, FAIL when something crashed)."""
from __future__ import annotations

import inspect

import torch

from . import compare, reference
from .result import FAIL, PASS, CheckResult
from .runner import _diff, _error_row, _tensors


def _stream_rows(result: CheckResult, phase: str, reports: dict, extra: str = "") -> None:
    for stream, rep in reports.items():
        check = f"{phase}: {stream} rows = eager"
        if rep.problems:
            diff = rep.max_diff if rep.layers else None
            result.add(check, FAIL, diff, "; ".join(rep.problems[:3]) + (" ..." if len(rep.problems) > 3 else ""))
        elif rep.max_diff > result.atol:
            result.add(check, FAIL, rep.max_diff, f"{len(rep.layers)} layers{extra}; worst at {rep.worst}")
        else:
            result.add(check, PASS, rep.max_diff, f"{len(rep.layers)} layers{extra}; worst at {rep.worst}")


def _map_row(result: CheckResult, phase: str, issues: dict[str, list[str]]) -> None:
    bad = {s: v for s, v in issues.items() if v}
    if bad:
        detail = "; ".join(f"{s}: {', '.join(v[:2])}" + (f" (+{len(v) - 2} more)" if len(v) > 2 else "")
                           for s, v in bad.items())
        result.add(f"{phase}: token map lengths = keys", FAIL, None, detail)
    else:
        result.add(f"{phase}: token map lengths = keys", PASS, None, f"streams {', '.join(sorted(issues)) or 'none'}")


def forward_phase(model, inputs: dict, plain: list, result: CheckResult) -> None:
    from ..capture import capture

    try:
        ref, _ = reference.eager_attention(model, inputs)
    except Exception as err:  # noqa: BLE001
        return _error_row(result, "forward: eager reference", err)
    try:
        with torch.no_grad(), capture(model) as trace:
            inside = _tensors(model.hf(**inputs))
        run = trace.run()
    except Exception as err:  # noqa: BLE001
        return _error_row(result, "forward: capture every stream and layer", err)
    same, diff = _diff(plain, inside)
    result.add("forward: outputs bit-identical under capture", PASS if same else FAIL, None if same else diff,
               "capture calls the original backend" if same else "capture changed the model's outputs")
    _stream_rows(result, "forward", compare.compare(run, ref, model.streams))
    _map_row(result, "forward", compare.token_maps(trace.runs))
    _image_role_row(model, inputs, run, result)


def _placeholder_tokens(config) -> list[int]:
    """Image and video placeholder ids the config names."""
    return sorted({v for k, v in vars(config).items() if isinstance(v, int) and ("image" in k or "video" in k)
                   and k.endswith(("token_id", "token_index"))})


def _image_token(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _image_role_row(model, inputs: dict, run, result: CheckResult) -> None:
    """Where the config names an image token and the probe holds it: the language map's "image" positions must be
    exactly the positions of that id in input_ids (image tokens labelled "text" make role-based selections and
    edits silently select nothing)."""
    ids, token = inputs.get("input_ids"), _image_token(model.hf.config)
    if not isinstance(ids, torch.Tensor) or token is None or not bool((ids == token).any()):
        return
    check = "forward: image roles = image token ids"
    stream = next((s for s in ("language", "text") if run.tokens.get(s)), None)
    if stream is None:
        return result.add(check, FAIL, None, f"no language token map (streams with maps: {sorted(run.tokens)})")
    wrong = []
    for row, tmap in enumerate(run.maps_at(stream, 0)):
        want = (ids[row] == token).nonzero().flatten().tolist()
        got = tmap.positions("image")
        if got != want:
            wrong.append(f"row {row}: {len(got)} positions labelled image, {len(want)} image tokens ({token}) in input_ids")
    if wrong:
        result.add(check, FAIL, None, "; ".join(wrong[:2]))
    else:
        result.add(check, PASS, None, f"{stream} stream: {len(tmap.positions('image'))} image positions")


def full_inputs(model, inputs: dict, sequence: torch.Tensor) -> dict:
    """Forward arguments for one pass over `sequence` (prompt + fed generated tokens): per-token arguments of the
    prompt are extended (masks with ones, type ids with zeros); images and the encoder side stay as they were."""
    enc_dec = bool(getattr(model.hf.config, "is_encoder_decoder", False))
    key = "decoder_input_ids" if enc_dec else "input_ids"
    prompt = inputs[key]
    extra = sequence.shape[1] - prompt.shape[1]
    out = dict(inputs) | {key: sequence}
    for name, value in inputs.items():
        per_token = (isinstance(value, torch.Tensor) and name != key and value.ndim >= 2
                     and tuple(value.shape[:2]) == tuple(prompt.shape) and (not enc_dec or name.startswith("decoder_")))
        if per_token:
            # masks with ones; type ids with zeros, except PaliGemma's, where 1 marks the causal suffix (generated
            # tokens must not attend forward in the one-pass reference, as they could not while decoding)
            suffix = name == "token_type_ids" and getattr(model.hf.config, "model_type", "") == "paligemma"
            fill = torch.ones if "mask" in name or suffix else torch.zeros
            pad = fill((value.shape[0], extra, *value.shape[2:]), dtype=value.dtype, device=value.device)
            out[name] = torch.cat([value, pad], 1)
    params = inspect.signature(model.hf.forward).parameters
    if "use_cache" in params:
        out["use_cache"] = False
    return out


def decode_phase(model, inputs: dict, steps: int, result: CheckResult) -> None:
    from ..capture import capture

    enc_dec = bool(getattr(model.hf.config, "is_encoder_decoder", False))
    key = "decoder_input_ids" if enc_dec else "input_ids"
    kwargs = {"max_new_tokens": steps + 1, "min_new_tokens": steps + 1, "do_sample": False}
    placeholders = _placeholder_tokens(model.hf.config)
    if placeholders:  # a generated image placeholder would make the full-sequence reference ask for another image
        kwargs["suppress_tokens"] = placeholders
    phase = f"decode ({steps} steps)"
    try:
        with torch.no_grad():
            plain = model.hf.generate(**inputs, **kwargs)
            with capture(model) as trace:
                out = model.hf.generate(**inputs, **kwargs)
        run = trace.run()
    except Exception as err:  # noqa: BLE001
        return _error_row(result, f"{phase}: capture during generate", err)
    same = plain.shape == out.shape and torch.equal(plain, out)
    result.add(f"{phase}: tokens identical under capture", PASS if same else FAIL, None,
               f"{out.shape[1] - inputs[key].shape[1] if key in inputs else out.shape[1]} tokens" if same
               else "capture changed the generated tokens")
    sequence = out[:, :-1]  # the last token is never fed back
    try:
        ref, _ = reference.eager_attention(model, full_inputs(model, inputs, sequence))
    except Exception as err:  # noqa: BLE001
        return _error_row(result, f"{phase}: eager reference over the full sequence", err)
    reports = compare.compare(run, ref, model.streams, step_ref=True)
    if len(trace.runs) != 1:
        for rep in reports.values():
            rep.problems.insert(0, f"one generate made {len(trace.runs)} runs")
    if run.steps != steps:
        for rep in reports.values():
            rep.problems.insert(0, f"{run.steps} decode steps recorded, generate ran {steps}")
    for issue in compare.coverage(run, model.streams, sequence.shape[1]):
        reports[issue.split(" ", 1)[0]].problems.append(issue)
    _stream_rows(result, phase, reports, f", steps 0..{run.steps}")
    _map_row(result, phase, compare.token_maps(trace.runs))


def _identity_edits(model) -> list[tuple[str, list]]:
    from ..steer import PAI, HeadScale
    from ..steer.edits import SteerError, lm_stream

    edits = [("HeadScale(1.0), every head", [HeadScale(1.0, stream="*")])]
    try:
        stream = lm_stream(model)
    except SteerError:
        return edits
    keys = "image" if model.spec.kind == "vlm" else [0]
    return edits + [(f"PAI(alpha=0, keys={keys!r})", [PAI(alpha=0.0, layers=slice(None), keys=keys, stream=stream)])]


def identity_phase(model, inputs: dict, plain: list, result: CheckResult) -> None:
    from ..steer import steer

    for label, edits in _identity_edits(model):
        check = f"steer {label} = identity"
        try:
            with torch.no_grad(), steer(model, *edits):
                inside = _tensors(model.hf(**inputs))
        except Exception as err:  # noqa: BLE001
            _error_row(result, check, err)
            continue
        same, diff = _diff(plain, inside)
        result.add(check, PASS if same else FAIL, None if same else diff,
                   "outputs bit for bit" if same else "a strength-0 edit changed the outputs")

