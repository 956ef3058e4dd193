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


def units(method: str) -> str:
    """What a method's numbers are, from its module's `UNITS` (one sentence), or a generic line."""
    module = _module("attnscope.explain")
    mod = getattr(module, "METHODS", {}).get(method) if module is not None else None
    return getattr(mod, "UNITS", None) or "relevance scores in the method's own units (negative scores not drawn)"


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
    """Steering methods of `attnscope.steer` as {name: {"doc": first docstring line, "help": the method's docstrings,
    "params": {name: {"default": text or None, "required": bool}}, "syntax": how values are written}}, every
    parameter read from the method's own signature."""
    module = _module("attnscope.steer")
    if module is None or not callable(getattr(module, "steer", None) or _top("steer")):
        return {}
    methods_mod = _module("attnscope.steer.methods")
    found = _registry(methods_mod) if methods_mod is not None else {}
    found = found or _registry(module)
    out = {}
    for name, cls in found.items():
        if isinstance(cls, str):
            cls = getattr(module, cls, None) or getattr(methods_mod, cls, None)
        if cls is None or not inspect.isclass(cls):
            continue
        if getattr(cls, "generate_kwargs", None):  # FastVRerank decodes without a KV cache; the viewer's capture needs one
            continue
        params = {}
        try:
            for p in inspect.signature(cls).parameters.values():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                required = p.default is inspect.Parameter.empty
                params[p.name] = {"default": None if required or p.default is None else _text(p.default),
                                  "required": required}
        except (TypeError, ValueError):
            pass
        docs = [inspect.getdoc(cls) or "", inspect.getdoc(inspect.getmodule(cls)) or ""]
        help_text = "\n\n".join(d for d in dict.fromkeys(docs) if d)
        doc = " ".join((inspect.getdoc(cls) or "").strip().split("\n\n")[0].split())  # the summary paragraph
        out[name] = {"doc": doc, "help": help_text, "params": params,
                     "syntax": getattr(methods_mod, "SYNTAX", ""), "apply": _applier(cls)}
    return out


def _text(value) -> str:
    if isinstance(value, slice):
        return f"{'' if value.start is None else value.start}:{'' if value.stop is None else value.stop}"
    if isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _applier(cls):
    def apply(model, **params):
        steer = getattr(_module("attnscope.steer"), "steer", None) or _top("steer")
        return steer(model, cls(**params))

    return apply


def _top(name: str):
    import attnscope

    return getattr(attnscope, name, None)


def steering(model, method: str | None, params: dict | None = None):
    """A context manager applying steering `method(**params)`, or a no-op one for None. String values are read
    as on the command line (`attnscope.steer.methods.value`); blank ones keep the default."""
    if not method:
        return nullcontext()
    methods = steer_methods()
    if method not in methods:
        raise ValueError(f"unknown steering method {method!r}; available: {sorted(methods) or 'none (attnscope.steer not installed)'}")
    allowed = methods[method]["params"]
    bad = sorted(set(params or {}) - set(allowed))
    if bad:
        raise ValueError(f"{method} has no parameter(s) {bad}; parameters: {sorted(allowed)}")
    parse = getattr(_module("attnscope.steer.methods"), "value", None)
    typed = {}
    for k, v in (params or {}).items():
        if isinstance(v, str) and not v.strip():
            continue
        typed[k] = parse(k, v) if isinstance(v, str) and parse is not None else v
    missing = sorted(k for k, p in allowed.items() if p["required"] and k not in typed)
    if missing:
        raise ValueError(f"{method} needs {', '.join(missing)}; fill in the field(s)")
    try:
        return methods[method]["apply"](model, **typed)
    except TypeError as err:
        raise ValueError(f"bad parameter for {method}: {err}") from err


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
