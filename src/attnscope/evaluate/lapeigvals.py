"""LapEigvals: a hallucination detector from the spectrum of attention graphs (Binkowski et al., "Hallucination
Detection in LLMs Using Spectral Features of Attention Maps", 2025), applied beside Lookback Lens (lookback.py) to a
VLM's own captions with exact labels.

Each head's causal attention map A (n x n, row u = where token u's query looks) is read as the adjacency matrix of
a directed graph. Its Laplacian is L = D - A with the paper's degree

    d_i = sum_u A[u, i] / (n - i)        (0-based: the attention token i receives, averaged over the n - i tokens
                                          that can attend to it, itself included)

A is lower triangular (causal), D is diagonal, so L is lower triangular and its eigenvalues are its diagonal:
lambda_i = d_i - A[i, i]; no eigen-solver is needed (tests check this against `torch.linalg.eigvals`). The top-k
eigenvalues of every language-model head, concatenated over layers x heads (30 x 9 x k for scene-vlm), are the
features of a logistic-regression probe.

Here the graph is the generation's own: node t is the position whose query generated token t (node 0 is the last
prompt token), so only the attention among those positions is captured (`capture(keys=[last prompt position,
"generated"], queries="last")`, SDPA on; about L*H*T^2/2 numbers per caption). A span (an object word, see
`lookback.object_spans`) ending at generated token e gets the spectrum of the graph on nodes 0..e, the caption up
to and including that word: nothing generated after the word enters its features. A graph of fewer than k nodes
is padded with isolated nodes (eigenvalue 0, as the last node of every graph has: d = A[e, e]).

`nodes="all"` makes every position a node, prompt included, as the paper's whole-sequence graph (all prefill rows
are captured: about L*H*P^2 numbers more per caption); generated token t's query is then node prompt_len - 1 + t.
bench/detectors.py compares both with Lookback Lens on the same spans."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .lookback import LookbackLens, auroc


def laplacian(adj: torch.Tensor) -> torch.Tensor:
    """[..., n, n] Laplacian D - A of attention maps with the paper's in-degree normalised by n - i."""
    n = adj.shape[-1]
    counts = torch.arange(n, 0, -1, dtype=adj.dtype, device=adj.device)
    return torch.diag_embed(adj.sum(-2) / counts) - adj


def _check_causal(adj: torch.Tensor, atol: float = 1e-6) -> None:
    """Refuse maps whose Laplacian's eigenvalues are not its diagonal (non-square, or weight above the diagonal)."""
    if adj.dim() < 2 or adj.shape[-1] != adj.shape[-2]:
        raise ValueError(f"an attention graph is square; got a map of shape {tuple(adj.shape)}")
    upper = torch.triu(adj, diagonal=1)
    if upper.numel() and upper.abs().max() > atol:
        raise ValueError("the attention map is not causal (it has weight above the diagonal), so the Laplacian's "
                         "eigenvalues are not its diagonal; use torch.linalg.eigvals(laplacian(adj)) for such maps")


