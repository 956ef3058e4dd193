"""`attnscope.steer`: apply edits inside a `with` block; the model is restored exactly on exit.

    with attnscope.steer(model, PAI(alpha=0.5), FastV(k=2, keep=0.5)):
        model.generate(**inputs, max_new_tokens=32)

What it installs, and removes on exit (also when the block raises):
- one handler per edited attention module through `core.dispatch.attach` (logit edits as additive masks or
  explicit rows for the edited heads, probability edits, head-output scaling, observers);
- a forward pre-hook and hook on the top model: token roles for each new sequence, extended with "generated"
  at each decode step; contrastive decoding on the last position's logits;
- a pre-hook on vision towers (a VLM's generate encodes images before the first forward);
- decoder-block pre-hooks where tokens are dropped (hidden states, position embeddings, masks) or where
  massive activations are measured (VAR's sinks).
Nothing else on the model changes; no weights are touched."""
from __future__ import annotations

import torch
from torch import nn

from ..core import seam
from ..core.dispatch import AttentionCall, Handler, attach, exclusive
from ..core.ledger import Ledger, forget_kept, kept_positions, place
from ..core.probs import attention_probs, check_terms, index_on, sink_logits
from ..core.tokens import CACHED_STREAMS, ROLES, TokenMap
from ..models.wrapped import Model
from .edits import AttentionEdit, Contrast, DropTokens, Edit, HeadScale, SiteEdit, SteerError, lm_stream

CODE = {r: i for i, r in enumerate(ROLES)}
MIN = torch.finfo(torch.float32).min
_steered: set[int] = set()


def as_model(model) -> Model:
    return model if isinstance(model, Model) else Model(model)


# --- token roles of the running sequence ----------------------------------------------------------------------
class SeqState:
    """What the edits know about the sequence in flight: role codes per stream [B, L] by original position, the
    decode step, kept positions per pruned layer, sink maps, ranking scores, and scratch for methods.
    `branch` is None for the main forward, or the name of a contrastive branch / an observation pass."""

    def __init__(self, branch: str | None = None):
        self.branch = branch
        self.codes: dict[str, torch.Tensor] = {}
        self.tmaps: dict[str, list[TokenMap]] = {}
        self.step = 0
        self.kept: dict[tuple[str, int], torch.Tensor] = {}
        self.sink = _SinkMaps(self)  # (stream, layer) -> bool [B, L], built from sparse positions
        self.sink_scale: dict[tuple[str, int], torch.Tensor] = {}
        self.sink_threshold: dict[tuple[str, int], torch.Tensor] = {}  # tau x sink_scale, [B, 1]
        self.scores: dict[tuple[str, int], torch.Tensor] = {}
        self.vision_cls: list[torch.Tensor] = []
        self.data: dict = {}
        self.per_row: dict = {}  # methods' tensors [B, ...] that must follow beam reorders (VAR's chosen heads)
        self.inputs: dict = {}
        self.pixels: dict = {}
        self.version = 0
        self.from_vision = False
        self._masks: dict = {}
        self.sliced = None  # (version, the block arguments and kept positions they came from, their cut versions)
        self.ledger: Ledger | None = None if branch is None else Ledger()  # a branch runs its own cache

    def prepend_unknown(self, n: int) -> None:
        """`n` positions a cache held before this block saw the sequence: their roles are unknown."""
        for stream in CACHED_STREAMS:
            codes = self.codes.get(stream)
            if codes is None:
                continue
            self.codes[stream] = torch.cat([torch.full((codes.shape[0], n), CODE["unknown"], dtype=torch.long), codes], 1)
            self.tmaps[stream] = [TokenMap.unknown(n).concat(t) for t in self.tmaps[stream]]
        self._masks.clear()

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search reordered the cache: row i now continues row rows[i]'s sequence."""
        idx = rows.cpu()
        for stream, codes in self.codes.items():
            if codes.shape[0] == idx.numel():
                self.codes[stream] = codes[idx]
                self.tmaps[stream] = [self.tmaps[stream][i].copy() for i in idx.tolist()]
        for key, kept in list(self.kept.items()):
            self.kept[key] = kept[idx.to(kept.device)]
        for key, found in list(self.sink.pos.items()):
            self.sink.pos[key] = [set(found[i]) for i in idx.tolist()]
        for key, scale in list(self.sink_scale.items()):
            self.sink_scale[key] = scale[idx.to(scale.device)]
        for key, threshold in list(self.sink_threshold.items()):
            self.sink_threshold[key] = threshold[idx.to(threshold.device)]
        for key, value in list(self.per_row.items()):
            self.per_row[key] = value[idx.to(value.device)]
        self._masks.clear()

    def length(self, stream: str) -> int | None:
        codes = self.codes.get(stream)
        return None if codes is None else codes.shape[1]

    def has_role(self, stream: str, role: str) -> bool:
        codes = self.codes.get(stream)
        return codes is not None and bool((codes == CODE[role]).any(-1).all())

    def set_maps(self, maps: dict[str, list[TokenMap]]) -> None:
        for stream, tmaps in maps.items():
            if not tmaps:
                continue
            self.tmaps[stream] = tmaps
            self.codes[stream] = torch.tensor([[CODE[r] for r in t.roles] for t in tmaps], dtype=torch.long)
        self._masks.clear()

    def extend(self, stream: str, n: int) -> None:
        codes = self.codes.get(stream)
        if codes is None:
            return
        new = torch.full((codes.shape[0], n), CODE["generated"], dtype=torch.long)
        self.codes[stream] = torch.cat([codes, new], 1)
        L = codes.shape[1]
        fresh = torch.arange(L, L + n)
        for key, kept in list(self.kept.items()):
            if key[0] == stream:
                self.kept[key] = torch.cat([kept, fresh.expand(kept.shape[0], -1).to(kept.device)], 1)
        self._masks.clear()

    def position_mask(self, spec, stream: str, B: int, what: str) -> torch.Tensor | None:
        """bool [B, L] over original positions for a key/query spec; None means all positions."""
        if spec is None:
            return None
        key = (stream, what, id(spec) if isinstance(spec, (list, tuple, slice, range)) else spec)
        hit = self._masks.get(key)
        if hit is not None:
            return hit
        codes = self.codes.get(stream)
        L = codes.shape[1] if codes is not None else 0
        out = torch.zeros(codes.shape[0] if codes is not None else B, L, dtype=torch.bool)
        items = spec if isinstance(spec, (list, tuple, range)) else [spec]
        for item in items:
            if isinstance(item, slice):
                out[:, range(L)[item]] = True
            elif isinstance(item, int):
                if -L <= item < L:
                    out[:, item % L] = True
            elif item == "last":
                if L:
                    out[:, L - 1] = True
            elif codes is not None:
                out |= codes == CODE[item]
        self._masks[key] = out
        return out


