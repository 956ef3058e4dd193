"""Percentile bootstrap intervals for evaluation metrics, resampling whole clusters (an image's questions, a
caption's mentions) so that items that share an image are not counted as independent evidence."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import warnings

import numpy as np

MIN_UNITS = 10  # fewer resampling units than this and a percentile interval says little


class FewUnitsWarning(UserWarning):
    """A bootstrap interval resampled from too few units (images, captions) to mean much."""


def bootstrap(items: Sequence, metric: Callable[[Sequence], float | dict], groups: Sequence | None = None,
              n: int = 1000, level: float = 0.95, seed: int = 0, min_units: int = MIN_UNITS, unit: str = "unit") -> dict:
    """Percentile bootstrap of `metric(items)`.

    `groups` (one key per item, e.g. the image id) makes it a cluster bootstrap: whole groups are drawn with
    replacement. `metric` returns a float or a dict of floats; the result maps each name to
    {"value", "low", "high"} (for a float metric the name is "value"). NaN replicates (a metric undefined on a
    resample, e.g. precision with no positive predictions) are dropped. With fewer than `min_units` resampling
    units (groups, or items without groups; `unit` names them in the message) a `FewUnitsWarning` says the interval
    means little: with 2 images there are only 3 distinct resamples."""
    items = list(items)
    if not items:
        raise ValueError("nothing to bootstrap: no items")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    keys = list(range(len(items))) if groups is None else list(groups)
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} group keys for {len(items)} items; give one per item")
    clusters: dict = {}
    for i, k in enumerate(keys):
        clusters.setdefault(k, []).append(i)
    members = list(clusters.values())
    if len(members) < min_units:
        warnings.warn(f"the {level:.0%} intervals are bootstrapped over only {len(members)} {unit}(s); with fewer than "
                      f"{min_units} resampling units they mean little: evaluate more", FewUnitsWarning, stacklevel=2)
    point = metric(items)
    as_dict = isinstance(point, dict)
    point = point if as_dict else {"value": point}
    rng = np.random.default_rng(seed)
    reps: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n):
        draw = rng.integers(0, len(members), len(members))
        sample = [items[i] for c in draw for i in members[c]]
        value = metric(sample)
        value = value if as_dict else {"value": value}
        for k in point:
            v = value.get(k)
            if isinstance(v, (int, float)) and not np.isnan(v):
                reps[k].append(float(v))
    alpha = (1 - level) / 2
    out = {}
    for k, v in point.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        r = np.array(reps[k])
        low, high = (np.quantile(r, [alpha, 1 - alpha]).tolist() if len(r) else (float("nan"), float("nan")))
        out[k] = {"value": float(v), "low": float(low), "high": float(high)}
    return out


def fmt(ci: dict, digits: int = 3, scale: float = 1.0) -> str:
    """"0.812 [0.780, 0.845]" from a {"value", "low", "high"} entry."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(ci['value'] * scale)} [{f.format(ci['low'] * scale)}, {f.format(ci['high'] * scale)}]"
