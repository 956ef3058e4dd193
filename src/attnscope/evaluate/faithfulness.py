"""Faithfulness of an explanation: deletion and insertion AUC, and the positive/negative perturbation test, each
with a random map's curve beside it.

Papers: "RISE: Randomized Input Sampling for Explanation of Black-box Models" (Petsiuk et al., 2018) for deletion
and insertion; "Transformer Interpretability Beyond Attention Visualization" (Chefer et al., 2021) for the
positive/negative perturbation test (remove the most / the least relevant tokens first).

Units: image patches (a patch's pixels in the model input are replaced by the baseline) or text tokens (removed
through the attention mask, so the model no longer sees them). Special tokens, CLS, padding, and the positions a
next-token/answer target predicts from are never removed.

Curves: the target is evaluated after removing (deletion, most relevant first), inserting into a fully removed
input (insertion, most relevant first), or removing the least relevant first (negative), at fractions
0, 1/steps, ..., 1 of the units. Each curve is normalised per input as (f - f_removed) / (f_clean - f_removed), so 1
is the clean score and 0 the fully removed one, and summarised by its area (trapezoid rule over the fraction):
deletion AUC - lower is better; insertion and negative AUC - higher is better. The random map is a seeded
random order of the same units, run through the same curves. For class targets the share of steps where the
predicted class is unchanged is also kept (`kept`): averaged over a test set it is Chefer et al.'s accuracy curve.

Note: with one baseline for every curve, insertion and negative perturbation are the same experiment read in
mirror (inserting the top k = removing the bottom N - k), so they get different baselines, as in the papers:
removal (deletion, negative) fills with `baseline`, insertion starts from `insertion_baseline`. For text both are
"remove the token", so text gets deletion and insertion only.

Defaults, and why: `steps=10` (10 % of the units per step, Chefer et al.'s granularity; 11 points per curve);
`baseline="mean"` (the image's mean colour per channel: Chefer et al. zero the normalised pixels, RISE's deletion
uses a constant); `insertion_baseline="blur"` (Gaussian blur, sigma 8 px, RISE's insertion start); ties in a map are
broken in a seeded random order, so a map that is flat over many units is not credited with the raster order;
`batch=8` perturbed inputs per forward."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..explain.base import blurred

CURVES = ("deletion", "insertion", "negative")
BETTER = {"deletion": "lower", "insertion": "higher", "negative": "higher"}  # which way a faithful map moves each AUC


@dataclass
class Curve:
    fractions: list[float]
    values: list[float]
    normalised: list[float]
    auc: float
    kept: list[bool] | None = None

    def to_dict(self) -> dict:
        return {"fractions": self.fractions, "values": self.values, "normalised": self.normalised, "auc": self.auc,
                "kept": self.kept}


@dataclass
class FaithfulnessResult:
    """Deletion / insertion / negative-perturbation AUCs of one explanation beside a random map's.

    Each curve is normalised per input as (f - f_removed) / (f_clean - f_removed) (1 = the clean target value, 0 =
    every unit removed) and summarised by its area over the removed/inserted fraction in [0, 1]. Deletion: lower is
    better; insertion and negative: higher is better. The area leaves [0, 1] when the target moves beyond its clean
    or fully-removed value on the way (common when f_clean - f_removed is small, e.g. a VLM's next-token log-prob):
    `str(result)` says so. `print(result)` gives the short table; `result.curves[name]` / `to_dict()` the curves."""

    curves: dict[str, Curve]
    random: dict[str, Curve]
    clean: float
    removed: float
    units: int
    baseline: str
    steps: int
    degenerate: bool = False
    extras: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.table()

    __str__ = __repr__

    def table(self) -> str:
        """A few lines: per curve its AUC, the random map's, which direction is better and whether the map beats the
        random one, then the normalisation and any AUC outside [0, 1]."""
        lines = [f"faithfulness over {self.units} units, {self.steps} steps ({self.baseline}); target clean "
                 f"{self.clean:.4g}, all removed {self.removed:.4g}"]
        outside = []
        for name, curve in self.curves.items():
            rnd = self.random.get(name)
            row = f"  {name:<9} AUC {curve.auc:7.3f}"
            if rnd is not None:
                row += f"   random {rnd.auc:7.3f}"
                if not (np.isnan(curve.auc) or np.isnan(rnd.auc)):
                    beats = curve.auc < rnd.auc if BETTER[name] == "lower" else curve.auc > rnd.auc
                    row += f"   {'beats' if beats else 'does not beat'} random"
            lines.append(row + f"   ({BETTER[name]} is better)")
            if not np.isnan(curve.auc) and not 0 <= curve.auc <= 1:
                outside.append(name)
        lines.append("  AUC of (f - f_removed) / (f_clean - f_removed) over the fraction of units; 1 = clean, 0 = all removed")
        if self.degenerate:
            lines.append("  note: degenerate, removing every unit does not change the target, so no curve is defined")
        elif outside:
            lines.append(f"  note: {', '.join(outside)} left [0, 1]: the target went beyond its clean or fully-removed value on the "
                         f"way (span f_clean - f_removed = {self.clean - self.removed:.3g}); compare with the random map only")
        return "\n".join(lines)

    def summary(self) -> dict:
        """{curve: AUC, curve_random: AUC} for each curve computed (deletion: lower is better; insertion and negative:
        higher is better, see `BETTER`)."""
        out = {}
        for name, curve in self.curves.items():
            out[name] = round(curve.auc, 4)
            if name in self.random:
                out[f"{name}_random"] = round(self.random[name].auc, 4)
        return out

    def to_dict(self) -> dict:
        return {"curves": {k: c.to_dict() for k, c in self.curves.items()},
                "random": {k: c.to_dict() for k, c in self.random.items()}, "clean": self.clean,
                "removed": self.removed, "units": self.units, "baseline": self.baseline, "steps": self.steps,
                "degenerate": self.degenerate}


# --- units and perturbations ------------------------------------------------------------------------------
def units_of(expl, which: str | None = None) -> list[int]:
    """Positions that can be removed: image patches ("image") or text tokens ("text"); default: image patches if
    the explanation has an image, else text tokens."""
    tmap = expl.tokens
    if which is None:
        which = "image" if tmap.grids and expl.pixel_size is not None else "text"
    protected = set(expl._target.protected(tmap)) if expl._target is not None else set()
    if which == "image":
        if expl.pixel_size is None:
            raise ValueError("image units need a raster image input; this explanation has none")
        return [i for i, p in enumerate(tmap.patch) if p is not None and i not in protected]
    if which == "text":
        found = [i for i, r in enumerate(tmap.roles) if r in ("text", "system", "generated") and i not in protected]
        if not found:
            raise ValueError("no text tokens to remove in this input")
        return found
    raise ValueError(f"units must be 'image' or 'text'; got {which!r}")


class Perturber:
    """Builds perturbed copies of one input: patches replaced by baseline pixels, tokens masked out."""

    def __init__(self, expl, baseline: str):
        if expl._model is None or expl._inputs is None:
            raise ValueError("this explanation has no model attached (loaded from a file?); re-run attnscope.explain")
        self.expl, self.inputs, self.tmap = expl, expl._inputs, expl.tokens
        pv = self.inputs.get("pixel_values")
        self.pixels = None
        if pv is not None and pv.dim() == 4:
            if baseline == "blur":
                self.fill = blurred(pv.detach().float()).to(pv.dtype)
            elif baseline == "mean":
                self.fill = pv.detach().mean(dim=(-2, -1), keepdim=True).expand_as(pv)
            else:
                raise ValueError(f"baseline must be 'blur' or 'mean' for images; got {baseline!r}")
            self.pixels = pv.detach()
            self.cell = expl._cell()

    def build(self, removed: list[list[int]]) -> dict:
        """A batch with one row per list of removed positions."""
        n = len(removed)
        out = {}
        for key, value in self.inputs.items():
            if isinstance(value, torch.Tensor) and key != "pixel_values":
                out[key] = value.expand(n, *value.shape[1:]).clone() if value.shape[0] == 1 else value
            elif key != "pixel_values":
                out[key] = value
        if self.pixels is not None:
            per = self.pixels.shape[0]
            pixels = self.pixels.repeat(n, 1, 1, 1)
            fill = self.fill.repeat(n, 1, 1, 1)
            ph, pw = self.cell
            mask = pixels.new_zeros(pixels.shape[0], 1, *pixels.shape[-2:], dtype=torch.bool)  # on the pixels' device
            for row, positions in enumerate(removed):
                for pos in positions:
                    where = self.tmap.patch[pos]
                    if where is not None:
                        k, r, c = where
                        mask[row * per + k, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = True
            out["pixel_values"] = torch.where(mask, fill, pixels)
        token_rows = [[p for p in positions if self.tmap.patch[p] is None] for positions in removed]
        if any(token_rows):
            ids = self.inputs.get("input_ids")
            mask = out.get("attention_mask")
            if mask is None:
                mask = torch.ones(n, ids.shape[1], dtype=torch.long, device=ids.device)
            for row, positions in enumerate(token_rows):
                if positions:
                    mask[row, positions] = 0
            out["attention_mask"] = mask
        return out


def _scores(expl, perturber: Perturber, removed: list[list[int]], batch: int) -> tuple[list[float], list[int] | None]:
    model, target = expl._model, expl._target
    values, labels = [], []
    for i in range(0, len(removed), batch):
        x = perturber.build(removed[i : i + batch])
        with torch.no_grad():
            out = model.hf(**x)
            values += target(out, x).float().cpu().tolist()
            label = target.label(out, x)
            labels += label.cpu().tolist() if label is not None else []
    return values, (labels or None)


def _order(scores: np.ndarray, units: list[int], rng: np.random.Generator, descending: bool) -> list[int]:
    tie = rng.random(len(units))
    key = scores[units]
    idx = np.lexsort((tie, -key if descending else key))
    return [units[i] for i in idx]


def _auc(fractions, ys) -> float:
    return float(np.trapezoid(ys, fractions)) if hasattr(np, "trapezoid") else float(np.trapz(ys, fractions))


def faithfulness(expl, curves: tuple[str, ...] | None = None, baseline: str = "mean", insertion_baseline: str = "blur",
                 steps: int = 10, batch: int = 8, random: bool = True, seed: int = 0,
                 units: str | None = None) -> FaithfulnessResult:
    """Deletion / insertion / negative-perturbation curves of `expl` (needs the model it came from), with the same
    curves for a seeded random order of the units when `random`. `baseline` fills removed patches for deletion and
    negative perturbation, `insertion_baseline` is the start image of insertion.

    Normalisation: each point is (f - f_removed) / (f_clean - f_removed), the AUC is its trapezoid area over the
    fraction of units in [0, 1]; deletion: lower is better, insertion and negative: higher is better. Values may
    leave [0, 1] (see `FaithfulnessResult`). `units`: "image" (patches) or "text" (tokens), default by input;
    `steps` >= 1 (ValueError otherwise); `curves` a subset of `CURVES`."""
    unit_list = units_of(expl, units)
    is_image = expl.tokens.patch[unit_list[0]] is not None
    if curves is None:
        curves = CURVES if is_image else ("deletion", "insertion")
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise ValueError(f"unknown curves {sorted(unknown)}; curves: {CURVES}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    fill = {"deletion": baseline, "negative": baseline, "insertion": insertion_baseline}
    if not is_image:
        fill = dict.fromkeys(fill, "remove")
    perturbers = {b: Perturber(expl, b if b != "remove" else "mean") for b in set(fill[c] for c in curves)}
    scores = expl.scores.numpy()
    rng = np.random.default_rng(seed)
    counts = [round(s * len(unit_list) / steps) for s in range(steps + 1)]
    fractions = [c / len(unit_list) for c in counts]
    orders = {"deletion": _order(scores, unit_list, rng, True), "negative": _order(scores, unit_list, rng, False)}
    orders["insertion"] = orders["deletion"]
    random_order = [int(u) for u in rng.permutation(unit_list)]

    # rows per baseline: [clean, everything removed, inner steps of each curve using that baseline]
    todo = [(name, orders[name], False) for name in curves]
    if random:
        todo += [(name, random_order, True) for name in sorted({"deletion" if n == "negative" else n for n in curves})]
    results: dict = {}
    forwards = 0
    for b, perturber in perturbers.items():
        rows: list[list[int]] = [[], list(unit_list)]
        plan = []
        for name, order, is_random in todo:
            if fill[name] != b:
                continue
            for s in range(1, steps):
                chosen = order[: counts[s]]
                inserted = set(chosen)
                removed = [u for u in unit_list if u not in inserted] if name == "insertion" else chosen
                plan.append((name, is_random, s))
                rows.append(removed)
        values, labels = _scores(expl, perturber, rows, batch)
        forwards += len(rows)
        results[b] = (values, labels, plan)

    def curve(name, is_random) -> Curve:
        values, labels, plan = results[fill[name]]
        clean, removed_value = values[0], values[1]
        span = clean - removed_value
        degenerate = abs(span) <= 1e-6 * max(1.0, abs(clean))
        inner = {s: i + 2 for i, (n, r, s) in enumerate(plan) if n == name and r == is_random}
        ends = (0, 1) if name != "insertion" else (1, 0)
        idx = [ends[0]] + [inner[s] for s in range(1, steps)] + [ends[1]]
        ys = [values[i] for i in idx]
        norm = [(y - removed_value) / span if not degenerate else float("nan") for y in ys]
        kept = [labels[i] == labels[0] for i in idx] if labels else None
        return Curve(fractions, ys, norm, _auc(fractions, norm) if not degenerate else float("nan"), kept)

    first = results[fill[curves[0]]][0]
    clean, removed_value = first[0], first[1]
    degenerate = abs(clean - removed_value) <= 1e-6 * max(1.0, abs(clean))
    result = FaithfulnessResult({name: curve(name, False) for name in curves}, {}, clean, removed_value,
                                len(unit_list), ",".join(f"{c}={fill[c]}" for c in curves), steps, degenerate)
    if random:
        for name in curves:
            result.random[name] = curve("deletion" if name == "negative" else name, True)
    result.extras["forwards"] = forwards
    return result