class _SinkMaps:
    """Sink positions per (stream, layer), kept as sets per batch row (sinks are rare); read as bool [B, L] masks,
    built once per forward step."""

    def __init__(self, state: SeqState):
        self.state = state
        self.pos: dict[tuple[str, int], list[set[int]]] = {}
        self.grown: dict[str, int] = {}  # stream -> the last step at which a sink was added in some layer

    def __contains__(self, key) -> bool:
        return key in self.pos

    def keys(self):
        return self.pos.keys()

    def items(self):
        return [(k, self[k]) for k in self.pos]

    def get(self, key, default=None):
        return self[key] if key in self.pos else default

    def __getitem__(self, key) -> torch.Tensor:
        L = self.state.length(key[0])
        cache_key = ("sink", key, L)
        hit = self.state._masks.get(cache_key)
        if hit is None:
            rows = self.pos[key]
            same = ("sink-rows", tuple(tuple(sorted(found)) for found in rows), L)  # layers with the same sinks share one
            hit = self.state._masks.get(same)
            if hit is None:
                hit = torch.zeros(len(rows), L or 0, dtype=torch.bool)
                for b, found in enumerate(same[1]):
                    if found:
                        hit[b, list(found)] = True
                self.state._masks[same] = hit
            self.state._masks[cache_key] = hit
        return hit


class CallContext:
    """One attention call seen by the edits: original positions of its keys and query rows, and masks."""

    def __init__(self, session: steer, state: SeqState, call: AttentionCall):
        self.session, self.state, self.call, self.site = session, state, call, call.site
        self.B, self.H, self.Q = call.query.shape[0], call.query.shape[1], call.query.shape[2]
        self.K = call.key.shape[2]
        kept = state.kept.get((self.site.stream, self.site.layer))
        if kept is not None and kept.shape[1] != self.K:
            raise RuntimeError(f"layer {self.site.layer} holds {self.K} keys but attnscope expected {kept.shape[1]} after "
                               "dropping tokens; was the cache filled outside this steer block?")
        L = state.length(self.site.stream)
        if kept is None and L is not None and self.site.stream in CACHED_STREAMS and self.K != L:
            _, first = place(L, self.Q, self.K, f"{self.site.stream} layer {self.site.layer}: ")
            kept = torch.arange(first, L).expand(self.B, -1)  # a sliding-window layer: its keys are the last K
        self.pos_k = kept  # None: keys are positions 0..K-1
        self.known = L is not None and (kept is not None or self.K <= L)
        self.patch: list = []
        self.done = False
        self._keys: dict = {}
        self.rows_changed: dict = {}  # id(prob edit) -> bool [B, h, r]: the rows its last `apply` changed

    def _select(self, full: torch.Tensor | None, cols: torch.Tensor | None, n: int, offset: int) -> torch.Tensor:
        if full is None:
            return torch.ones(self.B, n, dtype=torch.bool)
        if full.shape[0] != self.B:
            full = full.expand(self.B, -1) if full.shape[0] == 1 else full[: self.B]
        if cols is not None:
            return full.gather(1, cols)
        if not self.known:
            return torch.zeros(self.B, n, dtype=torch.bool)
        if offset == 0 and n == full.shape[1]:
            return full  # the same tensor for every layer of a step: lets edits reuse what they derive from it
        return full[:, offset: offset + n]

    def shared(self, key: tuple, deps: tuple, build):
        """`build()` computed once per forward step and reused by the step's other calls (layers) whose `deps`
        (tensors it is derived from) are the same objects; cleared with the step's masks."""
        full = (key, *map(id, deps))
        hit = self.state._masks.get(full)
        if hit is None or any(a is not b for a, b in zip(hit[0], deps)):
            hit = (deps, build())
            self.state._masks[full] = hit
        return hit[1]

    def last_row(self) -> torch.Tensor:
        """The index of the call's last query row, [1] (shared by the step's calls)."""
        key = ("last-index", self.Q)
        out = self.state._masks.get(key)
        if out is None:
            out = self.state._masks[key] = torch.tensor([self.Q - 1])
        return out

    def key_mask(self, spec) -> torch.Tensor:
        """bool [B, K]: the keys a spec selects in this call (computed once per call and spec)."""
        key = id(spec) if isinstance(spec, (list, tuple, slice, range)) or callable(spec) else spec
        hit = self._keys.get(key)
        if hit is None:
            if callable(spec):
                hit = spec(self)
            else:
                hit = self._select(self.state.position_mask(spec, self.site.stream, self.B, "keys"), self.pos_k, self.K, 0)
            self._keys[key] = hit
        return hit

    def key_cols(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool [B, K] selected keys, the columns selected in any row), shared by the calls of one forward step
        when the keys are not pruned (the same for every layer then)."""
        cacheable = self.pos_k is None and not callable(spec)
        key = ("cols", id(spec) if isinstance(spec, (list, tuple, slice, range)) else spec, self.K, self.B)
        if cacheable:
            hit = self.state._masks.get(key)
            if hit is not None:
                return hit
        km = self.key_mask(spec)
        out = (km, km.any(0).nonzero()[:, 0])
        if cacheable:
            self.state._masks[key] = out
        return out

    def query_mask(self, spec) -> torch.Tensor:
        """bool [B, Q]: the query rows a spec selects in this call ("last" = the last row)."""
        if callable(spec):
            return spec(self)
        if spec == "last":
            key = ("last-row", self.B, self.Q)
            out = self.state._masks.get(key)
            if out is None:
                out = torch.zeros(self.B, self.Q, dtype=torch.bool)
                out[:, -1] = True
                self.state._masks[key] = out
            return out
        full = self.state.position_mask(spec, self.site.stream, self.B, "queries")
        cols = None if self.pos_k is None else self.pos_k[:, self.K - self.Q:]
        return self._select(full, cols, self.Q, self.K - self.Q)

    def positions(self) -> torch.Tensor:
        """Original positions of this call's keys, [B, K]."""
        if self.pos_k is not None:
            return self.pos_k
        return torch.arange(self.K).expand(self.B, -1)


