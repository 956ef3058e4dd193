"""Attention knockout: "Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al., CVPR 2025),
after "Dissecting Recall of Factual Associations in Auto-Regressive Language Models" (Geva et al., EMNLP 2023).

What it changes, where: in the chosen language layers, the query rows of the `target` token set cannot attend to
the keys of the `source` token set (their attention logits are set to the dtype's minimum before the softmax, so
the rest of each row renormalises). In the paper's words, blocking "from image to question" means that question
queries cannot read image keys: `Knockout(source="image", target=<question positions>, layers=...)`. Everything
else runs as before (a `MaskKeys` edit: an additive mask for many rows, explicit rows for a few, SDPA kept).

`attnscope.flow.knockout_curve` slides a window of k layers over the stream and measures the answer's probability
change; this class is one window."""
from __future__ import annotations

from ..edits import MaskKeys, SteerError, _check_spec, _plain, _spec_roles, lm_stream
from ...capture.selection import listed
from ._base import Method, default_layers


def _as_items(spec) -> list:
    if isinstance(spec, (list, tuple, range)):
        return list(spec)
    return [spec]


class Knockout(Method):
    """Block attention from one token set to another in chosen layers (attention knockout; Zhang et al., "Cross-modal
    Information Flow in Multimodal Large Language Models", CVPR 2025; Geva et al., EMNLP 2023).

    The `target` token set's query rows cannot attend to the `source` token set's keys in `layers` of the language
    stream ("from source to target": information stops flowing from the source positions into the target positions
    there). Both sets are token roles ("image", "text", "system", ...), "last" (the row that predicts the next token)
    or int positions; `attnscope.flow.token_sets` gives positions for the question, subject and other words.

    Parameters:
        source: role, "last" or positions (required). Keys that the target may no longer read.
        target: role, "last" or positions (required). Query rows whose attention is cut. Must not overlap `source`
            (a row must keep at least its own key).
        layers: int, list, range or slice of language layers (required, non-empty; negative counts from the top).
        stream: str or None. Default the model's language/text stream.

    Raises `SteerError` for a missing or empty set, an unknown role, overlapping sets, no layers, or a layer beyond
    the stream's layer count (checked before the model is touched). Where a role set holds target positions (source
    "text", target "last"), those positions stay readable: a row always keeps its own key."""

    name = "knockout"
    paper = "Cross-modal Information Flow in Multimodal Large Language Models (Zhang et al., CVPR 2025)"

    def __init__(self, source, target, layers, stream=None):
        layers = listed(layers)  # read at every use (`window`): a generator made a list once
        for name, spec in (("source", source), ("target", target)):
            if spec is None or (isinstance(spec, (list, tuple, range)) and len(spec) == 0):
                raise SteerError(f"Knockout needs a non-empty {name} token set (a role such as 'image', 'last', or "
                                 "positions)")
            if callable(spec) or isinstance(spec, slice):
                raise SteerError(f"Knockout's {name} is a role, 'last' or int positions; got {spec!r}")
            _check_spec(spec, name)
        if layers is None or (isinstance(layers, (list, tuple, range)) and len(layers) == 0):
            raise SteerError("Knockout needs layers (a window of at least one layer), e.g. layers=range(10, 14)")
        shared = {i for i in _as_items(source) if not isinstance(i, bool)} & set(_as_items(target))
        if shared:
            raise SteerError(f"Knockout's source and target share {sorted(shared, key=str)}: a row that cannot read "
                             "its own key has nothing left to attend to; make the sets disjoint")
        self.source, self.target, self.layers, self.stream = source, target, layers, stream

    def window(self, model) -> list[int]:
        """The layers as absolute indices of the stream (SteerError when one is out of range or none is left)."""
        layers = self.layers
        if isinstance(layers, slice):
            n = model.streams.get(self.stream or lm_stream(model), 0)
            layers = list(range(n))[layers]
            if not layers:
                raise SteerError(f"layers={_plain(self.layers)} selects no layer of the {n}-layer stream")
        return default_layers(model, self.stream, layers)

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        keys = self.source
        if not all(isinstance(i, int) for i in _as_items(self.source) + _as_items(self.target)):
            keys = _without(self.source, self.target)  # roles may share positions with the target: keep those keys
        edit = MaskKeys(stream=stream, layers=self.window(model), queries=self.target, keys=keys)
        # keys given as a callable are not checked by the session: name the roles and positions it narrows, so a source
        # that selects nothing (image keys on a text model, positions past the prompt) is refused, not a silent no-op
        edit.roles_needed = edit.roles_needed | _spec_roles(self.source) | _spec_roles(self.target)
        return self._tag([edit])


def _without(source, target):
    """Keys of `source` that are not positions of `target` (so a target row never loses its own key, which would
    leave it nothing to attend to)."""

    def source_keys(ctx):
        return ctx.key_mask(source) & ~ctx.key_mask(target)

    source_keys.__name__ = f"{_plain(source)} minus {_plain(target)}"
    source_keys.selects = source  # the spec the session's input checks read (out-of-range positions, empty roles)
    return source_keys
