"""The viewer's grounding request: `attnscope.ground` on a run's image and question, as the JSON the front end draws
(`frontend/src/grounding.ts`: the map over the image, the box and the point prompts)."""
from __future__ import annotations


def methods(model=None) -> list[str]:
    """Grounding methods (empty when `attnscope.ground` is missing or the model is not a vision-language model)."""
    try:
        from ..ground import METHODS
    except Exception:  # not installed in this version: the viewer offers no grounding
        return []
    if model is not None and getattr(getattr(model, "spec", None), "kind", None) != "vlm":
        return []
    return list(METHODS)


def ground_run(model, result, method: str, target: str | None) -> dict:
    """Ground the run's own question and image; ValueError (GroundingError) with the fix when it cannot."""
    from ..ground import ground

    text = getattr(result, "text", None)
    if not result.images or not text:
        raise ValueError("grounding needs a run with an image and a question; run the model with both")
    if getattr(result, "raw_prompt", False):
        raise ValueError("this run used a raw prompt; grounding builds the chat prompt itself: run it without 'raw prompt'")
    g = ground(model, result.images[0], text, method=method, target=(target or None))
    if g.extras.get("center_cropped"):
        raise ValueError(f"{model.name}'s image processor center-crops this image, so the map would be drawn over parts "
                         "of the image the model did not see; upload an image of the model's input size")
    out = g.to_dict()
    return {k: out[k] for k in ("method", "params", "question", "target", "queries", "cost", "pixel_size", "map", "box",
                                "points", "rules")}
