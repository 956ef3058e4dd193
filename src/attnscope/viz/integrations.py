"""What the viewer offers beyond raw attention, found at run time: `attnscope.explain` methods and
`attnscope.steer` methods where those packages are installed, and head tables from `attnscope.heads`.

Nothing here is required: without them the viewer shows raw attention (any layer, head or the head mean,
for any stored query: CLS, patches, the last or a generated token). Each lookup is tolerant of how those
packages name their registries, and a failure is reported as a message, never as a crash."""
from __future__ import annotations

import importlib
import inspect
from contextlib import nullcontext

RAW = "raw"


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # not landed, or broken while being built: the viewer shows what exists
        return None


def _registry(module, names=("METHODS", "REGISTRY", "methods")) -> dict:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return {v: v for v in value}
    return {}


def explain_methods() -> list[str]:
    """Names accepted by `attnscope.explain(..., method=...)`, "raw" first."""
    module = _module("attnscope.explain")
    if module is None or not callable(getattr(module, "explain", module)):
        return [RAW]
    names = list(_registry(module))
    return [RAW] + [n for n in names if n != RAW]


def explain_available() -> bool:
    return len(explain_methods()) > 1


def token_target(position: int):
    """The explain target "log-probability of the token at `position`" (a generated word), or None."""
    module = _module("attnscope.explain")
    cls = getattr(module, "TokenLogProb", None) if module is not None else None
    return cls([position]) if cls is not None else None


def run_explain(model, inputs: dict, method: str, target=None, stream: str | None = None):
    """`attnscope.explain(model, inputs, method=..., target=...)`; returns the Explanation."""
    module = _module("attnscope.explain")
    fn = getattr(module, "explain", None) if module is not None else None
    if fn is None:
        import attnscope

        fn = getattr(attnscope, "explain", None)
    if fn is None or not callable(fn):
        raise RuntimeError("attnscope.explain is not installed in this version; only raw attention is available")
    kwargs = {"method": method, "target": target}
    if stream is not None and "stream" in inspect.signature(fn).parameters:
        kwargs["stream"] = stream
    return fn(model, inputs, **kwargs)


def explanation_scores(expl) -> tuple[object, object]:
    """(scores over positions, token map or None) of an Explanation, whatever it calls them."""
    for name in ("scores", "relevance", "values", "map"):
        scores = getattr(expl, name, None)
        if scores is not None and not callable(scores):
            break
    else:
        raise TypeError(f"{type(expl).__name__} has no scores/relevance attribute the viewer can draw")
    tokens = getattr(expl, "tokens", None) or getattr(expl, "token_map", None)
    return scores, tokens


def faithfulness(expl):
    """The explanation's faithfulness score(s), or None (with no error) where it offers none or fails."""
    fn = getattr(expl, "faithfulness", None)
    if fn is None:
        return None
    try:
        value = fn() if callable(fn) else fn
    except Exception as err:  # measured on demand; a failure must not hide the map
        return {"error": str(err)[:200]}
    if hasattr(value, "summary") and callable(value.summary):
        value = value.summary()
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return float(value.item())
    if isinstance(value, dict):
        return {str(k): (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else str(v)) for k, v in value.items()}
    if isinstance(value, (int, float)):
        return float(value)
    return {k: v for k, v in vars(value).items() if isinstance(v, (int, float, str))} if hasattr(value, "__dict__") else str(value)


# --- steering -----------------------------------------------------------------------------------------
def steer_methods() -> dict[str, dict]:
    """Steering methods of `attnscope.steer` as {name: {"doc": the class docstring's summary paragraph, "params":
    {name: default}}}."""
    module = _module("attnscope.steer")
    if module is None or not callable(getattr(module, "steer", None) or _top("steer")):
        return {}
    found = _registry(module)
    if not found:
        methods = _module("attnscope.steer.methods") or module
        for name, obj in vars(methods).items():
            if inspect.isclass(obj) and not name.startswith("_") and obj.__module__.startswith("attnscope.steer"):
                found[name] = obj
    out = {}
    for name, cls in found.items():
        if isinstance(cls, str):
            cls = getattr(module, cls, None) or getattr(_module("attnscope.steer.methods"), cls, None)
        if cls is None or not inspect.isclass(cls):
            continue
        if getattr(cls, "generate_kwargs", None):  # FastVRerank decodes without a KV cache; the viewer's capture needs one
            continue
        params = {}
        try:
            for p in inspect.signature(cls).parameters.values():
                if p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float, bool, str)):
                    params[p.name] = p.default
        except (TypeError, ValueError):
            pass
        doc = " ".join((inspect.getdoc(cls) or "").strip().split("\n\n")[0].split())  # the summary paragraph
        out[name] = {"doc": doc, "params": params, "apply": _applier(cls)}
    return out


