"""PAI: "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs"
(Liu, Zheng, Chen, ECCV 2024).

What it changes, where: in the language model's self-attention, the logits from the query row that predicts the
next token (every decoding step, and the last prompt row at prefill) to the image tokens are raised to
a + alpha*|a| (`ScaleKeys`), in layers 2..L-1, all heads. As an additive mask this keeps SDPA.

Defaults and why: alpha=0.5 and layers from 2 to the last are the setting of the paper's LLaVA-1.5 experiments as
we read them (the first two layers are left alone: they have not yet formed image-text attention; the abstract
gives no numbers, so check against the paper before quoting results). PAI also adds an image-free
classifier-free-guidance branch (gamma=1.1); that part is M3ID-like and available as `M3ID`, so it is not folded in
here. `keys` may be any key spec (a role, positions, a slice): on a text model PAI amplifies a context span."""
from __future__ import annotations

from ..edits import ScaleKeys, lm_stream
from ...capture.selection import listed
from ._base import Method, default_layers


class PAI(Method):
    """PAI: raise the next-token row's attention logits to the image tokens (Liu et al., "Paying More Attention to
    Image", ECCV 2024).

    In language layers `layers` (default 2..L-1), all heads (or `heads`), the logits a of the `queries` rows to
    the `keys` become a + alpha * |a| (`ScaleKeys`, an additive mask: SDPA keeps running).

    Parameters:
        alpha: float >= 0, default 0.5. Amplification (0 is the identity).
        layers: int, list, slice or None. Language-model layers (negative count from the top); None: 2..L-1.
        heads: int, list or None (all heads).
        keys: a role ("image", default), positions or a slice: the keys whose logits are raised.
        queries: "last" (default: the row that predicts the next token, at prefill and every step) or a role.
        stream: the language stream (default: the model's).

    Raises `SteerError` for a negative alpha, layers out of range, or a model without the keys' role. PAI's
    image-free guidance branch is `M3ID`, not folded in here."""

    name = "pai"
    paper = "Paying More Attention to Image (Liu et al., ECCV 2024)"

    def __init__(self, alpha: float = 0.5, layers=None, heads=None, keys="image", queries="last", stream=None):
        # a generator (or set, tuple) of layers or heads made a list once: `edits` reads them at every steer block
        self.alpha, self.layers, self.heads, self.keys, self.queries, self.stream = \
            alpha, listed(layers), listed(heads), keys, queries, stream
        ScaleKeys(alpha)  # validates alpha now, before any model is involved

    def edits(self, model):
        stream = self.stream or lm_stream(model)
        layers = default_layers(model, stream, self.layers, start=2)
        return self._tag([ScaleKeys(self.alpha, stream=stream, layers=layers, heads=self.heads, queries=self.queries,
                                    keys=self.keys)])