def laplacian_eigvals(adj: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """[..., n] eigenvalues of `laplacian(adj)` for causal (lower-triangular) maps: its diagonal, in node order."""
    _check_causal(adj, atol)
    n = adj.shape[-1]
    counts = torch.arange(n, 0, -1, dtype=adj.dtype, device=adj.device)
    return adj.sum(-2) / counts - torch.diagonal(adj, dim1=-2, dim2=-1)


def prefix_eigvals(adj: torch.Tensor) -> torch.Tensor:
    """[..., n, n]: row e holds the Laplacian eigenvalues of the graph on nodes 0..e (entries s > e are NaN).

    Equal to `laplacian_eigvals(adj[..., :e+1, :e+1])` for every e, computed at once from running column sums;
    non-causal maps are refused as there."""
    _check_causal(adj)
    n = adj.shape[-1]
    col = torch.cumsum(adj, dim=-2)  # col[e, s] = sum_{u <= e} A[u, s]
    e = torch.arange(n, device=adj.device)
    counts = (e[:, None] - e[None, :] + 1).to(adj.dtype)  # nodes that can attend to s within 0..e
    lam = col / counts.clamp_min(1) - torch.diagonal(adj, dim1=-2, dim2=-1).unsqueeze(-2)
    return lam.masked_fill(e[None, :] > e[:, None], float("nan"))


def top_k(eigvals: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k]: the k largest values of the last dimension, descending; with fewer than k values, the missing
    ones are 0 (as if k - n isolated nodes preceded node 0: d = 0 and A[i, i] = 0 for them, and every other node's
    count n - i of nodes that can attend to it unchanged; appended after the last node they would change it) and
    sorted in."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    n = eigvals.shape[-1]
    if n < k:
        eigvals = torch.cat([eigvals, eigvals.new_zeros(eigvals.shape[:-1] + (k - n,))], -1)
    return eigvals.topk(k, dim=-1).values


@dataclass
class CaptionGraph:
    """A generated answer and its attention graph: `attn[l, h, t, s]` is the attention of node t's query to node
    s's key. With the generating positions as nodes, node t is the position whose query generated token t (node 0:
    the last prompt token); with every position as nodes, that is node `offset + t`."""

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # char span of each generated token in `text`
    attn: np.ndarray  # [L, H, N, N], lower triangular
    prompt_len: int = 0
    offset: int = 0  # node of generated token 0's query (0, or prompt_len - 1 when every position is a node)

    def span_steps(self, start: int, end: int) -> list[int]:
        """Generated-token indices whose characters overlap [start, end)."""
        return [t for t, (a, b) in enumerate(self.offsets) if a < end and b > start and b > a]


NODES = ("generated", "all")


def graph_from_run(run, prompt_len: int, steps: int, nodes: str = "generated", stream: str = "language") -> np.ndarray:
    """[L, H, N, N] attention among the graph's nodes, read from a capture of `generate`. `nodes="generated"`: the
    generating positions prompt_len-1 .. prompt_len+T-2 (needs the captured rows of those queries, full or restricted
    to those keys); `"all"`: every position 0 .. prompt_len+T-2 (needs all prefill rows: `queries=None`)."""
    if nodes not in NODES:
        raise ValueError(f"nodes is one of {NODES}; got {nodes!r}")
    layers = sorted(layer for (s, layer) in run.records if s == stream)
    if not layers:
        raise ValueError(f"the capture holds no {stream!r} records")
    heads = run.records[(stream, layers[0])][0].probs.shape[1]
    base = prompt_len - 1 if nodes == "generated" else 0
    n = prompt_len - 1 + steps - base
    out = np.zeros((len(layers), heads, n, n), np.float32)
    seen = np.zeros(n, bool)
    for li, layer in enumerate(layers):
        for rec in run.records[(stream, layer)]:
            keys = np.arange(rec.probs.shape[-1]) if rec.keys is None else np.asarray(rec.keys)
            kin = (keys >= base) & (keys < base + n)
            probs = rec.probs[0].float().numpy()  # [H, queries, keys]
            for j, q in enumerate(rec.queries):
                if base <= q < base + n:
                    row = out[li, :, q - base]  # a view [H, n]
                    row[:, keys[kin] - base] = probs[:, j][:, kin]
                    seen[q - base] = True
    if not seen.all():
        raise ValueError(f"the capture lacks the attention rows of {int((~seen).sum())} graph node(s); capture with "
                         + ("queries=None" if nodes == "all" else 'queries="last"'))
    return out


@torch.no_grad()
def generate_graph(model, image, text: str, max_new_tokens: int = 64, steer=None, nodes: str = "generated") -> CaptionGraph:
    """Greedy generation recording only the attention LapEigvals needs (see the module docstring); `nodes="all"`
    makes the prompt's positions nodes too, as the paper's whole-sequence graph (all prefill rows are captured)."""
    import attnscope

    from .lookback import decode_offsets
    from .pope import Generator

    if nodes not in NODES:
        raise ValueError(f"nodes is one of {NODES}; got {nodes!r}")
    gen = Generator(model, max_new_tokens=max_new_tokens, steer=steer)
    inputs = model.encode(gen.prompt(text), image)
    prompt_len = inputs["input_ids"].shape[1]
    select = {"queries": "last", "keys": [prompt_len - 1, "generated"]} if nodes == "generated" else {}
    with gen._steer_context(), attnscope.capture(model, streams="language", **select) as trace:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, prompt_len:].tolist()
    eos = set(np.atleast_1d(model.hf.generation_config.eos_token_id or []).tolist())
    while new and new[-1] in eos:
        new = new[:-1]
    text_out, offsets = decode_offsets(model.tokenizer, new)
    graph = graph_from_run(trace.run(), prompt_len, len(new), nodes)
    return CaptionGraph(text_out, new, offsets, graph, prompt_len, 0 if nodes == "generated" else prompt_len - 1)


