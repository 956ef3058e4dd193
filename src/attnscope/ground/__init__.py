"""`attnscope.ground`: from a question (or one of its words) to a region of the image, read from a vision-language
model's attention: a map over the image tokens, a box and point prompts (`Grounding`).

>>> m = attnscope.load("scene-vlm")
>>> g = attnscope.ground(m, image=scene.image, question="Is there a bag in the image?", target="bag")
>>> g.map.sum(), g.box, g.points          # 1.0, (x0, y0, x1, y1), [(x, y), ...] in model-input pixels
>>> attnscope.ground.reask(m, scene.image, "Is there a bag in the image?", target="bag")   # crop and ask again

Methods (`METHODS`, one file each): `relative` (question / generic-prompt attention, "MLLMs Know Where to Look"),
`gradattn` (attention times its positive gradient, same paper), `flow` (head-aggregated regularised attention flow,
VL-SAM), `tag` (attention of the target word's tokens, TAG). `target="word"` chooses the query rows for every
method (default: the last prompt position, the one that predicts the answer). Metrics: `attnscope.evaluate.grounding`."""
from __future__ import annotations

import inspect

from .._package import make_callable
from . import flow, gradient, relative, tag
from .common import GENERIC_PROMPT, GroundingError, check_model, image_positions, query_positions
from .crop import Reask, center_cropped, crop_box, reask
from .grounding import Grounding

METHODS = {mod.NAME: mod for mod in (relative, gradient, flow, tag)}
DEFAULT_METHOD = "tag"


def ground(model, image, question: str, method: str = DEFAULT_METHOD, target: str | None = None, *,
           box_fraction: float = 0.5, points: int = 3, separation: int = 2, **params) -> Grounding:
    """Ground `question` about `image` (a photo name, path, PIL image or array) in `model` (a loaded VLM or a zoo
    name). `target`: a word of the question whose tokens are the query rows (TAG); default the answer position.
    `params` go to the method (see its `DEFAULTS`). Errors (GroundingError) are raised before the model runs."""
    from ..capture.session import as_model
    from ..models.images import load_image
    from ..models.zoo import load

    if method not in METHODS:
        raise GroundingError(f"unknown grounding method {method!r}; methods: {', '.join(METHODS)}")
    mod = METHODS[method]
    accepted = [n for n in inspect.signature(mod.run).parameters if n not in ("model", "inputs", "photo", "question", "queries")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise GroundingError(f"method {method!r} takes no parameter(s) {unknown}; it takes {accepted}")
    if not isinstance(question, str) or not question.strip():
        raise GroundingError("question is empty; pass the question to ground, e.g. 'Is there a bag in the image?'")
    model = as_model(load(model) if isinstance(model, str) else model)
    check_model(model)
    if image is None:
        raise GroundingError("grounding needs an image: pass image=... (a photo name, a path or a PIL image)")
    photo = load_image(image)
    inputs = model.encode(text=question, image=photo)
    queries = query_positions(model, inputs, question, target)
    _, shape = image_positions(model, inputs)
    grid, extras = mod.run(model, inputs, photo, question, queries, **params)
    grid = grid.reshape(shape)
    pixel_size = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    cost = {"forwards": mod.FORWARDS, "backwards": getattr(mod, "BACKWARDS", 0)}
    values = {**mod.DEFAULTS, **params}
    if center_cropped(model, photo):  # the map covers the processor's crop, not the photo: never drawn over the photo
        extras, photo = {**extras, "center_cropped": True}, None
    return Grounding(grid.detach().cpu().numpy(), pixel_size, method, values, question, target, queries, cost,
                     model.name, extras, box_fraction, points, separation, photo)


make_callable(__name__, ground)

__all__ = ["ground", "Grounding", "GroundingError", "METHODS", "DEFAULT_METHOD", "GENERIC_PROMPT", "reask", "Reask",
           "crop_box"]