def block_logits(call: AttentionCall, heads: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Raw scaled logits (before any mask) [B, h, r, c] for heads, query rows and key columns of a call."""
    q, k = call.query, call.key
    groups = q.shape[1] // k.shape[1]
    dev = q.device
    qs = q.index_select(2, rows.to(dev)).index_select(1, heads.to(dev)).float()
    ks = k.index_select(2, cols.to(dev)).index_select(1, (heads // groups).to(dev)).float()
    scaling = call.kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(call.module, "scaling", None)
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    a = torch.matmul(qs, ks.transpose(-1, -2)) * scaling
    softcap = call.kwargs.get("softcap")
    return torch.tanh(a / softcap) * softcap if softcap is not None else a


def vision_scores_to_positions(st: SeqState, stream: str, vis: torch.Tensor) -> torch.Tensor:
    """Per-patch scores of the vision tower [images, patches] (row-major over the tower's grid) -> scores [B, L] over
    the language stream's image positions (-inf elsewhere). Images are numbered across the batch as the processor
    lists them; where the language grid is coarser than the tower's (2x2 pooling projectors such as scene-vlm's),
    an image token gets the mean score of the tower patches it covers."""
    vgrid = st.tmaps["vision"][0].grids[0] if st.tmaps.get("vision") else None
    slots = sum(len(t.grids) for t in st.tmaps[stream])
    if vis.shape[0] != slots:
        raise SteerError(f"the vision tower scored {vis.shape[0]} image(s), but the {stream} batch holds {slots} (beam "
                         "search repeats the prompt's rows, not its image, so the tower runs once for all beams): "
                         "generate with num_beams=1, or rank by the language model's attention (FastV, PyramidDrop)")
    out = torch.full((st.codes[stream].shape[0], st.length(stream)), float("-inf"))
    taken = 0
    for b, tmap in enumerate(st.tmaps[stream]):
        for k, (rows, cols) in enumerate(tmap.grids):
            vr, vc = vgrid if vgrid is not None else (rows, cols)
            fy, fx = max(vr // rows, 1), max(vc // cols, 1)
            grid = vis[taken + k].reshape(vr, vc)[: rows * fy, : cols * fx]
            pooled = grid.reshape(rows, fy, cols, fx).mean((1, 3)).reshape(-1)
            for n, pos in enumerate(tmap.image_positions(k)):
                out[b, pos] = pooled[n]
        taken += len(tmap.grids)
    return out


def explicit_logits(call: AttentionCall, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Masked logits [B, h, r, K] in float32, as `core.probs.attention_probs(..., logits=True)` computes them (the
    same operations, so the same numbers), without its generality where the call has no extra term: when every head
    is asked for, grouped-query heads share their key head through a reshape instead of a copy of the keys per query
    head (the decode step of a steered head is then about one extra attention); for a few heads (VAR's chosen heads
    at a decode step), only those heads' queries and their key heads are gathered."""
    q, k = call.query, call.key
    B, H, Q, D = q.shape
    kvH, K = k.shape[1], k.shape[2]
    check_terms(call.module, call.kwargs)
    extra = call.kwargs.get("position_bias") is not None or sink_logits(call.module, call.kwargs) is not None
    mask = call.attention_mask
    window = mask is None and call.kwargs.get("sliding_window")
    if extra or window or (heads.numel() == H and kvH == H):
        return attention_probs(call.module, q, k, mask, call.kwargs, heads=heads, rows=rows, logits=True)
    g = H // kvH
    dev = q.device
    qs = q if rows.numel() == Q else q.index_select(2, rows.to(dev))
    r = qs.shape[2]
    scaling = call.kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(call.module, "scaling", None)
    scaling = D ** -0.5 if scaling is None else float(scaling)
    if heads.numel() == H:  # every head (in order: heads come sorted from the selection)
        logits = torch.matmul(qs.float().reshape(B, kvH, g * r, D), k.float().transpose(-1, -2)).view(B, H, r, K)
        logits = logits * scaling
    else:
        heads = heads.to(dev)
        ks = k.index_select(1, heads // g).float()
        logits = torch.matmul(qs.index_select(1, heads).float(), ks.transpose(-1, -2)).mul_(scaling)
    softcap = call.kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        m = mask[..., :K]
        m = m if m.shape[2] == 1 else m.index_select(2, rows.to(m.device))
        m = m if m.shape[1] == 1 or heads.numel() == H else m.index_select(1, heads.to(m.device))
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, MIN)
        else:
            logits = logits + m.float()
    elif Q > 1 and _is_causal(call):
        allowed = torch.arange(K, device=dev)[None, :] <= (K - Q + rows.to(dev))[:, None]
        logits = logits.masked_fill(~allowed, MIN)
    return logits


def weighted_values(call: AttentionCall, probs: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """probs [B, h, r, K] @ values of those heads -> [B, h, r, D] (grouped reshape when every head is used)."""
    value = call.value
    B, h, r, K = probs.shape
    kvH = value.shape[1]
    groups = call.query.shape[1] // kvH
    if h == call.query.shape[1] and kvH != h:
        out = torch.matmul(probs.reshape(B, kvH, groups * r, K), value.float())
        return out.view(B, h, r, -1)
    v = value.index_select(1, (heads // groups).to(value.device)).float()
    return torch.matmul(probs, v)


def _is_causal(call: AttentionCall) -> bool:
    flag = call.kwargs.get("is_causal")
    return bool(getattr(call.module, "is_causal", False) if flag is None else flag)


# --- the per-module handler ----------------------------------------------------------------------------------
class _SiteHandler(Handler):
    def __init__(self, session: steer, site):
        self.session, self.site = session, site
        self.attn: list[tuple[AttentionEdit, torch.Tensor]] = []
        self.heads: list[tuple[HeadScale, torch.Tensor]] = []
        self.observers: list = []

    def idle(self) -> bool:
        """Nothing to do in this call: no sequence in flight, or every attention edit skips it (and no head scale or
        observer is attached)."""
        state = self.session.state
        if state is None:
            return True
        if self.heads or self.observers:
            return False
        return all(not e.applies(state.branch) or e.skips(state, self.site) for e, _ in self.attn)

    def before(self, call: AttentionCall) -> None:
        state = self.session.state
        if state is None:
            return
        active = [(e, h) for e, h in self.attn if e.applies(state.branch)]
        if not active:
            if self.observers:
                call.__dict__["_steer_ctx"] = CallContext(self.session, state, call)
            return
        ctx = CallContext(self.session, state, call)
        call.__dict__["_steer_ctx"] = ctx
        dense = []
        for edit, heads in active:
            heads = edit.heads_for(ctx, heads)
            if heads.numel() == 0:
                continue
            qm = ctx.query_mask(edit.queries)
            rows = ctx.last_row() if edit.queries == "last" else qm.any(0).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            if edit.kind == "prob" or rows.numel() * 4 < ctx.Q:
                ctx.patch.append((edit, heads, qm, rows))
            else:
                dense.append((edit, heads, qm, rows))
        if dense:
            self._fold_mask(ctx, call, dense)

    def _fold_mask(self, ctx: CallContext, call: AttentionCall, dense) -> None:
        B, H, Q, K = ctx.B, ctx.H, ctx.Q, ctx.K
        dev = call.query.device
        per_head = any(e.needs_logits or getattr(e, "per_head", False) or h.numel() != H for e, h, _, _ in dense)
        bias = torch.zeros(B, H if per_head else 1, Q, K, device=dev)
        for edit, heads, qm, rows in dense:
            km, cols = ctx.key_cols(edit.keys)
            if cols.numel() == 0:
                continue
            a = block_logits(call, heads, rows, cols) if edit.needs_logits else None
            b = edit.bias(ctx, a).float().to(dev)
            sel = (qm[:, rows][:, None, :, None] & km[:, cols][:, None, None, :]).to(dev)
            b = torch.where(sel, b, torch.zeros((), device=dev))
            hi = heads if per_head else torch.zeros(1, dtype=torch.long)
            idx = (slice(None), hi.to(dev)[:, None, None], rows.to(dev)[None, :, None], cols.to(dev)[None, None, :])
            bias[idx] = bias[idx] + b
        mask = call.attention_mask
        if mask is None:
            if Q > 1 and _is_causal(call):
                allowed = torch.arange(K, device=dev)[None, :] <= (K - Q + torch.arange(Q, device=dev))[:, None]
                bias = bias.masked_fill(~allowed, MIN)
        elif mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask[..., :K], MIN)
        else:
            bias = (bias + mask[..., :K].float()).clamp_min(MIN)
        call.attention_mask = bias.to(dtype=call.query.dtype)

    def compute(self, call: AttentionCall):
        """When explicit rows cover every query row and head of the call (a decode step edited in all heads), the
        backend's output would be thrown away: compute the whole output here instead."""
        ctx = call.__dict__.get("_steer_ctx")
        if ctx is None or not ctx.patch or call.probs is not None:
            return None
        if not all(r.numel() == ctx.Q and h.numel() == ctx.H for _, h, _, r in ctx.patch):
            return None
        ctx.done = True
        return self._patch(ctx, call, None)

    def after(self, call: AttentionCall, output):
        state = self.session.state
        if state is None:
            return output
        ctx = call.__dict__.get("_steer_ctx")
        if ctx is not None and ctx.patch and not ctx.done:
            output = self._patch(ctx, call, output)
        active = [(e, h) for e, h in self.heads if e.applies(state.branch)]
        if active:
            out = output[0]
            B, H = out.shape[0], out.shape[2]
            scale = None
            for edit, heads in active:
                f = edit.factors(self.site, heads).float()
                s = torch.ones(f.shape[0] if f.ndim == 2 else 1, H, dtype=torch.float32)
                s[:, heads] = f if f.ndim == 2 else f[None, :]
                scale = s if scale is None else scale * s
            if scale.shape[0] not in (1, B):
                raise SteerError(f"head gates have {scale.shape[0]} rows but the batch has {B}")
            output = (out * scale.to(out.device, out.dtype)[:, None, :, None], *output[1:])
        if self.observers and ctx is not None:
            for fn in self.observers:
                fn(ctx, call, output)
        return output

    def _patch(self, ctx: CallContext, call: AttentionCall, output):
        if len(ctx.patch) == 1:
            rows, heads = ctx.patch[0][3], ctx.patch[0][1]
        else:
            rows = torch.unique(torch.cat([r for _, _, _, r in ctx.patch]))
            heads = torch.unique(torch.cat([h for _, h, _, _ in ctx.patch]))
        logits = explicit_logits(call, heads, rows)
        dev = logits.device
        B, h, r = ctx.B, heads.numel(), rows.numel()
        index: list = []

        def place(eh, er):  # an edit's heads and rows as indices into this block
            if not index:
                index.append({int(x): i for i, x in enumerate(heads.tolist())})
                index.append({int(x): i for i, x in enumerate(rows.tolist())})
            return torch.tensor([index[0][x] for x in eh.tolist()]), torch.tensor([index[1][x] for x in er.tolist()])

        applied = torch.zeros(B, h, r, dtype=torch.bool, device=dev)  # where an edit changed the row
        for edit, eh, qm, er in ctx.patch:
            if edit.kind != "logit":
                continue
            km, cols = ctx.key_cols(edit.keys)
            if cols.numel() == 0:
                continue
            hi, ri = place(eh, er)
            a = block_logits(call, eh, er, cols) if edit.needs_logits else None
            b = edit.bias(ctx, a).float().to(dev)
            sel = (qm[:, er][:, None, :, None] & km[:, cols][:, None, None, :]).to(dev)
            idx = (slice(None), hi[:, None, None], ri[None, :, None], cols[None, None, :])
            logits[idx] = (logits[idx] + torch.where(sel, b, torch.zeros((), device=dev))).clamp_min(MIN)
            applied[:, hi[:, None], ri[None, :]] |= qm[:, er][:, None, :].to(dev)
        probs = torch.softmax(logits, -1)
        for edit, eh, qm, er in ctx.patch:
            if edit.kind != "prob":
                continue
            whole = eh.numel() == h and er.numel() == r
            if whole:
                sub = probs
            else:
                hi, ri = place(eh, er)
                sub = probs[:, hi[:, None], ri[None, :]]
            new = edit.apply(ctx, sub)
            where = edit.rows_where(ctx, sub)  # None: every selected row
            if edit.queries != "last":  # "last" is selected in every batch row: the query mask narrows nothing
                rows_q = qm[:, er][:, None, :].to(dev)
                where = rows_q if where is None else where.to(dev) & rows_q
            if where is None:
                where = torch.ones(B, eh.numel(), er.numel(), dtype=torch.bool, device=dev)
            where = where.to(dev)
            if whole:
                probs = torch.where(where[..., None], new, sub)
                applied |= where
            else:
                probs[:, hi[:, None], ri[None, :]] = torch.where(where[..., None], new, sub)
                applied[:, hi[:, None], ri[None, :]] |= where
        rows_out = weighted_values(call, probs, heads)  # [B, h, r, D]
        if output is None:  # computed in place of the backend: every row and head, edited or not
            call.probs = probs
            return rows_out.transpose(1, 2).to(call.query.dtype).contiguous(), None
        out = output[0]
        dev = out.device
        new = rows_out.transpose(1, 2).to(out.dtype)
        # only where an edit changed a row: elsewhere the backend's output stays, bit for bit
        if rows.numel() == ctx.Q and heads.numel() == ctx.H:  # every row and head: no gather/scatter
            out = torch.where(applied.transpose(1, 2)[..., None].to(dev), new, out)
        else:
            out = out.clone()
            idx = (slice(None), rows.to(dev)[:, None], heads.to(dev)[None, :])
            out[idx] = torch.where(applied.transpose(1, 2)[..., None].to(dev), new, out[idx])  # [B, r, h, D]
        call.patches.append((heads, rows, applied, probs))
        return (out, *output[1:])


# --- removing tokens from inputs (image-free branches, VHD) --------------------------------------------------
def remove_positions(model: Model, inputs: dict, drop, state: SeqState | None = None) -> dict:
    """Inputs with the tokens chosen by `drop` (a role such as "image", or positions) removed from every row,
    re-padded on the left; an image role also drops the pixel values."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise SteerError("removing tokens needs input_ids")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    full = dict(inputs)
    if state is not None:
        full = {**{k: v for k, v in state.pixels.items() if v is not None}, **{k: v for k, v in full.items() if v is not None}}
    maps = model.token_maps(seam.without_cache(full))
    stream = lm_stream(model)
    tmaps = maps.get(stream)
    items = drop if isinstance(drop, (list, tuple, range)) else [drop]
    rows, masks = [], []
    for b in range(ids.shape[0]):
        gone = set()
        for item in items:
            if isinstance(item, str):
                if tmaps is None:
                    raise SteerError(f"cannot find {item!r} tokens without token roles")
                found = tmaps[b].positions(item)
                if not found and item == "image":
                    raise SteerError("these inputs have no image tokens to remove")
                gone.update(found)
            else:
                gone.add(item % ids.shape[1])
        keep = [i for i in range(ids.shape[1]) if i not in gone]
        rows.append(ids[b, keep])
        masks.append(mask[b, keep])
    width = max(r.numel() for r in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    new_ids = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=mask.device)
    for b, (r, m) in enumerate(zip(rows, masks)):
        new_ids[b, width - r.numel():] = r
        new_mask[b, width - m.numel():] = m
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", seam.POSITION_IDS, seam.ENCODED_IMAGES)}
    out["input_ids"], out["attention_mask"] = new_ids, new_mask
    if "image" in [i for i in items if isinstance(i, str)]:
        for k in ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids"):
            out.pop(k, None)
    return out


def _beam_images(kw: dict) -> dict:
    """A branch's images for every row of its ids: generate encodes each prompt's images once and expands the rows
    for beams (or num_return_sequences) afterwards, so the recorded pixel values may have one row per prompt while
    the ids have one per beam; each prompt's image is repeated for its beams, as the ids are."""
    ids, pv = kw.get("input_ids"), kw.get("pixel_values")
    if ids is None or not isinstance(pv, torch.Tensor) or pv.ndim != 4 or pv.shape[0] == ids.shape[0]:
        return kw  # (patch-flattened images, as Qwen2-VL's, carry no row per prompt: left as they are)
    if ids.shape[0] % pv.shape[0]:
        raise SteerError(f"this branch has {ids.shape[0]} rows of ids but pixel values of shape {tuple(pv.shape)}; "
                         "the ids' rows must be each prompt's rows repeated (beams, num_return_sequences)")
    k = ids.shape[0] // pv.shape[0]
    out = dict(kw, pixel_values=pv.repeat_interleave(k, 0))
    if isinstance(kw.get("image_sizes"), torch.Tensor) and kw["image_sizes"].shape[0] == pv.shape[0]:
        out["image_sizes"] = kw["image_sizes"].repeat_interleave(k, 0)
    return out


_FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids",
                 "token_type_ids", seam.POSITION_IDS)


class _BranchRun:
    """A second sequence run beside the main one (its own cache and SeqState)."""

    def __init__(self, session: steer, name: str):
        self.session, self.name = session, name
        self.state = None
        self.cache = None
        self.mask = None
        self.last_pos = None

    def prefill(self, inputs: dict) -> torch.Tensor:
        hf = self.session.model.hf
        kw = _beam_images({k: v for k, v in inputs.items() if k in _FORWARD_KEYS and v is not None})
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(kw["input_ids"])
            kw["attention_mask"] = mask
        pid = inputs.get(seam.POSITION_IDS)
        if pid is not None and pid.ndim == 2:
            kw[seam.POSITION_IDS] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            kw.pop(seam.POSITION_IDS, None)
        self.cache = seam.new_cache(hf.config)
        self.mask = mask
        self.last_pos = (mask.long().sum(-1, keepdim=True) - 1).clamp_min(0)
        self.state = SeqState(self.name)
        return self.session.run_forward(self.state, seam.cache_inputs(hf, self.cache, **kw))

    def step(self, new_ids: torch.Tensor) -> torch.Tensor:
        q = new_ids.shape[1]
        self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], q, dtype=self.mask.dtype, device=self.mask.device)], 1)
        pos = self.last_pos + torch.arange(1, q + 1, device=self.last_pos.device)[None, :]
        self.last_pos = pos[:, -1:]
        kw = {"input_ids": new_ids, "attention_mask": self.mask, seam.POSITION_IDS: pos}
        return self.session.run_forward(self.state, seam.cache_inputs(self.session.model.hf, self.cache, **kw))