def _applier(cls):
    def apply(model, **params):
        steer = getattr(_module("attnscope.steer"), "steer", None) or _top("steer")
        return steer(model, cls(**params))

    return apply


def _top(name: str):
    import attnscope

    return getattr(attnscope, name, None)


def steering(model, method: str | None, params: dict | None = None):
    """A context manager applying steering `method(**params)`, or a no-op one for None."""
    if not method:
        return nullcontext()
    methods = steer_methods()
    if method not in methods:
        raise ValueError(f"unknown steering method {method!r}; available: {sorted(methods) or 'none (attnscope.steer not installed)'}")
    allowed = methods[method]["params"]
    bad = sorted(set(params or {}) - set(allowed))
    if bad:
        raise ValueError(f"{method} has no parameter(s) {bad}; parameters: {sorted(allowed)}")
    try:
        typed = {k: _typed(allowed[k], v) for k, v in (params or {}).items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad parameter for {method}: {err}") from err
    return methods[method]["apply"](model, **typed)


def _typed(default, value):
    if isinstance(default, bool):
        if str(value).lower() in ("1", "true", "on", "yes"):
            return True
        if str(value).lower() in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    return type(default)(value)


# --- head tables ----------------------------------------------------------------------------------------
def table_grids(table) -> dict[str, list[list[float | None]]]:
    """{metric: [layers][heads]} with None where a value is missing; see `_table_grids`."""
    return {k: [[None if v is None or v != v else float(v) for v in row] for row in grid]
            for k, grid in _table_grids(table).items()}


def _table_grids(table) -> dict[str, list[list[float]]]:
    """A head table (attnscope.heads.table's result, a dict of 2-D arrays, or a pandas frame with layer/head
    columns) as {metric: [layers][heads]}."""
    import numpy as np

    if hasattr(table, "to_grids"):
        table = table.to_grids()
    rows, columns = getattr(table, "rows", None), getattr(table, "columns", None)
    if isinstance(rows, list) and isinstance(columns, dict) and rows and len(rows[0]) == 3:
        # attnscope.heads.HeadTable: rows (stream, layer, head), one list per metric; the first stream is drawn
        stream = rows[0][0]
        layers = sorted({layer for s, layer, _ in rows if s == stream})
        heads = sorted({head for s, _, head in rows if s == stream})
        out = {}
        for name, values in columns.items():
            grid = np.full((len(layers), len(heads)), np.nan)
            for (s, layer, head), v in zip(rows, values):
                if s == stream and isinstance(v, (int, float)):
                    grid[layers.index(layer), heads.index(head)] = float(v)
            out[str(name)] = grid.tolist()
        return out
    if hasattr(table, "columns") and hasattr(table, "to_dict") and {"layer", "head"} <= set(table.columns):
        rows = table.to_dict("records")
        layers = sorted({int(r["layer"]) for r in rows})
        heads = sorted({int(r["head"]) for r in rows})
        out = {}
        for col in table.columns:
            if col in ("layer", "head") or not all(isinstance(r[col], (int, float)) for r in rows):
                continue
            grid = np.full((len(layers), len(heads)), np.nan)
            for r in rows:
                grid[layers.index(int(r["layer"])), heads.index(int(r["head"]))] = float(r[col])
            out[str(col)] = grid.tolist()
        return out
    metrics = getattr(table, "metrics", None)
    if isinstance(metrics, dict):
        table = metrics
    if isinstance(table, dict):
        out = {}
        for k, v in table.items():
            arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=float)
            if arr.ndim == 2:
                out[str(k)] = arr.tolist()
        if out:
            return out
    arr = np.asarray(table.detach().cpu().numpy() if hasattr(table, "detach") else table, dtype=float)
    if arr.ndim == 2:
        return {"value": arr.tolist()}
    raise TypeError(f"cannot read a layers x heads table from {type(table).__name__}")