def span_features(attn: np.ndarray, spans: Sequence[dict], k: int = 10, offset: int = 0) -> np.ndarray:
    """[n_spans, L*H*k]: per head, the top-k Laplacian eigenvalues of the graph up to the span's last token
    (generated token t is node `offset + t`: see `CaptionGraph.offset`)."""
    if np.ndim(attn) != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn is [layers, heads, nodes, nodes] (square maps); got shape {tuple(np.shape(attn))}")
    L, H, T, _ = attn.shape
    if not spans:
        return np.zeros((0, L * H * k), np.float32)
    if any(not len(s["steps"]) for s in spans):
        raise ValueError("a span has no generated tokens (empty 'steps'); it has no graph to take eigenvalues of")
    ends = [max(s["steps"]) + offset for s in spans]
    if min(ends) < 0:
        raise ValueError(f"a span ends at node {min(ends)} (step + offset {offset}), before node 0")
    if max(ends) >= T:
        raise ValueError(f"a span ends at generated token {max(ends)} but the graph has {T} nodes")
    lam = prefix_eigvals(torch.from_numpy(np.ascontiguousarray(attn, np.float32)).double())  # [L, H, T, T]
    return np.stack([top_k(lam[:, :, e, :e + 1], k).reshape(-1).float().numpy() for e in ends])


class LapEigvals(LookbackLens):
    """The LapEigvals probe: logistic regression on standardised top-k Laplacian eigenvalues (scikit-learn)."""


def compare_detectors(features: dict[str, np.ndarray], y: Sequence[bool], groups: Sequence, train: np.ndarray,
                      single: dict[str, str] | None = None, pairs: Sequence[tuple[str, str]] = (), C: float = 0.1,
                      seed: int = 0, boot: int = 1000) -> dict:
    """Test AUROC with 95% intervals (cluster bootstrap over `groups` of the test spans) of a probe per feature set,
    on one train/test split (`train`: boolean mask over spans), beside controls fitted on the training spans only:
    for each name in `single` (result name -> feature set), the single column whose training AUROC is furthest
    from 0.5 (sign kept), and the probe refitted on shuffled training labels (name + "_shuffled"). `pairs` adds
    paired differences AUROC(a) - AUROC(b) on the same bootstrap resamples. A group with spans on both sides of
    the split is refused (the test would share images and attention graphs with the training spans)."""
    from .bootstrap import bootstrap

    y, train, g = np.asarray(y, bool), np.asarray(train), np.asarray(groups)
    n = len(y)
    if train.dtype != bool and len(train) == n and set(np.unique(train).tolist()) <= {0, 1}:
        train = train.astype(bool)  # a 0/1 mask
    if train.dtype != bool or len(train) != n or len(g) != n or any(len(x) != n for x in features.values()):
        raise ValueError(f"give {n} spans' worth of everything: `train` a boolean mask and `groups` and every feature "
                         f"set one row per span; got train {train.dtype} x {len(train)}, groups {len(g)}, features "
                         + ", ".join(f"{k} {len(x)}" for k, x in features.items()))
    test = ~train
    shared = set(g[train].tolist()) & set(g[test].tolist())
    if shared:
        raise ValueError(f"{len(shared)} group(s) (e.g. {sorted(shared, key=str)[0]!r}) have spans among both the "
                         "training and the test spans: split by group (caption/image), or the test leaks")
    for part, mask in (("training", train), ("test", test)):
        if y[mask].all() or not y[mask].any():
            raise ValueError(f"the {part} spans must include both hallucinated and grounded ones")
    rng = np.random.default_rng(seed)
    y_shuffled = rng.permutation(y[train])
    scores, chosen = {}, {}
    for name, x in features.items():
        scores[name] = LapEigvals(C, seed).fit(x[train], y[train]).score(x[test])
        scores[name + "_shuffled"] = LapEigvals(C, seed).fit(x[train], y_shuffled).score(x[test])
    for out_name, name in (single or {}).items():
        x = features[name]
        auc = np.array([auroc(x[train, j], y[train]) for j in range(x.shape[1])])
        best = int(np.nanargmax(np.abs(auc - 0.5)))
        sign = 1.0 if auc[best] >= 0.5 else -1.0
        scores[out_name] = sign * x[test, best]
        chosen[out_name] = {"column": best, "train_auroc": float(auc[best])}
    y_test = y[test]

    def metric(idx):
        idx = list(idx)
        res = {name: auroc(s[idx], y_test[idx]) for name, s in scores.items()}
        for a, b in pairs:
            res[f"{a}-{b}"] = res[a] - res[b]
        return res

    ci = bootstrap(list(range(int(test.sum()))), metric, groups=list(g[test]), n=boot, seed=seed, unit="caption")
    return {"n_train": int(train.sum()), "n_test": int(test.sum()), "hallucinated_train": int(y[train].sum()),
            "hallucinated_test": int(y_test.sum()), "groups_train": len(set(g[train])), "groups_test": len(set(g[test])),
            "auroc": ci, "single": chosen}
