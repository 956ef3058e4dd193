"""Edit primitives: what `attnscope.steer` can change, and where.

Every primitive says where it applies (stream, layers, heads; query rows and key columns by token role or
position) and is checked against a model before anything is touched. The runtime that applies them is
`steer/session.py`; the paper methods in `steer/methods/` are compositions of these.

| primitive        | changes                                                   | where it runs                         |
|------------------|-----------------------------------------------------------|---------------------------------------|
| `LogitBias`      | adds a constant to chosen logits                          | attention function: additive mask     |
| `ScaleKeys`      | a -> a + alpha*|a| on chosen keys (PAI)                   | attention function: additive mask     |
| `MaskKeys`       | removes chosen keys                                       | attention function: additive mask     |
| `Redistribute`   | moves a fraction of the mass of chosen (sink) keys onto   | attention function: explicit rows for |
|                  | other keys in proportion, renormalises                    | the chosen heads only                 |
| `HeadScale`      | multiplies chosen heads' outputs (0 = ablate)             | after attention, before o_proj        |
| `DropTokens`     | drops tokens of a role from hidden states and KV cache    | decoder-layer pre-hooks               |
|                  | after layer K (positions kept)                            |                                       |
| `Contrast`       | combines next-token logits with a second branch           | the top model's output (last position)|

Logit edits become an additive float mask (so SDPA or eager still run the attention) when they touch most
query rows of a call; when they touch only a few rows of a long call (the last prompt row at prefill), those
rows are recomputed explicitly for the edited heads and written over the backend's output, which is far cheaper
than a dense [B, H, Q, K] mask. Probability edits always take the explicit path, for their heads and rows
only. Positions are original sequence positions: after `DropTokens` they still name the same tokens.

Query specs: None (all rows), "last" (the row that predicts the next token, in every forward), a role
("text", "generated", "image", ...), int positions, a slice, a list of these, or a callable
`(ctx) -> bool [B, Q]`. Key specs: the same, with "last" = the last key, and callables `(ctx) -> bool [B, K]`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..capture.selection import Selection, listed
from ..core.tokens import ROLES

LM_STREAMS = ("language", "text")


class SteerError(ValueError):
    """An edit that cannot apply to this model or these inputs; raised before the model is touched."""


def lm_stream(model) -> str:
    """The stream that generates tokens: "language" in a VLM, "text" in a text model."""
    for name in LM_STREAMS:
        if name in model.streams:
            return name
    raise SteerError(f"{model.name} has no language stream (streams: {sorted(model.streams)}); this edit acts on a "
                     "language model's attention or logits")


def _spec_roles(spec) -> set[str]:
    items = [spec] if isinstance(spec, str) else spec if isinstance(spec, (list, tuple)) else []
    return {i for i in items if isinstance(i, str) and i != "last"}


def _check_spec(spec, what: str) -> None:
    if isinstance(spec, bool):  # an int in Python: True would select position 1
        raise SteerError(f"{what} must be None, a role, 'last', ints, a slice or a callable; got {spec!r}")
    if spec is None or callable(spec) or isinstance(spec, (int, slice)):
        return
    items = [spec] if isinstance(spec, str) else spec if isinstance(spec, (list, tuple, range)) else None
    if items is None:
        raise SteerError(f"{what} must be None, a role, 'last', ints, a slice or a callable; got {spec!r}")
    for item in items:
        if isinstance(item, str) and item != "last" and item not in ROLES:
            raise SteerError(f"unknown role {item!r} in {what}; roles are {ROLES} (or 'last')")
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise SteerError(f"{what} entries must be role names or int positions; got {item!r}")


def _fraction(value, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise SteerError(f"{name} must be in [0, 1]; got {value}")
    return value


def _nonneg(value, name: str, why: str) -> float:
    value = float(value)
    if value < 0 or math.isnan(value):
        raise SteerError(f"{name} must be >= 0 ({why}); got {value}")
    return value


class Edit:
    """Base of the primitives. `branch` says in which forwards it applies: "all", "main" (not in contrastive
    branches), or the name of one branch (e.g. DeCoRe's masked heads apply only in its branch)."""

    branch: str = "all"
    roles_needed: set[str] = set()

    @property
    def identity(self) -> bool:
        """True when the edit changes nothing (strength 0); such edits are not attached at all."""
        return False

    def check(self, model) -> None:
        pass

    def applies(self, branch: str | None) -> bool:
        if branch is not None and branch.startswith("_"):  # observation passes: only their own edits
            return self.branch == branch
        if self.branch == "all":
            return True
        if self.branch == "main":
            return branch is None
        return branch == self.branch

    def describe(self) -> dict:
        return {"edit": type(self).__name__}


class SiteEdit(Edit):
    """An edit on attention sites chosen by stream, layers and heads (validated like a capture selection)."""

    def __init__(self, stream=None, layers=None, heads=None):
        # a generator (or range, tuple, set) made a list once: each `selection` reads it again
        self.stream, self.layers, self.heads = stream, listed(layers), listed(heads)

    def selection(self, model) -> Selection:
        """The sites: `stream` None means the language stream, "*" every stream (layers may then be a dict)."""
        stream = None if self.stream == "*" else self.stream or lm_stream(model)
        return Selection(stream, self.layers, self.heads)

    def sites(self, model) -> dict:
        """{module: (site, head indices)} for this edit on `model`; raises SteerError on a bad selection."""
        sel = self.selection(model)
        try:
            chosen = sel.sites(model.sites)
            return {m: (s, torch.tensor(sel.head_indices(s), dtype=torch.long)) for m, s in chosen.items()}
        except (ValueError, IndexError, TypeError) as err:
            raise SteerError(f"{type(self).__name__}: {err}") from err

    def check(self, model) -> None:
        if not self.sites(model):
            raise SteerError(f"{type(self).__name__} selects no attention site (stream={self.stream!r}, layers={self.layers!r})")


class AttentionEdit(SiteEdit):
    """An edit of attention logits ("logit") or probabilities ("prob") for chosen query rows and keys."""

    kind = "logit"
    needs_logits = False

    def __init__(self, stream=None, layers=None, heads=None, queries=None, keys=None):
        super().__init__(stream, layers, heads)
        _check_spec(queries, "queries")
        _check_spec(keys, "keys")
        self.queries, self.keys = queries, keys
        self.roles_needed = _spec_roles(queries) | _spec_roles(keys)

    def bias(self, ctx, logits: torch.Tensor | None) -> torch.Tensor:
        """Additive bias for a block [B, h, r, k] of (heads, query rows, selected keys); `logits` are the raw
        scaled logits of that block when `needs_logits`. The runtime applies it only where selected."""
        raise NotImplementedError

    def apply(self, ctx, probs: torch.Tensor) -> torch.Tensor:
        """New probabilities for [B, h, r, K] (all keys), for "prob" edits."""
        raise NotImplementedError

    def rows_where(self, ctx, probs: torch.Tensor) -> torch.Tensor | None:
        """Optional bool [B, h, r]: where, among the selected rows and heads, the prob edit applies."""
        return None

    def skips(self, state, site) -> bool:
        """True when the edit changes nothing in the coming call at `site` (cheap: asked before any call context
        exists); then `heads_for` would return no head. VAR skips layers where it chose no head at prefill."""
        return False

    def heads_for(self, ctx, heads: torch.Tensor) -> torch.Tensor:
        """The heads this call edits, of the edit's `heads` (all of them unless an edit narrows them per call:
        VAR keeps the image-centric heads it chose at prefill, so the other heads stay on the backend)."""
        return heads

    def describe(self) -> dict:
        return {"edit": type(self).__name__, "stream": self.stream, "layers": _plain(self.layers),
                "heads": _plain(self.heads), "queries": _plain(self.queries), "keys": _plain(self.keys)}


def _plain(v):
    if isinstance(v, slice):
        return f"{v.start}:{v.stop}" + (f":{v.step}" if v.step else "")
    if isinstance(v, range):
        return list(v)
    if callable(v):
        return getattr(v, "__name__", "callable")
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


class LogitBias(AttentionEdit):
    """Add `bias` to the logits of the chosen keys (negative values suppress, positive amplify)."""

    def __init__(self, bias: float, **where):
        super().__init__(**where)
        self.value = float(bias)
        if math.isnan(self.value):
            raise SteerError("bias must be a number")

    @property
    def identity(self) -> bool:
        return self.value == 0.0

    def bias(self, ctx, logits):
        return torch.tensor(self.value)

    def describe(self):
        return super().describe() | {"bias": self.value}


class ScaleKeys(AttentionEdit):
    """a -> a + alpha * |a| on the raw (scaled, pre-mask) logits of the chosen keys: raises every chosen logit
    by a fraction of its magnitude, so attention to those keys grows whatever the logit's sign (PAI's edit)."""

    needs_logits = True

    def __init__(self, alpha: float, **where):
        super().__init__(**where)
        self.alpha = _nonneg(alpha, "alpha", "a + alpha*|a| with alpha < 0 would lower the chosen keys, use MaskKeys "
                             "or LogitBias with a negative bias for that")

    @property
    def identity(self) -> bool:
        return self.alpha == 0.0

    def bias(self, ctx, logits):
        return self.alpha * logits.abs()

    def describe(self):
        return super().describe() | {"alpha": self.alpha}


class MaskKeys(AttentionEdit):
    """Remove the chosen keys from the chosen query rows' attention (their logits set to the dtype's minimum)."""

    def bias(self, ctx, logits):
        return torch.tensor(torch.finfo(torch.float32).min)


class Redistribute(AttentionEdit):
    """Move `fraction` of the probability mass on `source` keys onto `keys` (the target), in proportion to the
    target keys' current probabilities, then renormalise. Rows whose target has no mass are left unchanged, and so
    are rows where the target's share of the non-source mass is below `min_share` (VAR's image-centric heads).
    `where(ctx, probs) -> bool [B, h, r]` limits it further."""

    kind = "prob"

    def __init__(self, fraction: float, source, min_share: float = 0.0, where: Callable | None = None, **kw):
        super().__init__(**kw)
        _check_spec(source, "source")
        self.fraction = _fraction(fraction, "fraction")
        self.min_share = _fraction(min_share, "min_share")
        self.source = source
        self.where = where
        self.roles_needed = self.roles_needed | _spec_roles(source)

    @property
    def identity(self) -> bool:
        return self.fraction == 0.0

    def apply(self, ctx, probs):
        new, src_mass, tgt_mass = self.moved(ctx, probs)
        return self.changed(ctx, self.passes(src_mass, tgt_mass), new, probs)

    def changed(self, ctx, ok, new, probs):
        """`new` where `ok` [B, h, r, 1], else `probs`; notes `ok` for `rows_where`, so rows the edit leaves alone keep
        the backend's output bit for bit (no head passing the test is then the unsteered model exactly)."""
        ctx.rows_changed[id(self)] = ok[..., 0]
        return torch.where(ok, new, probs)

    def moved(self, ctx, probs):
        """(redistributed probabilities [B, h, r, K], source mass and target mass [B, h, r, 1]) of every row."""
        B, h, r, K = probs.shape
        src_m, tgt_m = ctx.key_mask(self.source), ctx.key_mask(self.keys)

        def build():
            masks = torch.stack([src_m, tgt_m & ~src_m], -1).to(probs.device, probs.dtype)  # [B, K, 2]
            return masks, 1 - self.fraction * masks[:, None, None, :, 0], masks[:, None, None, :, 1]

        # the layers of a step that see the same source and target masks share these (built once per step)
        masks, keep, target = ctx.shared(("redistribute", self.fraction, probs.dtype, probs.device), (src_m, tgt_m), build)
        masses = torch.matmul(probs.reshape(B, h * r, K), masks).view(B, h, r, 2)
        src_mass, tgt_mass = masses[..., :1], masses[..., 1:]
        coef = self.fraction * src_mass / tgt_mass.clamp_min(torch.finfo(probs.dtype).tiny)
        # sources lose `fraction` of their mass, targets gain it in proportion to their own probabilities
        new = probs * (keep + coef * target)
        return new / new.sum(-1, keepdim=True), src_mass, tgt_mass

    def passes(self, src_mass, tgt_mass):
        """bool [B, h, r, 1]: rows the edit changes (the target has mass, and at least `min_share` of the rest)."""
        ok = tgt_mass > 0
        if self.min_share > 0:
            ok = ok & (tgt_mass >= self.min_share * (1 - src_mass).clamp_min(1e-9))
        return ok

    def rows_where(self, ctx, probs):
        ok = ctx.rows_changed.pop(id(self), None)
        if self.where is None:
            return ok
        where = self.where(ctx, probs)
        return where if ok is None else ok & where.to(ok.device)

    def describe(self):
        return super().describe() | {"fraction": self.fraction, "source": _plain(self.source), "min_share": self.min_share}


class HeadScale(SiteEdit):
    """Multiply chosen heads' attention outputs by `scale` before the output projection (0 ablates a head).

    `scale` is one number for every selected head, or {(layer, head): s} (then `layers`/`heads` are taken from
    it), or a tensor [heads] / [batch, heads] per layer given as {layer: tensor} (per-row gates, used by head
    analysis to ablate a different head in each batch row)."""

    def __init__(self, scale=0.0, stream=None, layers=None, heads=None):
        self.table: dict[int, torch.Tensor] | None = None
        if isinstance(scale, dict) and scale and all(isinstance(k, tuple) for k in scale):
            per: dict[int, dict[int, float]] = {}
            for (layer, head), s in scale.items():
                per.setdefault(int(layer), {})[int(head)] = _nonneg(s, "head scale", "a negative scale flips a head")
            layers = sorted(per)
            self.pairs = per
            scale = None
        elif isinstance(scale, dict):
            self.table = {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in scale.items()}
            layers = sorted(self.table)
            scale = None
        else:
            scale = _nonneg(scale, "head scale", "a negative scale flips a head's output; use 0 to ablate it")
        self.scale = scale
        super().__init__(stream, layers, heads)

    @property
    def identity(self) -> bool:
        if self.scale is not None:
            return self.scale == 1.0
        if self.table is not None:
            return all(bool((t == 1).all()) for t in self.table.values())
        return all(s == 1.0 for per in self.pairs.values() for s in per.values())

    def sites(self, model):
        chosen = super().sites(model)
        if self.scale is None and self.table is None:
            out = {}
            for m, (site, _) in chosen.items():
                heads = sorted(self.pairs[site.layer])
                bad = [h for h in heads if not 0 <= h < site.num_heads]
                if bad:
                    raise SteerError(f"HeadScale: head {bad[0]} of layer {site.layer} is out of range: there are {site.num_heads}")
                out[m] = (site, torch.tensor(heads, dtype=torch.long))
            return out
        if self.table is not None:
            for m, (site, _) in chosen.items():
                if self.table[site.layer].shape[-1] != site.num_heads:
                    raise SteerError(f"HeadScale: layer {site.layer} gates have {self.table[site.layer].shape[-1]} "
                                     f"entries; it has {site.num_heads} heads")
        return chosen

    def factors(self, site, heads: torch.Tensor) -> torch.Tensor:
        """Scale per selected head, [h] or [B, h]."""
        if self.table is not None:
            return self.table[site.layer][..., heads]
        if self.scale is not None:
            return torch.full((heads.numel(),), self.scale)
        return torch.tensor([self.pairs[site.layer][int(h)] for h in heads])

    def describe(self):
        d = {"edit": "HeadScale", "stream": self.stream, "layers": _plain(self.layers), "heads": _plain(self.heads)}
        if self.scale is not None:
            d["scale"] = self.scale
        elif self.table is None:
            d["scale"] = {f"{layer}.{h}": s for layer, per in self.pairs.items() for h, s in per.items()}
        return d


@dataclass
class DropTokens(Edit):
    """Drop tokens of `role` from the hidden states (and so from every later layer's KV cache) of `stream`.

    `schedule` maps a layer index K to the fraction of the role's original tokens kept from layer K on
    (layers < K see all of them); fractions must not grow with K. Tokens keep their original position ids
    (RoPE positions, masks), so a pruned model attends exactly as if the dropped keys were masked out.
    `rank` chooses which tokens stay: "attention" (mean over heads of the attention from the last query row at
    layer K-1, FastV/PyramidDrop), "vision_cls" (the vision tower's CLS attention to each patch at
    `vision_layers`, averaged, VTC-CLS), or a callable `(state, stream, layer, candidates [B, L] bool) -> scores
    [B, L]`. K = 0 drops before the first layer (the language model never sees those tokens).
    `rerank=True` re-ranks at every decode step; each step must then be a full forward without a KV cache
    (`generate(..., use_cache=False)`), and a cached step raises `SteerError` (FastVRerank)."""

    schedule: dict[int, float]
    role: str = "image"
    rank: object = "attention"
    stream: str | None = None
    vision_layers: list[int] | None = None
    branch: str = "all"
    rerank: bool = False
    roles_needed: set = field(default_factory=set)

    def __post_init__(self):
        if not isinstance(self.schedule, dict) or not self.schedule:
            raise SteerError("DropTokens needs a schedule {layer: fraction kept}, e.g. {2: 0.5}")
        clean = {}
        for layer, keep in self.schedule.items():
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise SteerError(f"schedule layers must be ints; got {layer!r}")
            clean[layer] = _fraction(keep, f"fraction kept at layer {layer}")
        self.schedule = dict(sorted(clean.items()))
        if min(self.schedule) >= 0:  # negative layers (from the top) are placed and checked against a model in check()
            self._check_order()
        if self.role not in ROLES:
            raise SteerError(f"unknown role {self.role!r}; roles are {ROLES}")
        if not (callable(self.rank) or self.rank in ("attention", "vision_cls")):
            raise SteerError(f"rank must be 'attention', 'vision_cls' or a callable; got {self.rank!r}")
        self.roles_needed = {self.role}

    def _check_order(self) -> None:
        keeps = list(self.schedule.values())
        if any(b > a for a, b in zip(keeps, keeps[1:])):
            raise SteerError(f"fractions kept must not grow with depth (dropped tokens cannot come back); got {self.schedule}")

    @property
    def identity(self) -> bool:
        return all(k == 1.0 for k in self.schedule.values())

    def check(self, model) -> None:
        stream = self.stream or lm_stream(model)
        if stream not in model.streams:
            raise SteerError(f"unknown stream {stream!r}; this model has {sorted(model.streams)}")
        n = model.streams[stream]
        if min(self.schedule) < 0:  # -1 is the last layer, as everywhere in attnscope
            placed = {(layer + n if -n <= layer < 0 else layer): keep for layer, keep in self.schedule.items()}
            if len(placed) != len(self.schedule):
                raise SteerError(f"the schedule {self.schedule} names one layer twice (counted from the top and the bottom)")
            self.schedule = dict(sorted(placed.items()))
            self._check_order()
        for layer in self.schedule:
            if not 0 <= layer < n:
                raise SteerError(f"DropTokens: layer {layer} is beyond the {n} layers of stream '{stream}' (use 0..{n - 1})")
        if self.rank == "attention" and min(self.schedule) == 0 and self.schedule[min(self.schedule)] < 1:
            raise SteerError("rank='attention' ranks by the layer before K; at K=0 there is none: use rank='vision_cls' "
                             "(VTC-CLS) or a callable")
        if self.rank == "vision_cls":
            if "vision" not in model.streams:
                raise SteerError(f"rank='vision_cls' needs a vision tower; {model.name} has streams {sorted(model.streams)}")
            nv = model.streams["vision"]
            for layer in self.vision_layers or []:
                if not -nv <= layer < nv:
                    raise SteerError(f"vision layer {layer} is out of range: the tower has {nv}")

    def describe(self):
        return {"edit": "DropTokens", "schedule": self.schedule, "role": self.role,
                "rank": self.rank if isinstance(self.rank, str) else "callable", "vision_layers": self.vision_layers,
                "rerank": self.rerank}


# --- decoding ----------------------------------------------------------------------------------------------------
class Branch:
    """The second forward of a contrastive decoder: inputs derived from the main inputs, plus edits that apply
    only in this branch. `name` tags the branch's forwards (edits with `branch=name` apply there only)."""

    name = "branch"
    needs_image = False

    def inputs(self, model, main: dict) -> dict:
        return dict(main)

    def describe(self) -> dict:
        return {"branch": type(self).__name__}


def _need_pixels(main: dict, who: str) -> torch.Tensor:
    pv = main.get("pixel_values")
    if pv is None:
        raise SteerError(f"{who} changes the image, but these inputs carry no pixel_values (a text-only prompt?); "
                         "pass an image, or use a method that needs none (M3ID with drop=..., DeCoRe)")
    return pv


def _generator(seed: int, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class NoisedImage(Branch):
    """The image after `step` of `steps` forward-diffusion steps with a linear beta schedule (1e-4 to 0.02):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, on the processed pixel values (VCD)."""

    name = "noised_image"
    needs_image = True

    def __init__(self, step: int = 500, steps: int = 1000, seed: int = 0):
        if not 0 <= step <= steps or steps <= 0:
            raise SteerError(f"noise step must be in [0, steps]; got step={step}, steps={steps}")
        self.step, self.steps, self.seed = int(step), int(steps), int(seed)

    def abar(self) -> float:
        betas = torch.linspace(1e-4, 0.02, self.steps, dtype=torch.float64)
        return float(torch.cumprod(1 - betas, 0)[self.step - 1]) if self.step > 0 else 1.0

    def inputs(self, model, main):
        pv = _need_pixels(main, "VCD")
        eps = torch.randn(pv.shape, generator=_generator(self.seed, pv.device), device=pv.device, dtype=pv.dtype)
        a = self.abar()
        return dict(main, pixel_values=math.sqrt(a) * pv + math.sqrt(1 - a) * eps)

    def describe(self):
        return {"branch": "NoisedImage", "step": self.step, "steps": self.steps, "seed": self.seed}


class TransformedImage(Branch):
    """A random transformation of the processed image (RITUAL): one of horizontal flip, vertical flip, rotation
    by 90/180/270 degrees, a 75% centre crop resized back, or a brightness change, drawn from `seed`."""

    name = "transformed_image"
    needs_image = True
    KINDS = ("hflip", "vflip", "rot90", "rot180", "rot270", "crop", "brightness")

    def __init__(self, seed: int = 0, kinds: tuple[str, ...] | None = None):
        self.seed = int(seed)
        self.kinds = tuple(kinds or self.KINDS)
        bad = [k for k in self.kinds if k not in self.KINDS]
        if bad:
            raise SteerError(f"unknown transforms {bad}; choose from {self.KINDS}")

    def transform(self, pv: torch.Tensor) -> tuple[str, torch.Tensor]:
        gen = _generator(self.seed, "cpu")
        kind = self.kinds[int(torch.randint(len(self.kinds), (1,), generator=gen))]
        if kind == "hflip":
            return kind, pv.flip(-1)
        if kind == "vflip":
            return kind, pv.flip(-2)
        if kind.startswith("rot"):
            k = int(kind[3:]) // 90
            out = torch.rot90(pv, k, dims=(-2, -1))
            return kind, out if out.shape == pv.shape else torch.nn.functional.interpolate(out, size=pv.shape[-2:], mode="bilinear")
        if kind == "crop":
            h, w = pv.shape[-2:]
            ch, cw = int(h * 0.75), int(w * 0.75)
            top, left = (h - ch) // 2, (w - cw) // 2
            crop = pv[..., top: top + ch, left: left + cw]
            return kind, torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        factor = 0.6 + 0.8 * float(torch.rand((), generator=gen))
        return kind, pv * factor

    def inputs(self, model, main):
        pv = _need_pixels(main, "RITUAL")
        if pv.ndim != 4:
            raise SteerError(f"RITUAL transforms image batches [B, C, H, W]; these pixel_values are {tuple(pv.shape)}")
        return dict(main, pixel_values=self.transform(pv)[1])

    def describe(self):
        return {"branch": "TransformedImage", "seed": self.seed, "kinds": list(self.kinds)}


class WithoutTokens(Branch):
    """The prompt with the tokens of `drop` removed (a role such as "image", or positions): the image-free branch
    of M3ID, or a text model's prompt without a context span. Rows are re-padded on the left."""

    name = "without_tokens"

    def __init__(self, drop="image"):
        _check_spec(drop, "drop")
        if drop is None or callable(drop):
            raise SteerError("drop must be a role or positions")
        self.drop = drop

    def inputs(self, model, main):
        from .session import remove_positions  # the helper that knows token maps

        return remove_positions(model, main, self.drop)

    def describe(self):
        return {"branch": "WithoutTokens", "drop": _plain(self.drop)}


class SameInputs(Branch):
    """The same inputs, run with this branch's own edits (DeCoRe: heads masked)."""

    name = "same_inputs"


class Contrast(Edit):
    """Combine the main next-token logits l with a branch's l_b at every decoding step:

        l' = (1 + w) * l - w * l_b      (mode "contrast": VCD, M3ID, DeCoRe)
        l' = l + w * l_b                (mode "complement": RITUAL)

    then drop tokens whose main probability is below `beta` times the most likely token's (the plausibility
    cutoff; beta=0 keeps all). `w` is `alpha`, or `weight(step, logits) -> [B, 1]` when given (M3ID's decay,
    DeCoRe's entropy). It acts on the last position of every forward of the top model (the one `generate`
    samples from) and is also available as a `LogitsProcessor` (`session.logits_processor()`)."""

    def __init__(self, branch: Branch, alpha: float = 1.0, beta: float = 0.1, mode: str = "contrast",
                 weight: Callable | None = None, edits: list | None = None):
        if mode not in ("contrast", "complement"):
            raise SteerError(f"mode must be 'contrast' or 'complement'; got {mode!r}")
        self.branch_spec = branch
        self.alpha = _nonneg(alpha, "alpha", "a negative weight would favour the distorted branch")
        self.beta = _fraction(beta, "beta")
        self.mode, self.weight = mode, weight
        self.branch_edits = list(edits or [])
        for e in self.branch_edits:
            e.branch = branch.name

    @property
    def identity(self) -> bool:
        return self.alpha == 0.0 and self.weight is None

    def check(self, model) -> None:
        lm_stream(model)
        if self.branch_spec.needs_image and model.spec.kind != "vlm":
            raise SteerError(f"{type(self.branch_spec).__name__} needs an image input, but {model.name} is a "
                             f"{model.spec.kind} model with no image tokens")

    def combine(self, step: int, logits: torch.Tensor, branch_logits: torch.Tensor) -> torch.Tensor:
        logits, branch_logits = logits.float(), branch_logits.float()
        w = self.weight(step, logits) if self.weight is not None else torch.full((logits.shape[0], 1), self.alpha)
        w = w.to(logits.device)
        out = (1 + w) * logits - w * branch_logits if self.mode == "contrast" else logits + w * branch_logits
        if self.beta > 0:
            probs = logits.softmax(-1)
            keep = probs >= self.beta * probs.amax(-1, keepdim=True)
            out = out.masked_fill(~keep, float("-inf"))
        return out

    def describe(self):
        return {"edit": "Contrast", "mode": self.mode, "alpha": self.alpha, "beta": self.beta,
                "weight": getattr(self.weight, "__name__", None) if self.weight else None,
                **self.branch_spec.describe(), "branch_edits": [e.describe() for e in self.branch_edits]}


class Observe(SiteEdit):
    """Call `fn(ctx, call, output, heads)` after each chosen attention call; changes nothing. `branch` limits it
    to one pass (observation passes use names starting with "_")."""

    def __init__(self, fn: Callable, stream=None, layers=None, heads=None, branch: str = "all"):
        super().__init__(stream, layers, heads)
        self.fn, self.branch = fn, branch

    def observe(self, ctx, call, output, heads) -> None:
        self.fn(ctx, call, output, heads)

    def describe(self):
        return {"edit": "Observe", "fn": getattr(self.fn, "__name__", "fn"), "branch": self.branch}
