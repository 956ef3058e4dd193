"""Architecture specs: one small declarative entry per model family.

A spec says which module-path prefixes form which stream and how the token-role map is built
(`kind`: text, vision, dual text+vision, or a LLaVA-style vlm). Families not listed get a spec inferred
from their config (vision if it has `patch_size` and no vocabulary, text otherwise)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    family: str
    kind: str  # "text" | "vision" | "dual" | "vlm"
    streams: dict[str, str] = field(default_factory=dict)
    vision_order: str = "raster"  # "raster" or "merge" (Qwen2-VL: 2x2 merge windows are contiguous)


FAMILIES = {
    "llava": Spec("llava", "vlm", {"model.vision_tower": "vision", "model.language_model": "language"}),
    "qwen2_vl": Spec("qwen2_vl", "vlm", {"model.visual": "vision", "model.language_model": "language"}, "merge"),
    "clip": Spec("clip", "dual", {"text_model": "text", "vision_model": "vision"}),
    "siglip": Spec("siglip", "dual", {"text_model": "text", "vision_model": "vision"}),
}


def spec_for(config) -> Spec:
    """The spec of a transformers config."""
    family = getattr(config, "model_type", "") or ""
    if family in FAMILIES:
        return FAMILIES[family]
    is_vision = hasattr(config, "patch_size") and not getattr(config, "vocab_size", None)
    return Spec(family, "vision", {"": "vision"}) if is_vision else Spec(family, "text", {"": "text"})
