"""`attnscope.steer`: change what attention does, inside a `with` block that always restores the model.

    with attnscope.steer(model, PAI(alpha=0.5), FastV(k=2, keep=0.5)):
        model.generate(**inputs)

The package is callable: `attnscope.steer(...)` is `attnscope.steer.steer(...)` (the context manager class), and
`import attnscope.steer as st` gives the package with every method (`st.PAI`, `st.FastV`, ...).

Primitives in `edits` (logit bias / key scaling / masking, probability redistribution, head scaling, token
dropping, contrastive decoding); paper methods in `methods`, one file each."""
from __future__ import annotations

from .._package import make_callable
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
    Knockout,
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
           "VTCCLS", "KeepSchedule", "Knockout"]



make_callable(__name__, steer)
