"""Architecture specs: one small declarative entry per model family.

A spec says which module-path prefixes form which stream and how the token-role map is built
(`kind`: text, vision, dual text+vision, or a LLaVA-style vlm). Families not listed get a spec inferred
from their config (vision if it has `patch_size` and no vocabulary, text otherwise)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    family: str
    kind: str  # "text" | "vision" | "dual" | "vlm" | "encdec"
    streams: dict[str, str] = field(default_factory=dict)
    vision_order: str = "raster"  # "raster" or "merge" (Qwen2-VL: 2x2 merge windows are contiguous)
    cross: tuple[str, ...] = ()  # module names of cross-attention (encoder-decoders): their own stream "cross"


CROSS_NAMES = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn", "cross_attention")


FAMILIES = {
    "llava": Spec("llava", "vlm", {"model.vision_tower": "vision", "model.language_model": "language"}),
    "paligemma": Spec("paligemma", "vlm", {"model.vision_tower": "vision", "model.language_model": "language"}),
    "qwen2_vl": Spec("qwen2_vl", "vlm", {"model.visual": "vision", "model.language_model": "language"}, "merge"),
    "clip": Spec("clip", "dual", {"text_model": "text", "vision_model": "vision"}),
    "siglip": Spec("siglip", "dual", {"text_model": "text", "vision_model": "vision"}),
}


class UnmappedModelError(ValueError):
    """A model family attnscope cannot label correctly yet: refused by name rather than mislabelled."""


def spec_for(config, model=None) -> Spec:
    """The spec of a transformers config. Families whose structure an inferred spec would mislabel are refused:
    encoder-decoders (encoder, decoder and cross-attention would be numbered as one stream) and vision-language
    or dual-tower families not listed in FAMILIES (the tower's and the language model's layers would be one
    `text` stream and image tokens labelled `text`)."""
    family = getattr(config, "model_type", "") or ""
    if family in FAMILIES:
        return FAMILIES[family]
    if getattr(config, "is_encoder_decoder", False) and (model is None or _has_decoder(model)):
        if model is None or getattr(config, "vision_config", None) is not None:
            raise UnmappedModelError(
                f"{family or type(config).__name__} is an encoder-decoder attnscope cannot map without the model "
                "itself (or with an image tower); pass `spec=` and `attention_modules=` to attnscope.wrap")
        return encoder_decoder_spec(family, model)
    towers = [k for k in ("vision_config", "audio_config") if getattr(config, k, None) is not None]
    if towers:
        raise UnmappedModelError(
            f"{family or type(config).__name__} has a {towers[0].removesuffix('_config')} tower but no attnscope spec "
            f"(mapped families: {', '.join(sorted(FAMILIES))}); its towers' layers and image tokens would be "
            "mislabelled as one text stream. Pass `spec=attnscope.models.spec.Spec(...)` to attnscope.wrap, or "
            "add the family to models/spec.py:FAMILIES")
    is_vision = hasattr(config, "patch_size") and not getattr(config, "vocab_size", None)
    return Spec(family, "vision", {"": "vision"}) if is_vision else Spec(family, "text", {"": "text"})


def encoder_decoder_spec(family: str, model) -> Spec:
    """Streams of an encoder-decoder from its structure: the encoder's self-attention ("encoder"), the decoder's
    self-attention ("decoder") and the decoder's attention to the encoder ("cross": queries are decoder positions,
    keys encoder positions)."""
    paths = {id(m): n for n, m in model.named_modules()}
    enc, dec = paths.get(id(model.get_encoder())), paths.get(id(model.get_decoder()))
    if enc is None or dec is None:
        raise UnmappedModelError(f"cannot find the encoder and decoder modules of {type(model).__name__}; pass `spec=`")
    return Spec(family, "encdec", {enc: "encoder", dec: "decoder"}, cross=CROSS_NAMES)


def _has_decoder(model) -> bool:
    get = getattr(model, "get_decoder", None)
    try:
        return get is not None and get() is not None and get() is not model
    except (AttributeError, NotImplementedError):
        return hasattr(model, "decoder")
