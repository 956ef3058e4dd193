"""Query/key joint embedding of one head (Yeh et al., "AttentionViz: A Global View of Transformer Attention", 2023).

The query and key vectors one head computes (as its attention function receives them: after rotary embeddings) for
every token of several inputs are placed in one 2-D map, so that a query lies near the keys it attends to. Two
transformations AttentionViz applies first leave every attention row unchanged:
* scale queries by s and keys by 1/s so both have the same mean norm (q . k unchanged);
* then translate the keys so their centroid is the queries' (q . (k + c) = q . k + q . c adds one constant per
  query row, which softmax ignores).
Then PCA (or t-SNE, scikit-learn) of the stacked queries and keys. SDPA stays on: the vectors are read where the
model passes them to its attention function, through the same dispatcher as capture."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.dispatch import Handler, attach


@dataclass
class QKVectors:
    """Queries [N, d] and keys [N, d] of one head, one of each per token of every input (row order: input, then
    position), the token strings and roles, and the scaling the model applies to q . k."""

    queries: np.ndarray
    keys: np.ndarray
    tokens: list[str]
    roles: list[str]
    sample: list[int]  # which input each token comes from
    positions: list[int]
    stream: str
    layer: int
    head: int
    scaling: float
    where: dict = field(default_factory=dict)

    def normalized(self) -> tuple[np.ndarray, np.ndarray]:
        """(queries, keys) translated and scaled as AttentionViz does; every attention row is unchanged."""
        q, k = self.queries.astype(np.float64), self.keys.astype(np.float64)
        s = np.sqrt(np.linalg.norm(k, axis=1).mean() / max(np.linalg.norm(q, axis=1).mean(), 1e-12))
        q, k = q * s, k / s
        return q, k - k.mean(0) + q.mean(0)


class _Keep(Handler):
    def __init__(self, head: int, kv_head: int):
        self.head, self.kv_head, self.calls = head, kv_head, []

    def observe(self, call, output) -> None:
        if call.query.shape[0] != 1:
            raise ValueError("qk_vectors reads one sequence per forward; pass a list of single inputs")
        self.calls.append((call.query[0, self.head].detach().float().cpu(), call.key[0, self.kv_head].detach().float().cpu(),
                           call.module.scaling if hasattr(call.module, "scaling") else call.kwargs.get("scaling")))


@torch.no_grad()
def qk_vectors(model, inputs: dict | Sequence[dict], layer: int, head: int, stream: str | None = None) -> QKVectors:
    """Query and key vectors of head `head` of `stream`'s layer `layer` for every token of each input (encoded
    dicts of batch size 1, e.g. `model.encode(text)`), from one forward each."""
    inputs = [inputs] if isinstance(inputs, dict) else list(inputs)
    if not inputs:
        raise ValueError("no inputs: pass one encoded input or a list of them")
    streams = model.streams
    stream = stream or (next(iter(streams)) if len(streams) == 1 else None)
    if stream not in streams:
        raise ValueError(f"pass stream= one of {sorted(streams)}" if stream is None else
                         f"unknown stream {stream!r}; this model has {sorted(streams)}")
    if not -streams[stream] <= layer < streams[stream]:
        raise IndexError(f"layer {layer} is out of range: stream {stream!r} has {streams[stream]} layers")
    layer %= streams[stream]
    module, site = next((m, s) for m, s in model.sites.items() if s.stream == stream and s.layer == layer)
    if not 0 <= head < site.num_heads:
        raise IndexError(f"head {head} is out of range: {stream} layer {layer} has {site.num_heads} heads")
    keep = _Keep(head, head // (site.num_heads // site.num_kv_heads))
    qs, ks, tokens, roles, sample, positions, scaling = [], [], [], [], [], [], None
    for i, x in enumerate(inputs):
        mask = x.get("attention_mask") if hasattr(x, "get") else None
        mask = None if mask is None else torch.as_tensor(mask)
        if mask is not None and mask.shape[0] == 1 and not bool(mask.bool().all()):  # batches: refused in the forward
            raise ValueError(f"input {i} has padding (zeros in its attention_mask): its masked positions' queries and "
                             "keys take part in no attention row; encode each input on its own, unpadded")
        keep.calls.clear()
        attachment = attach(model.hf, {module: (site, keep)})
        try:
            model.hf(**x)
        finally:
            attachment.detach()
        if len(keep.calls) != 1:
            raise ValueError(f"{stream} layer {layer} ran {len(keep.calls)} attention calls for input {i}; expected one")
        q, k, scaling = keep.calls[0]
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"{stream} layer {layer} attends from {q.shape[0]} queries to {k.shape[0]} keys: "
                             "a joint embedding needs self-attention (one query and one key per token)")
        tmap = model.token_maps(x).get(stream, [None])[0]
        n = q.shape[0]
        qs.append(q.numpy())
        ks.append(k.numpy())
        tokens += list(tmap.tokens) if tmap is not None and len(tmap) == n else [str(p) for p in range(n)]
        roles += list(tmap.roles) if tmap is not None and len(tmap) == n else ["unknown"] * n
        sample += [i] * n
        positions += list(range(n))
    scaling = float(scaling) if scaling is not None else qs[0].shape[-1] ** -0.5
    return QKVectors(np.concatenate(qs), np.concatenate(ks), tokens, roles, sample, positions, stream, layer, head, scaling)


def joint_embedding(qk: QKVectors, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates (queries [N, 2], keys [N, 2]) of the normalized vectors embedded together."""
    q, k = qk.normalized()
    points = np.concatenate([q, k])
    if method == "pca":
        centred = points - points.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
    elif method == "tsne":
        from sklearn.manifold import TSNE

        coords = TSNE(2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=seed).fit_transform(points)
    else:
        raise ValueError(f"method is 'pca' or 'tsne'; got {method!r}")
    return coords[: len(q)], coords[len(q):]