# --- the context manager ---------------------------------------------------------------------------------------
class steer:
    """Apply edits and methods inside a `with` block; exiting restores the model exactly.

    `steer(model, *items)`: items are edit primitives (`attnscope.steer.edits`) or methods
    (`attnscope.steer.methods`: PAI, VAR, FastV, ...), applied together (they compose: logit edits add, probability
    edits apply in order, head scales multiply). Everything is validated before the model is touched; strength-0
    edits are left out (the identity, bit for bit). One steer block per model at a time (pass all edits to one);
    a `capture` may run inside it and records the probabilities the edited model really used. The block
    returns the session: `.state` (the last main sequence: roles, kept positions), `.edits`."""

    def __init__(self, model, *items):
        self.model = as_model(model)
        self.items = items
        self.state: SeqState | None = None
        self.edits: list[Edit] = []
        self._attachment = None
        self._hooks: list = []
        self._in_forward = False
        self._branches: dict[int, _BranchRun] = {}
        self._busy = False

    # --- plan ---------------------------------------------------------------------------------------------
    def _expand(self) -> list[Edit]:
        out: list[Edit] = []
        for item in self.items:
            if isinstance(item, Edit):
                out.append(item)
            elif hasattr(item, "edits"):
                out.extend(item.edits(self.model))
            else:
                raise SteerError(f"steer takes edits or methods (objects with .edits(model)); got {item!r}")
        for edit in list(out):
            if isinstance(edit, Contrast):
                out.extend(edit.branch_edits)
        return out

    def _plan(self) -> None:
        model = self.model
        edits = [e for e in self._expand() if not e.identity]
        for e in edits:
            e.check(model)
            if "image" in getattr(e, "roles_needed", set()) and model.spec.kind == "text":
                fix = "role=<another role>" if isinstance(e, DropTokens) else "keys=<positions or a role>"
                raise SteerError(f"{_label(e)} acts on image tokens, but {model.name} is a text model with no image tokens; "
                                 f"pass {fix} to target text tokens instead")
        drops = [e for e in edits if isinstance(e, DropTokens)]
        by_stream: dict[str, int] = {}
        for d in drops:
            stream = d.stream or lm_stream(model)
            by_stream[stream] = by_stream.get(stream, 0) + 1
            if by_stream[stream] > 1:
                raise SteerError(f"two token-dropping edits on stream '{stream}' conflict (FastV, PyramidDrop, VTC-CLS and "
                                 "a keep schedule each set the kept tokens); give one schedule")
        scaled: dict[tuple, float] = {}
        for e in edits:
            if isinstance(e, HeadScale) and e.table is None and e.branch == "all":
                for m, (site, heads) in e.sites(model).items():
                    for h, f in zip(heads.tolist(), e.factors(site, heads).tolist()):
                        key = (site.stream, site.layer, h)
                        if key in scaled and (scaled[key] == 0) != (f == 0):
                            raise SteerError(f"conflicting head edits on {site.stream} layer {site.layer} head {h}: one ablates "
                                             "it (scale 0), another scales it; drop one")
                        scaled[key] = f
        taus = sorted({float(e.tau) for e in edits if hasattr(e, "tau")})
        if len(taus) > 1:  # one set of sink maps per sequence, measured with one threshold
            raise SteerError(f"sink edits with different tau ({', '.join(f'{t:g}' for t in taus)}) in one block: the "
                             "massive-activation sinks are measured once per sequence with one threshold; give them one tau")
        if len([e for e in edits if isinstance(e, Contrast)]) > 1:
            raise SteerError("one contrastive decoder at a time (each replaces the next-token logits); pick one")
        self.edits = edits

    # --- context --------------------------------------------------------------------------------------------
    def __enter__(self) -> steer:
        hf = self.model.hf
        if id(hf) in _steered:
            raise SteerError("this model is already inside a steer block; pass all edits to one steer(...)")
        if self.model.spec.kind == "encdec":
            raise SteerError(f"{self.model.name} is an encoder-decoder: attnscope captures its encoder, decoder and "
                             "cross-attention streams, but does not steer them yet (edits would be placed with a "
                             "decoder-only model's bookkeeping); capture instead, or steer a decoder-only model")
        self._plan()
        handlers: dict[nn.Module, _SiteHandler] = {}

        def handler(module, site):
            if module not in handlers:
                handlers[module] = _SiteHandler(self, site)
            return handlers[module]

        for e in self.edits:
            if isinstance(e, AttentionEdit):
                for m, (site, heads) in e.sites(self.model).items():
                    handler(m, site).attn.append((e, heads))
            elif isinstance(e, HeadScale):
                for m, (site, heads) in e.sites(self.model).items():
                    handler(m, site).heads.append((e, heads))
            elif isinstance(e, SiteEdit) and hasattr(e, "observe"):
                for m, (site, heads) in e.sites(self.model).items():
                    handler(m, site).observers.append(_bind_observer(e, heads))
        self._layer_plan = {}
        for e in self.edits:
            if isinstance(e, DropTokens):
                self._plan_drop(e, handler)
            if hasattr(e, "tau"):
                self._sink_tau = float(e.tau)
            for stream, layers in getattr(e, "sink_layers", lambda m: {})(self.model).items():
                for layer in layers:
                    self._layer_plan.setdefault((stream, layer), set()).add("sink")
        self._contrasts = [e for e in self.edits if isinstance(e, Contrast)]
        self._ledger = Ledger(on_reorder=self._reorder)
        try:
            _steered.add(id(hf))
            self._hooks.append(hf.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._hooks.append(hf.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True))
            if self.model.spec.kind == "vlm":
                for path, stream in self.model.spec.streams.items():
                    if stream == "vision":
                        self._hooks.append(hf.get_submodule(path).register_forward_pre_hook(self._pre_vision, with_kwargs=True))
            self._install_layer_hooks()
            self._attachment = attach(hf, {m: (h.site, h) for m, h in handlers.items()}) if handlers else None
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _reorder(self, rows) -> None:
        if self.state is not None:
            self.state.reorder(rows)

    def _close(self) -> None:
        forget_kept(self.model.hf)
        if getattr(self, "_ledger", None) is not None:
            self._ledger.close()
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        _steered.discard(id(self.model.hf))

    # --- dropping tokens --------------------------------------------------------------------------------------
    def _plan_drop(self, drop: DropTokens, handler) -> None:
        stream = drop.stream or lm_stream(self.model)
        drop.stream_name = stream
        first = min(drop.schedule)
        n = self.model.streams[stream]
        for layer in range(first, n):
            self._layer_plan.setdefault((stream, layer), set()).add("drop")
        self._drop = drop
        if drop.rank == "attention":
            for layer in drop.schedule:
                site_mod = self._site_module(stream, layer - 1)
                handler(site_mod, self.model.sites[site_mod]).observers.append(self._rank_observer(drop, layer))
        elif drop.rank == "vision_cls":
            nv = self.model.streams["vision"]
            layers = drop.vision_layers
            if layers is None:
                vfl = getattr(self.model.hf.config, "vision_feature_layer", -1)
                vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
                layers = [(nv + 1 + vfl) - 1 if vfl < 0 else vfl - 1]
            for layer in layers:
                site_mod = self._site_module("vision", layer % nv)
                handler(site_mod, self.model.sites[site_mod]).observers.append(self._cls_observer)

    def _site_module(self, stream: str, layer: int) -> nn.Module:
        for m, s in self.model.sites.items():
            if s.stream == stream and s.layer == layer:
                return m
        raise SteerError(f"no attention site at {stream} layer {layer}")

    def _block(self, stream: str, layer: int) -> nn.Module:
        """The decoder/encoder block holding a site: the nearest ancestor that is an item of a ModuleList."""
        path = self._site_module_path(stream, layer)
        parts = path.split(".")
        for i in range(len(parts) - 1, -1, -1):
            if parts[i].isdigit():
                return self.model.hf.get_submodule(".".join(parts[: i + 1]))
        raise SteerError(f"cannot find the block around {path}; token dropping needs a stack of blocks")

    def _site_module_path(self, stream, layer) -> str:
        return self.model.sites[self._site_module(stream, layer)].path

    def _install_layer_hooks(self) -> None:
        stacks = set()
        for (stream, layer), what in sorted(self._layer_plan.items()):
            block = self._block(stream, layer)
            self._hooks.append(block.register_forward_pre_hook(self._layer_hook(stream, layer, what), with_kwargs=True))
            if "drop" in what and layer == 0:
                path = self._site_module_path(stream, 0).split(".")
                idx = max(i for i, p in enumerate(path) if p.isdigit())
                stacks.add((stream, ".".join(path[: idx - 1])))
        for stream, path in stacks:
            module = self.model.hf.get_submodule(path) if path else self.model.hf
            self._hooks.append(module.register_forward_pre_hook(self._stack_hook(stream), with_kwargs=True))

    def _rank_observer(self, drop: DropTokens, layer: int):
        def observe(ctx: CallContext, call, output):
            st = ctx.state
            if st.step != 0 or not drop.applies(st.branch) or ctx.Q < 2:
                return
            probs = call.probs_for(torch.arange(ctx.H), torch.tensor([ctx.Q - 1])).mean(1)[:, 0].float().cpu()
            L = st.length(ctx.site.stream)
            full = torch.full((ctx.B, L), float("-inf"))
            full.scatter_(1, ctx.positions().cpu(), probs)
            st.scores[(ctx.site.stream, layer)] = full
        return observe

    def _cls_observer(self, ctx: CallContext, call, output):
        st = ctx.state
        codes = st.codes.get("vision")
        if codes is None or not self._drop.applies(st.branch):
            return
        cls = (codes[0] == CODE["cls"]).nonzero()[:, 0]
        if cls.numel() == 0:
            raise SteerError("VTC-CLS ranks patches by the vision tower's CLS attention, but this tower has no CLS token")
        probs = call.probs_for(torch.arange(ctx.H), cls[:1]).mean(1)[:, 0].float().cpu()  # [images, K]
        patches = st.tmaps["vision"][0].image_positions(0)
        st.vision_cls.append(probs[:, patches])

    def _keep(self, st: SeqState, stream: str, layer: int, prev: torch.Tensor, keep: float) -> torch.Tensor:
        drop = self._drop
        codes = st.codes[stream]
        role = CODE[drop.role]
        is_role = codes == role
        n_orig = is_role.sum(-1)
        if bool((n_orig != n_orig[0]).any()):
            raise SteerError(f"rows of this batch hold different numbers of {drop.role!r} tokens ({n_orig.tolist()}); "
                             "dropping a fraction of them needs equal counts")
        n_keep = int(round(keep * int(n_orig[0])))
        scores = self._scores(st, stream, layer)
        present_role = is_role.gather(1, prev)
        s = scores.gather(1, prev).masked_fill(~present_role, float("-inf"))
        chosen = torch.zeros_like(present_role)
        if n_keep > 0:
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :n_keep]
            chosen.scatter_(1, order, True)
        keep_mask = ~present_role | chosen
        counts = keep_mask.sum(-1)
        return torch.stack([prev[b][keep_mask[b]] for b in range(prev.shape[0])]) if bool((counts == counts[0]).all()) \
            else _raise(SteerError("rows would keep different numbers of tokens"))

    def _scores(self, st: SeqState, stream: str, layer: int) -> torch.Tensor:
        drop = self._drop
        if callable(drop.rank):
            cand = st.codes[stream] == CODE[drop.role]
            return drop.rank(st, stream, layer, cand).float()
        if drop.rank == "attention":
            if (stream, layer) not in st.scores:
                raise RuntimeError(f"no attention scores from layer {layer - 1} for dropping tokens at layer {layer}")
            return st.scores[(stream, layer)]
        if not st.vision_cls:
            raise SteerError("VTC-CLS needs the vision tower to run on these inputs (no pixel values were encoded)")
        return vision_scores_to_positions(st, stream, torch.stack(st.vision_cls).mean(0))

    def _layer_hook(self, stream: str, layer: int, what: set):
        def hook(module, args, kwargs):
            st = self.state
            if st is None or st.length(stream) is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            changed = False
            if "drop" in what and self._drop.applies(st.branch):
                hidden, kwargs, changed = self._drop_at(st, stream, layer, hidden, kwargs)
            if "sink" in what:
                self._measure_sinks(st, stream, layer, hidden)
            if not changed:
                return None
            return ((hidden, *args[1:]) if args else args), (kwargs if args else {**kwargs, "hidden_states": hidden})
        return hook

    def _drop_at(self, st: SeqState, stream: str, layer: int, hidden, kwargs):
        drop = self._drop
        L = st.length(stream)
        B = hidden.shape[0]
        kwargs = dict(kwargs)
        if st.step == 0:
            prev = st.kept.get((stream, layer - 1)) if layer > 0 else None
            base = prev if prev is not None else torch.arange(L).expand(B, -1)
            if hidden.shape[1] != base.shape[1]:
                raise RuntimeError(f"layer {layer} got {hidden.shape[1]} positions; expected {base.shape[1]}")
            new = base
            if layer in drop.schedule:
                new = self._keep(st, stream, layer, base, drop.schedule[layer])
                idx = index_on(torch.searchsorted(base.contiguous(), new.contiguous()), hidden.device)
                hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
            st.kept[(stream, layer)] = new
            kwargs.update(_sliced(st, kwargs, new, lambda: seam.slice_block_kwargs(kwargs, new, L)))
            return hidden, kwargs, True
        if drop.rerank:
            raise SteerError(f"{_label(drop)} re-ranks the tokens at every new token without a KV cache; call "
                             "generate(..., use_cache=False) (the method's generate_kwargs), or use FastV to keep the "
                             "prompt's ranking in the cache")
        kept = st.kept.get((stream, layer))
        mask = kwargs.get(seam.MASK)
        if kept is not None and isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == L:
            kwargs.update(_sliced(st, kwargs, kept, lambda: {seam.MASK: mask.gather(3, index_on(kept, mask.device)[
                :, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))}))
            return hidden, kwargs, True
        return hidden, kwargs, False

    def _stack_hook(self, stream: str):
        def hook(module, args, kwargs):
            st = self.state
            if st is None or st.step == 0 or not self._drop.applies(st.branch):
                return None
            kept = st.kept.get((stream, 0))
            mask = kwargs.get(seam.MASK)
            if kept is None or not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] != st.length(stream):
                return None
            kwargs = dict(kwargs, **{seam.MASK: mask.gather(1, index_on(kept, mask.device))})
            if kwargs.get(seam.POSITION_IDS) is None:
                q, L = seam.query_length(kwargs), st.length(stream)
                kwargs[seam.POSITION_IDS] = torch.arange(L - q, L, device=mask.device)[None, :]
            return args, kwargs
        return hook

    def _measure_sinks(self, st: SeqState, stream: str, layer: int, hidden: torch.Tensor) -> None:
        """Massive activations (Sun et al. 2024): a token whose largest |activation| entering this block is at least
        `tau` times the block input's typical activation (the median over tokens of their mean |activation|) is a
        sink from here on (the map is cumulative over layers). The typical activation is measured on the prompt;
        a decode step compares its new tokens with the threshold stored then and, when neither this layer nor one
        below it found a new sink in this step, leaves the map as it is (a few tensor operations per layer)."""
        key = (stream, layer)
        with torch.no_grad():
            if st.step:
                threshold = st.sink_threshold.get(key)
                if threshold is None:
                    return
                hits = torch.linalg.vector_norm(hidden.detach(), float("inf"), -1) >= threshold  # max |activation|
                if not bool(hits.any()) and st.sink.grown.get(stream) != st.step:
                    return
                old = st.sink.pos.get(key, [set() for _ in range(hits.shape[0])])
                found = [set(s) for s in old]
                length = st.length(stream)
                for b, col in hits.nonzero().tolist():
                    found[b].add(length - hits.shape[1] + col)
            else:
                found = self._prompt_sinks(st, stream, layer, hidden.detach())
            prev = st.sink.pos.get((stream, layer - 1))
            if prev is not None:
                found = [a | b for a, b in zip(found, prev)]
            if st.step and all(len(a) == len(b) for a, b in zip(found, old)):
                return  # sets only grow: the same sizes are the same sets
            st.sink.pos[key] = found
            st.sink.grown[stream] = st.step
            st._masks.pop(("sink", key, st.length(stream)), None)

    def _prompt_sinks(self, st: SeqState, stream: str, layer: int, h: torch.Tensor) -> list[set[int]]:
        """The prompt's sinks at one layer (positions per batch row), storing the layer's threshold."""
        key = (stream, layer)
        pos = st.kept.get(key)
        pad = (st.codes[stream] == CODE["pad"])
        magnitude = h.abs()
        peak = magnitude.amax(-1).float()  # [B, n]
        typical = magnitude.float().mean(-1)  # [B, n]; padding is no token of the row: left out of the median
        col_pad = (torch.gather(pad, 1, pos.cpu()) if pos is not None else pad[:, :typical.shape[1]]).to(
            typical.device) if pad.shape[0] == typical.shape[0] else torch.zeros_like(typical, dtype=torch.bool)
        scale = torch.stack([row[~skip].median() if bool((~skip).any()) else row.median()
                             for row, skip in zip(typical, col_pad)]).clamp_min(1e-6)
        st.sink_scale[key] = scale
        st.sink_threshold[key] = self._sink_tau * scale[:, None]
        hits = (peak >= st.sink_threshold[key]).cpu()
        found = []
        for b in range(hits.shape[0]):
            idx = hits[b].nonzero()[:, 0]
            where = (pos[b, idx] if pos is not None else idx).tolist()
            found.append({p for p in where if not pad[b, p]})
        return found

    _sink_tau = 100.0

    # --- top-level hooks -----------------------------------------------------------------------------------
    def _pre_vision(self, module, args, kwargs):
        if self._busy and self.state is not None and self.state.branch is not None:
            st = self.state
        elif self._in_forward:
            st = self.state
        else:  # generate encodes the images before the first forward: this starts the next sequence
            st = SeqState()
            st.kept = kept_positions(self.model.hf, reset=True)
            st.from_vision = True
            self.state = st
        pv = args[0] if args else kwargs.get("pixel_values")
        grid = kwargs.get("grid_thw", kwargs.get("image_grid_thw"))
        st.pixels = {"pixel_values": pv, "image_grid_thw": grid}
        st.vision_cls = []
        st.set_maps(self.model.vision_token_maps({k: v for k, v in st.pixels.items() if v is not None}))
        return None

    def _pre_forward(self, module, args, kwargs):
        if self._busy:
            return None
        self._in_forward = True
        inputs = self.model.bind(args, kwargs)
        self.begin(inputs)
        return None

    def begin(self, inputs: dict, state: SeqState | None = None) -> SeqState:
        """Track a forward: a new sequence (prefill) or the next decode step of the current one. `state` is a
        branch's or an observation pass's own state; without it the main sequence's state is used."""
        st = state if state is not None else self.state
        ledger = state.ledger if state is not None and state.ledger is not None else self._ledger
        placed = ledger.begin(inputs, pruning=getattr(self, "_drop", None) is not None)
        if st is not None and not st.from_vision and st.codes and not placed.new:
            q = seam.query_length(inputs)
            for stream in CACHED_STREAMS:
                st.extend(stream, q)
            st.step += 1
            st.version += 1
            st.inputs = inputs
            return st
        if state is None and not (st is not None and st.from_vision):
            prev, st = st, SeqState()  # a new main sequence (unless the vision tower already started it)
            st.kept = kept_positions(self.model.hf, reset=True)  # shared with capture through the ledger
            if prev is not None and inputs.get(seam.ENCODED_IMAGES) is not None:
                st.pixels = prev.pixels  # generate without a cache re-feeds the image features it encoded once
        if state is None:
            self.state = st
        full = seam.without_cache(inputs)
        if self.model.spec.kind == "vlm" and full.get("pixel_values") is None:
            full |= {k: v for k, v in st.pixels.items() if v is not None}
        elif full.get("pixel_values") is not None:
            st.pixels = {"pixel_values": full.get("pixel_values"), "image_grid_thw": full.get("image_grid_thw")}
        st.set_maps(self.model.token_maps(full))
        if placed.prefix:
            st.prepend_unknown(placed.prefix)
        st.from_vision = False
        st.inputs = full
        st.version += 1
        if st.branch is None:
            self._check_roles(st)
            self._branches = {}
            for e in self.edits:
                if hasattr(e, "prepare"):
                    e.prepare(self, st, full)
        return st

    def _check_roles(self, st: SeqState) -> None:
        for e in self.edits:
            needs = getattr(e, "roles_needed", set())
            stream = getattr(e, "stream_name", None) or getattr(e, "stream", None) or lm_stream(self.model)
            if stream not in st.codes:
                continue
            n = st.length(stream)
            for what in ("keys", "queries"):  # a position past the prompt would select nothing, silently
                spec = getattr(e, what, None)
                spec = getattr(spec, "selects", spec)  # a callable that narrows a spec (Knockout's keys): check that spec
                items = [spec] if isinstance(spec, int) else spec if isinstance(spec, (list, tuple)) else []
                bad = [i for i in items if isinstance(i, int) and not isinstance(i, bool) and not -n <= i < n]
                if bad:
                    raise SteerError(f"{_label(e)}: {what} {bad} select nothing in a {n}-token {stream} sequence "
                                     f"(positions 0..{n - 1}, or negative from the end: -1 is the last)")
                if spec is None or spec == "image" or callable(spec) or isinstance(spec, (bool, Edit)):
                    continue  # "image" gets its own message below
                try:
                    chosen = st.position_mask(spec, stream, st.codes[stream].shape[0], what)
                except (KeyError, ValueError, TypeError):
                    continue  # a spec this check cannot read is the edit's own business
                if chosen is not None and not bool(chosen.any()):
                    raise SteerError(f"{_label(e)}: {what}={spec!r} selects nothing in this {n}-token {stream} "
                                     f"sequence (roles present: {sorted(set(st.tmaps[stream][0].roles))}); the "
                                     "edit would change nothing. Choose positions or roles the prompt has")
            for role in needs:
                if role in ("image",) and not st.has_role(stream, role):
                    raise SteerError(f"{_label(e)} acts on {role} tokens, but this input has none in the {stream} stream "
                                     "(a text-only prompt?); pass an image, or target other keys")

    def _post_forward(self, module, args, kwargs, output):
        if self.state is not None:
            self.state.sliced = None  # the cut block arguments of this forward are not needed again
        if self._busy:
            return None
        self._in_forward = False
        if output is None or not self._contrasts:
            return None
        st = self.state
        logits = getattr(output, "logits", None)
        if logits is None or st is None:
            return None
        for contrast in self._contrasts:
            branch_logits = self.branch_logits(contrast, st)
            new_last = contrast.combine(st.step, logits[:, -1], branch_logits.to(logits.device))
            logits = torch.cat([logits[:, :-1], new_last[:, None].to(logits.dtype)], 1)
        output.logits = logits
        return output

    def branch_logits(self, contrast: Contrast, st: SeqState) -> torch.Tensor:
        run = self._branches.get(id(contrast))
        if st.step == 0 or run is None:
            run = _BranchRun(self, contrast.branch_spec.name)
            self._branches[id(contrast)] = run
            return run.prefill(contrast.branch_spec.inputs(self.model, st.inputs))
        ids = st.inputs.get("input_ids")
        if ids is None:
            raise SteerError("contrastive decoding feeds the branch the new token ids; this step has no input_ids")
        return run.step(ids)

    def branch_logits_for(self, contrast: Contrast, inputs: dict, first: bool) -> torch.Tensor:
        """The branch's next-token logits for explicit main inputs (used by `ContrastiveProcessor`)."""
        run = self._branches.get(id(contrast)) if not first else None
        if run is None:
            run = _BranchRun(self, contrast.branch_spec.name)
            self._branches[id(contrast)] = run
            return run.prefill(contrast.branch_spec.inputs(self.model, inputs))
        return run.step(inputs["input_ids"])

    def run_forward(self, state: SeqState, inputs: dict, **extra) -> torch.Tensor:
        """One forward of the top model for a branch or an observation pass: only this session's handlers run,
        the main sequence's state is put back after. Returns the last position's logits (or the output)."""
        hf = self.model.hf
        inputs = _beam_images(inputs)
        saved, self.state, busy = self.state, state, self._busy
        self._busy = True
        try:
            self.begin({**inputs, **extra}, state=state)
            kw = seam.keep_logits(hf, dict(inputs, **extra), 1, override=False)
            with torch.no_grad(), exclusive(self._attachment):  # a capture open beside must not record the branch
                out = hf.forward(**kw)
        finally:
            self.state, self._busy = saved, busy
        logits = getattr(out, "logits", None)
        return logits[:, -1] if logits is not None else out

    def logits_processor(self, contrast: Contrast | None = None):
        """A `transformers.LogitsProcessor` applying a contrastive decoder outside this block's forward hook."""
        from .processor import ContrastiveProcessor

        contrast = contrast or (self._contrasts[0] if getattr(self, "_contrasts", None) else None)
        if contrast is None:
            raise SteerError("no contrastive decoder in this steer block")
        return ContrastiveProcessor(self.model, contrast)


def _sliced(st: SeqState, kwargs: dict, kept: torch.Tensor, cut) -> dict:
    """The block arguments `cut()` returns for `kept`, cut once per forward: every block of the stack gets the same
    position embeddings, mask and position ids objects, and the blocks after a pruning layer the same kept
    positions, so they share one cut (gathers and index copies once, not per layer). Changed entries only."""
    key = (kept, *(kwargs.get(k) for k in seam.BLOCK_ARGUMENTS))
    memo = st.sliced
    if memo is not None and memo[0] == st.version and all(a is b for a, b in zip(memo[1], key)):
        return memo[2]
    out = cut()
    changed = {k: v for k, v in out.items() if v is not kwargs.get(k)}
    st.sliced = (st.version, key, changed)
    return changed


def _raise(err):
    raise err


def _label(edit) -> str:
    return getattr(edit, "method", None) or type(edit).__name__


def _bind_observer(edit, heads):
    def observe(ctx, call, output):
        if edit.applies(ctx.state.branch):
            edit.observe(ctx, call, output, heads)
    return observe
