"""`attnscope.explain`: explanations over input tokens, one file per method, each returning an `Explanation`.

>>> m = attnscope.load("dinov2-small")
>>> e = attnscope.explain(m, image="chelsea", method="gradattn")      # CLS-embedding target by default
>>> e.image_map().shape, e.faithfulness().summary()

The package is callable: `attnscope.explain(...)` is `attnscope.explain.explain(...)`, and `import attnscope.explain
as ex` gives the package (`ex.METHODS`, `ex.Explanation`, `ex.targets`).

Methods (`METHODS`): raw, rollout, flow, gradattn, lrp (attention-based or attention-aware), and the baselines that
do not read attention: gradinput, ig (Captum), gradcam, random. Attention-based methods take `sinks="discount"`
for sink-aware maps (`sinks.py`). Targets live in `targets.py`; VLM token and answer-span maps in `vlm.py`."""
from __future__ import annotations

import inspect
import time

from .._package import make_callable
from ..models.images import load_image
from . import flow, gradattn, gradcam, gradinput, integrated_gradients, lrp, random_map, raw, rollout
from .engine import MethodError, default_stream
from .explanation import Explanation, ExplanationFileError
from .sinks import SinkReport, detect_sinks
from .targets import (ClassLogit, Custom, EmbeddingSimilarity, NextToken, Target, TargetError, TokenEmbedding,
                      TokenLogProb, as_target)

METHODS = {mod.NAME: mod for mod in (raw, rollout, flow, gradattn, lrp, gradinput, integrated_gradients, gradcam,
                                     random_map)}
ATTENTION_METHODS = ("raw", "rollout", "flow", "gradattn")


def _check_params(mod, params: dict) -> None:
    accepted = [n for n in inspect.signature(mod.run).parameters if n not in ("model", "inputs", "target", "stream")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise MethodError(f"method {mod.NAME!r} takes no parameter(s) {unknown}; it takes {accepted or 'no parameters'}")


def explain(model, inputs: dict | None = None, method: str = "gradattn", target=None, *, image=None, text=None,
            stream: str | None = None, **params) -> Explanation:
    """Explain one input: scores over its tokens for `target` (default: a class logit for classifiers, the
    next-token log-probability for language models and VLMs, the embedding similarity for encoders).

    `model`: a loaded `Model` (or a zoo name). `inputs`: from `model.encode(...)`, or pass `image=` / `text=`.
    `method`: one of `METHODS`; `params` go to the method (see each method's docstring and `DEFAULTS`).
    `stream`: whose tokens are explained (default: vision for vision models, language for VLMs, text for text)."""
    from ..capture.session import as_model
    from ..models.zoo import load

    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if isinstance(model, str):
        model = load(model)
    model = as_model(model)
    photo = None
    if inputs is None:
        if image is None and text is None:
            raise ValueError("nothing to explain: pass inputs=model.encode(...), or image=... / text=...")
        if image is not None:
            photo = load_image(image)
        inputs = model.encode(text=text, image=photo)
    elif image is not None or text is not None:
        raise ValueError("pass either inputs= or image=/text=, not both")
    from .base import check_single

    check_single(inputs)
    stream = stream or default_stream(model, inputs)
    if stream not in model.streams:
        raise MethodError(f"unknown stream {stream!r}; this model has {sorted(model.streams)}")
    if stream not in model.token_maps(inputs):
        raise MethodError(f"the inputs give no tokens to stream {stream!r} (an image stream without pixel_values?)")
    mod = METHODS[method]
    _check_params(mod, params)
    target = as_target(target, model)
    start = time.perf_counter()
    out = mod.run(model, inputs, target, stream, **params)
    out.seconds = time.perf_counter() - start
    out.photo = photo
    if photo is None and out.pixel_size is not None:
        out._pixels = _display_pixels(model, inputs)
    return out


def _display_pixels(model, inputs):
    """The model's pixel input mapped back to [0, 1] RGB for display (normalisation undone)."""
    import numpy as np

    pv = inputs["pixel_values"][0].detach().float().cpu()
    proc = model.image_processor or getattr(model.processor, "image_processor", None)
    mean = np.asarray(getattr(proc, "image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)[:, None, None]
    std = np.asarray(getattr(proc, "image_std", [0.5, 0.5, 0.5]), dtype=np.float32)[:, None, None]
    return np.clip(pv.numpy() * std + mean, 0, 1).transpose(1, 2, 0)


make_callable(__name__, explain)

__all__ = ["explain", "Explanation", "ExplanationFileError", "METHODS", "ATTENTION_METHODS", "MethodError", "TargetError", "Target",
           "ClassLogit", "EmbeddingSimilarity", "NextToken", "TokenLogProb", "TokenEmbedding", "Custom", "detect_sinks", "SinkReport"]
