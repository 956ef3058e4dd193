"""Attention-guided crop and re-ask: ground the question, crop the grounded region with a margin, and answer again.

Paper: "MLLMs Know Where to Look" (Zhang et al., ICLR 2025), ViCrop: the crop is resized to the vision tower's input
and its image tokens are given to the model together with the original image's, so the model sees the small detail
at a higher resolution without losing the context.

Modes: `"both"` (the paper's form: the original image then the crop, two image placeholders in one prompt; scene-vlm
was trained with one image per prompt, so this is outside its training; bench/results/grounding.md compares it),
`"crop"` (the crop alone in place of the image), `"none"` (the plain answer, for comparison). The crop is resized to
the tower's input by the model's own image processor.

Crop rule (`crop_box`): the box grows by `margin` times its side on each side, becomes a square (the tower's input is
square, so the object is not distorted) at least `min_side` pixels wide, and is shifted to lie inside the image
(clipped only when larger than the image). Boxes are (x0, y0, x1, y1), exclusive ends, in the photo's pixels.

Cost in model passes: the grounding method's (`Grounding.cost`) plus the answer's generate (one prefill and a
decode step per further token); the two-image prompt's prefill is longer (two images' tokens)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common import GroundingError, check_model

MODES = ("both", "crop", "none")


def crop_box(box, size: tuple[int, int], margin: float = 0.5, min_side: int | None = None) -> tuple[int, int, int, int]:
    """The square crop around `box` inside an image of `size` = (width, height)."""
    width, height = int(size[0]), int(size[1])
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise GroundingError(f"a crop box is four numbers (x0, y0, x1, y1); got {box!r}") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise GroundingError(f"crop box {tuple(box)} is not inside the {width}x{height} image; a box is (x0, y0, x1, y1) "
                             f"pixels with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    if margin < 0:
        raise GroundingError(f"margin must be >= 0; got {margin}")
    min_side = min(width, height) // 4 if min_side is None else int(min_side)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = min(max(side, min_side), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0), width - side)
    top = min(max(cy - side / 2, 0), height - side)
    return int(round(left)), int(round(top)), int(round(left + side)), int(round(top + side))


@dataclass
class Reask:
    answer: str
    mode: str
    crop: tuple[int, int, int, int] | None  # in the photo's pixels
    grounding: object = None
    cost: dict = field(default_factory=dict)  # model passes: grounding forwards/backwards, answer forwards, prompt tokens


def _answer(model, texts_images, question: str, max_new_tokens: int) -> tuple[str, int, int]:
    inputs = model.encode(text=question, image=texts_images)
    prompt = int(inputs["input_ids"].shape[1])
    with torch.no_grad():
        ids = model.hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = ids[0, prompt:]
    return model.tokenizer.decode(new, skip_special_tokens=True).strip(), prompt, int(new.numel())


def center_cropped(model, photo) -> bool:
    """Whether the model's image processor cuts part of `photo` away (center crop of another size): then the model
    input is not the whole photo resized, and a box on the input does not map back to the photo by scaling."""
    proc = model.image_processor or getattr(model.processor, "image_processor", None)
    if not getattr(proc, "do_center_crop", False):
        return False
    crop = getattr(proc, "crop_size", None)
    size = (getattr(crop, "width", None), getattr(crop, "height", None)) if crop is not None else None
    return size is None or tuple(photo.size) != size


def _check_whole_image(model, photo) -> None:
    """The grounded box maps back to the photo by scaling only if the processor resized the whole photo (no crop)."""
    if center_cropped(model, photo):
        raise GroundingError(f"{model.name}'s image processor center-crops, so a box on its input does not map back to "
                                 "the photo by scaling; resize the photo to the model input first, or pass box= in the "
                                 "photo's pixels")


def reask(model, image, question: str, mode: str = "both", method: str | None = None, target: str | None = None,
          margin: float = 0.5, min_side: int | None = None, box=None, max_new_tokens: int = 3, **params) -> Reask:
    """Answer `question` about `image` after cropping the grounded region (or `box`, given in the photo's pixels)."""
    from ..capture.session import as_model
    from ..models.images import load_image
    from ..models.zoo import load
    from . import DEFAULT_METHOD, ground

    if mode not in MODES:
        raise GroundingError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    model = as_model(load(model) if isinstance(model, str) else model)
    check_model(model)
    photo = load_image(image)
    if box is not None:
        crop_box(box, photo.size, margin, min_side)  # validate before the model runs
    cost = {"grounding_forwards": 0, "grounding_backwards": 0}
    found, region, views = None, None, [photo]
    if mode != "none":
        if box is None:
            _check_whole_image(model, photo)
            found = ground(model, photo, question, method or DEFAULT_METHOD, target, **params)
            box = found.scale(photo.size)[0]
            cost["grounding_forwards"], cost["grounding_backwards"] = found.cost["forwards"], found.cost["backwards"]
        region = crop_box(box, photo.size, margin, min_side)
        piece = photo.crop(region)
        views = [photo, piece] if mode == "both" else [piece]
    text, prompt, steps = _answer(model, views, question, max_new_tokens)
    cost |= {"answer_forwards": max(steps, 1), "prompt_tokens": prompt}
    return Reask(text, mode, region, found, cost)
