"""`attnscope.check(model, inputs=None)`: prove on a probe that attnscope's numbers and labels are the model's own.

For every stream and layer, captured rows are compared with the model's own eager attention in one forward and,
for generative models, over a greedy generate (prefill and `steps` decode steps against one eager forward over the
full sequence, at the true absolute positions); every token map's length is checked against the keys it labels;
strength-0 edits must leave the outputs bit for bit; and the model must come back exactly as it was (attention
implementation of every config, no hooks, no registered names, same outputs). Anything attnscope refuses by name
becomes a REFUSED row; nothing here raises past a row."""
from __future__ import annotations

import linecache
from pathlib import Path

import torch

from ..core import dispatch, seam
from ..core.tokens import CACHED_STREAMS
from . import probe, reference
from .result import FAIL, PASS, REFUSED, CheckResult

_PACKAGE = Path(__file__).resolve().parents[1]


def refused(err: BaseException) -> bool:
    """An error attnscope raised on purpose (an explicit `raise` in its own code, whose message names the fix), as
    opposed to a crash inside the model or a bug."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    path = Path(last.tb_frame.f_code.co_filename).resolve()
    if _PACKAGE not in path.parents or Path(__file__).parent in path.parents:
        return False
    return linecache.getline(str(path), last.tb_lineno).strip().startswith("raise")


def _error_row(result: CheckResult, check: str, err: BaseException) -> None:
    message = f"{type(err).__name__}: {err}"
    if refused(err):
        result.add(check, REFUSED, None, message)
    else:
        result.add(check, FAIL, None, f"crashed: {message}")


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (logits, hidden states, embeddings), in order."""
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else [out]
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):  # (a tensor has a `values` method too: sparse tensors' values)
            if v.is_floating_point():
                found.append(v.detach())
        elif isinstance(v, (tuple, list)) or hasattr(v, "values") and not seam.is_cache(v):
            found.extend(_tensors(v))
    return found


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return False, float("inf")
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    return same, max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _forward(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model.hf(**inputs))


def _state(model) -> dict:
    hf = model.hf
    return {"impl": [(id(c), i) for c, i in reference.implementations(hf)], "hooks": _hooks(hf),
            "names": dispatch.registered_names(), "attached": len(dispatch.attachments(hf))}


def _hooks(hf) -> int:
    """Forward hooks and pre-hooks on the model's modules, except transformers' own (`output_attentions=True` installs
    output-capturing hooks once and keeps them)."""
    hooks = [h for m in hf.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum(not getattr(h, "__module__", "").startswith("transformers") for h in hooks)


def generative(model) -> bool:
    hf = model.hf
    try:
        return bool(hf.can_generate()) and (getattr(hf.config, "is_encoder_decoder", False) or
                                           any(s in model.streams for s in CACHED_STREAMS))
    except Exception:  # noqa: BLE001  (can_generate differs across releases; no generate then)
        return False


def check(model, inputs: dict | None = None, steps: int = 3, atol: float | None = None) -> CheckResult:
    """Run every check on `model` (an `attnscope.Model` or a transformers model) and return the verdict table.

    `inputs`: the probe (forward arguments); None builds one from the model's tokenizer / processor / config.
    `steps`: decode steps compared after the prefill for generative models. `atol`: the largest |captured - eager|
    that passes (default 1e-4 for float32 weights, 2e-2 for half precision)."""
    from ..capture.session import as_model

    model = as_model(model)
    if inputs is None:
        inputs, about = probe.build(model)
    else:
        inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        about = "given inputs: " + ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    dtype = next(model.hf.parameters()).dtype
    atol = atol if atol is not None else (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2)
    result = CheckResult(model.name, atol=atol, transformers=seam.TRANSFORMERS_VERSION, probe=about)
    before = _state(model)
    try:
        plain = _forward(model, inputs)
    except Exception as err:  # noqa: BLE001
        _error_row(result, "probe runs without attnscope", err)
        return result
    from .phases import decode_phase, forward_phase, identity_phase

    forward_phase(model, inputs, plain, result)
    if generative(model) and steps > 0:
        decode_phase(model, inputs, steps, result)
    identity_phase(model, inputs, plain, result)
    _restore_row(model, inputs, plain, before, result)
    return result


def _restore_row(model, inputs, plain, before, result: CheckResult) -> None:
    after = _state(model)
    problems = []
    if after["impl"] != before["impl"]:
        changed = [f"{i}->{j}" for (_, i), (_, j) in zip(before["impl"], after["impl"]) if i != j]
        problems.append(f"attention implementation not restored ({', '.join(changed[:3]) or 'configs differ'})")
    if after["hooks"] != before["hooks"]:
        problems.append(f"{after['hooks'] - before['hooks']} hooks left on the model")
    if after["names"] != before["names"]:
        problems.append(f"registered names left: {after['names']}")
    if after["attached"]:
        problems.append(f"{after['attached']} attnscope attachments still open")
    try:
        same, diff = _diff(plain, _forward(model, inputs))
    except Exception as err:  # noqa: BLE001
        same, diff = False, float("inf")
        problems.append(f"the model no longer runs: {type(err).__name__}: {err}")
    if not same:
        problems.append("outputs after the checks differ from outputs before")
    detail = "; ".join(problems) or f"configs, hooks and outputs as before; registered names {after['names']}"
    result.add("model restored exactly", FAIL if problems else PASS, None if same else diff, detail)
