"""Head importance on a target (see `target.py`), measured by masking heads with steer's `HeadScale`.

- `ablation`: "Are Sixteen Heads Really Better than One?" (Michel, Levy, Neubig, NeurIPS 2019): importance of a head
  = target(all heads) - target(that head masked). Batched: each batch row masks a different head (per-row gates).
- `ablation_grad`: the paper's first-order proxy, d target / d gate at gate = 1 (one forward and one backward for
  every head at once); signed, so it estimates `ablation` (Michel et al. rank by its absolute value).
- `shapley`: Shapley values of heads as players, v(S) = target with only the heads in S unmasked among the players
  (non-players always on), estimated from random permutations (each with its reverse: antithetic pairs); the
  standard error is the spread of the pair means / sqrt(pairs). Cost: samples x (players + 1) evaluations, batched.
  ("Shapley Head Pruning", Held & Yang, EACL 2023, use the same value-of-a-coalition-of-heads game.)"""
from __future__ import annotations

import torch

from ..capture.selection import Selection
from ..steer.edits import HeadScale, SteerError
from ..steer.session import as_model, steer
from .target import Target, _repeat, make_target

Player = tuple[str, int, int]


def players(model, streams=None, layers=None) -> list[Player]:
    """Every (stream, layer, head) in a selection, validated like a capture selection."""
    model = as_model(model)
    try:
        chosen = Selection(streams, layers).sites(model.sites)
    except (ValueError, IndexError, TypeError) as err:
        raise SteerError(str(err)) from err
    return sorted((s.stream, s.layer, h) for s in chosen.values() for h in range(s.num_heads))


def _gated(model, target: Target, rows: list[dict[Player, float]]) -> torch.Tensor:
    """Target scores [len(rows)], row i run with head gates rows[i] (heads not named stay at 1)."""
    n = len(rows)
    tables: dict[str, dict[int, torch.Tensor]] = {}
    for i, gates in enumerate(rows):
        for (stream, layer, head), g in gates.items():
            per = tables.setdefault(stream, {})
            if layer not in per:
                per[layer] = torch.ones(n, model.site(stream, layer).num_heads)
            per[layer][i, head] = g
    edits = [HeadScale(table, stream=stream) for stream, table in tables.items()]
    with torch.no_grad(), steer(model, *edits):
        out = model.hf(**_repeat(target.inputs, n))
    return target.score(out).float().cpu()


def _batched(model, target, rows, batch: int) -> torch.Tensor:
    return torch.cat([_gated(model, target, rows[i: i + batch]) for i in range(0, len(rows), batch)])


def ablation(model, inputs: dict, target=None, streams=None, layers=None, batch: int = 32,
             _target: Target | None = None) -> dict[Player, float]:
    """{(stream, layer, head): target(all) - target(head masked)}; positive = the head helps the target."""
    model = as_model(model)
    target = _target or make_target(model, inputs, target)
    heads = players(model, streams, layers)
    base = float(_gated(model, target, [{}])[0])
    scores = _batched(model, target, [{p: 0.0} for p in heads], batch)
    return {p: base - float(s) for p, s in zip(heads, scores)}


def ablation_grad(model, inputs: dict, target=None, streams=None, layers=None,
                  _target: Target | None = None) -> dict[Player, float]:
    """First-order estimate of `ablation`: d target / d gate_h at all gates 1 (one backward pass)."""
    model = as_model(model)
    target = _target or make_target(model, inputs, target)
    heads = players(model, streams, layers)
    tables: dict[str, dict[int, torch.Tensor]] = {}
    for stream, layer, _ in heads:
        tables.setdefault(stream, {}).setdefault(layer, torch.ones(model.site(stream, layer).num_heads, requires_grad=True))
    edits = [_GradGates(t, stream=s) for s, t in tables.items()]
    with torch.enable_grad(), steer(model, *edits):
        score = target.score(model.hf(**target.inputs)).sum()
    leaves = [t for per in tables.values() for t in per.values()]
    grads = torch.autograd.grad(score, leaves)
    by = {id(t): g for t, g in zip(leaves, grads)}
    return {(s, layer, h): float(by[id(tables[s][layer])][h]) for s, layer, h in heads}


class _GradGates(HeadScale):
    @property
    def identity(self):  # all ones, but they carry the gradient
        return False


def shapley(model, inputs: dict, target=None, streams=None, layers=None, samples: int = 8, seed: int = 0,
            batch: int = 32, _target: Target | None = None) -> tuple[dict[Player, float], dict[Player, float]]:
    """(Shapley value, standard error) per head from `samples` permutations (rounded up to antithetic pairs)."""
    model = as_model(model)
    if samples < 2:
        raise SteerError(f"samples must be >= 2 (one antithetic pair); got {samples}")
    target = _target or make_target(model, inputs, target)
    heads = players(model, streams, layers)
    n = len(heads)
    gen = torch.Generator().manual_seed(seed)
    pairs = (samples + 1) // 2
    marg = torch.zeros(pairs, 2, n)
    for p in range(pairs):
        perm = torch.randperm(n, generator=gen)
        for side, order in enumerate((perm, perm.flip(0))):
            rows = []
            on: set[int] = set()
            for k in range(n + 1):
                rows.append({heads[j]: (1.0 if j in on else 0.0) for j in range(n)})
                if k < n:
                    on.add(int(order[k]))
            values = _batched(model, target, rows, batch)
            marg[p, side, order] = values[1:] - values[:-1]
    pair_means = marg.mean(1)  # [pairs, n]
    phi = pair_means.mean(0)
    se = pair_means.std(0, unbiased=True) / pairs ** 0.5 if pairs > 1 else torch.full((n,), float("nan"))
    return ({h: float(v) for h, v in zip(heads, phi)}, {h: float(v) for h, v in zip(heads, se)})
