"""`attnscope.steer`: change what attention does, inside a `with` block that always restores the model.

    with attnscope.steer(model, PAI(alpha=0.5), FastV(k=2, keep=0.5)):
        model.generate(**inputs)

Primitives in `edits` (logit bias / key scaling / masking, probability redistribution, head scaling, token
dropping, contrastive decoding); paper methods in `methods`, one file each."""
from __future__ import annotations

from .edits import (
    Branch,
    Contrast,
    DropTokens,
    HeadScale,
    LogitBias,
    MaskKeys,
    NoisedImage,
    Observe,
    Redistribute,
    SameInputs,
    ScaleKeys,
    SteerError,
    TransformedImage,
    WithoutTokens,
)
from .methods import (
    METHODS,
    PAI,
    RITUAL,
    VAR,
    VCD,
    VHR,
    VTCCLS,
    DeCoRe,
    FastV,
    FastVRerank,
    HeadMask,
    ImbalanceFix,
    KeepSchedule,
    M3ID,
    PyramidDrop,
    generate_kwargs,
    parse,
)
from .processor import ContrastiveProcessor
from .session import SeqState, remove_positions, steer

__all__ = ["steer", "parse", "generate_kwargs", "METHODS", "SteerError", "ContrastiveProcessor", "SeqState", "remove_positions",
           "LogitBias", "ScaleKeys", "MaskKeys", "Redistribute", "HeadScale", "DropTokens", "Contrast", "Observe",
           "Branch", "NoisedImage", "TransformedImage", "WithoutTokens", "SameInputs",
           "PAI", "VAR", "VHR", "ImbalanceFix", "HeadMask", "DeCoRe", "VCD", "M3ID", "RITUAL", "FastV", "FastVRerank", "PyramidDrop",
           "VTCCLS", "KeepSchedule"]

# `attnscope/__init__.py` exports the context manager as `attnscope.steer`, which shadows this package's name on
# `attnscope`; the class carries the package's public names so `attnscope.steer.PAI(...)` works either way.
for _name in __all__:
    if _name != "steer":
        setattr(steer, _name, globals()[_name])
del _name
