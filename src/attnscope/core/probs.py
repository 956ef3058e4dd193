"""Recompute attention probability rows from q and k, exactly as an eager softmax would.

The backend (SDPA, flash, flex) never returns probabilities; this recomputes only the rows and heads asked
for, in query chunks, so a full [heads, Q, K] matrix exists only when it was requested."""
from __future__ import annotations

import numbers

import torch


def _scaling(module, query: torch.Tensor, kwargs: dict) -> float:
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    return query.shape[-1] ** -0.5 if scaling is None else float(scaling)


def _is_causal(module, kwargs: dict) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if flag is None else flag)


# Keywords an attention call may carry that do not change its probabilities, and those that do and are recomputed.
NEUTRAL = {"dropout", "scaling", "is_causal", "position_ids", "use_cache", "output_attentions", "output_router_logits",
           "encoder_hidden_states", "encoder_attention_mask", "cache_position", "position_embeddings", "cache",
           "past_key_values", "layer_idx", "output_hidden_states", "return_dict", "token_type_ids",
           "deterministic"}
RECOMPUTED = {"sliding_window", "softcap", "s_aux", "sinks", "position_bias"}
KNOWN = frozenset(NEUTRAL | RECOMPUTED)


class UnsupportedAttentionError(RuntimeError):
    """An attention call with a term the recomputation does not understand: attnscope refuses to guess."""


def check_terms(module, kwargs: dict) -> None:
    """Refuse any keyword the recomputation does not know (a packed-sequence layout, a new logit term): its
    probabilities would differ from the model's without a sign."""
    if kwargs.keys() <= KNOWN:  # the usual call: every keyword known (a set test in C, per attention call)
        return
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in KNOWN)
    if unknown:
        raise UnsupportedAttentionError(
            f"{type(module).__name__} passes {unknown} to its attention function; attnscope does not know how "
            f"{'it changes' if len(unknown) == 1 else 'they change'} the probabilities, so it will not recompute "
            "them. Capture other modules (`streams=`/`layers=`), or report the model family")


def sink_logits(module, kwargs: dict):
    """Per-head attention-sink logits [H] (gpt-oss `s_aux`/`sinks`): an extra softmax column that takes mass and
    is then dropped, so rows sum to less than 1."""
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    return None if sinks is None else sinks.reshape(-1)


def check_chunk(chunk) -> None:
    """`chunk`, the number of query rows computed at a time, must be a positive integer (a bool is not one)."""
    if type(chunk) is not int and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral)) or chunk < 1:
        raise ValueError(f"chunk is the number of query rows computed at a time: a positive integer, not {chunk!r}")


class RowRun(tuple):
    """A run of consecutive query rows (start, length): taken as a view, never through an index. Callers that know
    their rows are a run (a capture of the last row, of every row) pass one instead of an index tensor, so nothing is
    built and read back per attention call."""

    def __new__(cls, start: int, length: int):
        return super().__new__(cls, (start, length))

    @property
    def start(self) -> int:
        return self[0]

    @classmethod
    def of(cls, rows: list[int]) -> RowRun | None:
        """The run `rows` is (a non-empty list of consecutive ints), else None."""
        if not rows or rows[-1] - rows[0] != len(rows) - 1 or rows != list(range(rows[0], rows[0] + len(rows))):
            return None
        return cls(rows[0], len(rows))

    def index(self, device=None) -> torch.Tensor:
        return torch.arange(self[0], self[0] + self[1], device=device)


def as_rows(rows: list[int]) -> RowRun | torch.Tensor:
    """Query rows as `probs_for` takes them: a `RowRun` where consecutive (one row, every row), else an index tensor."""
    return RowRun.of(rows) or torch.tensor(rows, dtype=torch.long)


def as_index(selection, n: int, device) -> torch.Tensor:
    """A head or row selection as an index tensor on `device`: None (all `n`), a `RowRun` or an index tensor."""
    if selection is None:
        return torch.arange(n, device=device)
    return selection.index(device) if isinstance(selection, RowRun) else index_on(selection, device)


def _take(t: torch.Tensor, dim: int, rows) -> torch.Tensor:
    """`t`'s entries along `dim` at `rows`: a view for a run (`RowRun`), an index_select for an index tensor."""
    return t.narrow(dim, rows[0], rows[1]) if isinstance(rows, RowRun) else t.index_select(dim, rows)


def _run_start(index: torch.Tensor) -> int | None:
    """The first index when `index` is a non-empty run of consecutive indices on the CPU, else None (an index on
    another device is not read: that read would wait for its queue)."""
    if index.device.type != "cpu" or index.dim() != 1:
        return None
    run = RowRun.of(index.tolist())
    return None if run is None else run.start


def _mask_rows(mask: torch.Tensor, rows, heads: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    """Additive float mask for the chosen query rows (`RowRun` or an index) and heads (None: every head),
    broadcastable to [B, h, r, K]."""
    mask = mask[..., :kv_len]
    if mask.shape[1] > 1 and heads is not None:
        mask = mask.index_select(1, heads)
    mask = _take(mask, 2, rows) if mask.shape[2] > 1 else mask
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min
        )
    return mask.float()


def _is_range(index: torch.Tensor, start: int) -> bool:
    """Whether `index` is start, start + 1, ... (read on the CPU when it lives there)."""
    return index.cpu().tolist() == list(range(start, start + index.numel()))


def index_on(index: torch.Tensor, device) -> torch.Tensor:
    """`index` on `device`. A run of consecutive indices (every head, every row, the last row) is made there with
    `arange` instead of copied: PyTorch synchronises the stream after every blocking copy between the host and a
    GPU, which would make each attention call wait for the GPU's queue. Any other index goes by a non-blocking copy
    (staged from ordinary host memory at the call, so the host tensor may change afterwards)."""
    if index.device == torch.device(device) or index.numel() == 0:
        return index
    first = _run_start(index)
    if first is not None:
        return torch.arange(first, first + index.numel(), device=device, dtype=index.dtype)
    return index.to(device, non_blocking=index.device.type == "cpu")


def attention_probs(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    heads: torch.Tensor | None = None,
    rows: torch.Tensor | RowRun | None = None,
    keys: torch.Tensor | None = None,
    chunk: int = 256,
    logits: bool = False,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities [B, h, r, k] for query heads `heads`, query rows `rows` (indices into this call's
    queries, or a `RowRun`) and key columns `keys` (indices into this call's keys), computed in float32 and stored as `dtype`
    chunk by chunk (so a float16 result never has a float32 copy of its size); with `logits=True` the masked
    logits the softmax would see instead, in float32 (for edits that change them before the softmax).

    Handles scaling, boolean or additive masks, causal masking when the backend got no mask (bottom-right
    aligned, as with a KV cache), sliding windows passed as a kwarg, logit soft-capping, GQA/MQA, T5's additive
    `position_bias` and gpt-oss's attention sinks (with `logits=True` sinks are refused: a caller that edits
    logits would have to renormalise with them). Any other keyword raises `UnsupportedAttentionError`.

    `out` (contiguous, [B, h, r, k] in `dtype`, rows within one chunk): the probabilities are written there and it is
    returned. For every key column in float32 on the query's device the scores are computed in it and the softmax runs in place (no block
    of the chunk's size is allocated: what a streamed capture hands its writer); otherwise the result is copied in.
    The same kernels run either way, so the bits are the same."""
    check_terms(module, kwargs)
    check_chunk(chunk)
    batch, n_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    device = query.device
    # what the Python side needs from `heads` and `rows` is read before they move to the device: on a GPU every read
    # of a device tensor waits for the queue to drain. A run of consecutive rows (every row, the last row) is taken as
    # a view of the queries, and every head needs no index at all: no index kernel, no index made on the device
    all_heads = heads is None or heads.numel() == n_heads and _is_range(heads, 0)
    if isinstance(rows, RowRun):
        if rows[1] < 1 or rows[0] < 0 or rows[0] + rows[1] > q_len:
            raise IndexError(f"rows {rows[0]}..{rows[0] + rows[1] - 1} are not within this call's {q_len} queries")
        row_start, n_rows = rows
    else:
        row_start = 0 if rows is None else _run_start(rows)
        n_rows = q_len if rows is None else rows.numel()
    last_row_only = n_rows == 1 and row_start == q_len - 1
    heads = None if all_heads else index_on(heads, device)
    rows = None if row_start is not None else index_on(rows, device)
    n_sel = n_heads if heads is None else heads.numel()
    groups = n_heads // key.shape[1]
    # every head: multiply each key head with its group of query heads, without copying the keys per head
    k_sel = key.float() if all_heads else key.index_select(1, heads // groups).float()
    scaling = _scaling(module, query, kwargs)
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window") if attention_mask is None else None
    causal = attention_mask is None and _is_causal(module, kwargs)
    bias = kwargs.get("position_bias")
    sinks = sink_logits(module, kwargs)
    if sinks is not None and logits:
        raise UnsupportedAttentionError(f"{type(module).__name__} has attention sinks; edits of its logits are not "
                                        "supported (captures are): steer other modules")
    min_value = torch.finfo(torch.float32).min

    n_keys = kv_len if keys is None else keys.numel()
    keys = None if keys is None else index_on(keys, device)
    out_dtype = torch.float32 if logits else dtype
    single = 0 < n_rows <= chunk  # one block: returned as it is
    # a causal mask hides nothing from the final query row (bottom-right aligned): skip it when that is all we have
    unmasked = window is None and (q_len == 1 or last_row_only)
    if out is not None:
        wrong = [] if isinstance(out, torch.Tensor) else [f"a {type(out).__name__}, not a tensor"]
        wrong += [] if wrong or single else [f"{n_rows} rows: out= takes 1 to chunk={chunk} rows"]
        wrong += [] if wrong or out.is_contiguous() else ["not contiguous"]
        wrong += [] if wrong or out.dtype == out_dtype else [f"{out.dtype}"]
        wrong += [] if wrong or list(out.shape) == [batch, n_sel, n_rows, n_keys] else [f"shape {list(out.shape)}"]
        if wrong:
            raise ValueError(f"out= must be a contiguous {out_dtype} tensor {[batch, n_sel, n_rows, n_keys]} of 1 to "
                             f"chunk={chunk} rows; got {wrong[0]}")
    into = (out if out is not None and keys is None and sinks is None and not logits and out_dtype == torch.float32
            and out.device == device and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
            else None)  # matmul/softmax with out= refuse inputs that need a gradient: those are computed, then copied
    given, out = out, None if single else torch.empty(batch, n_sel, n_rows, n_keys, dtype=out_dtype, device=device)
    for start in range(0, n_rows, chunk):  # one [B, h, chunk, K] score block at a time, edited in place
        n = min(chunk, n_rows - start)
        block = RowRun(row_start + start, n) if rows is None else rows[start : start + chunk]  # this chunk's query rows
        q = _take(query, 2, block)  # rows first: only these rows are copied (a run is a view)
        q = (q if heads is None else q.index_select(1, heads)).float()
        if all_heads and groups > 1:
            q = q.reshape(batch, key.shape[1], groups * n, q.shape[-1])
            target = None if into is None else into.view(batch, key.shape[1], groups * n, kv_len)
            scores = torch.matmul(q, k_sel.transpose(-1, -2), out=target).view(batch, n_heads, n, kv_len).mul_(scaling)
        else:
            scores = torch.matmul(q, k_sel.transpose(-1, -2), out=into).mul_(scaling)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if bias is not None:
            scores = scores.add_(_mask_rows(bias, block, heads, kv_len))
        if attention_mask is not None:
            scores = scores.add_(_mask_rows(attention_mask, block, heads, kv_len))
        if (causal or window) and not unmasked:
            r = torch.arange(block.start, block.start + n, device=device) if isinstance(block, RowRun) else block
            q_pos = (kv_len - q_len + r)[:, None]
            key_pos = torch.arange(kv_len, device=device)
            allowed = torch.ones(n, kv_len, dtype=torch.bool, device=device)
            if causal:
                allowed &= key_pos[None, :] <= q_pos
            if window:
                allowed &= key_pos[None, :] > q_pos - window
            scores = scores.masked_fill_(~allowed, min_value)
        if logits:
            probs = scores
        elif sinks is not None:
            col = sinks.to(device).float()
            col = (col if heads is None else col.index_select(0, heads))[None, :, None, None].expand(batch, -1, n, 1)
            probs = torch.softmax(torch.cat([scores, col], -1), dim=-1)[..., :-1]
        elif into is not None:
            return torch.softmax(scores, dim=-1, out=into)  # in place: the scores were computed in `out`
        else:
            probs = torch.softmax(scores, dim=-1)
        probs = probs if keys is None else probs.index_select(-1, keys)
        if given is not None:
            return given.copy_(probs)
        if single:
            return probs.to(out_dtype).contiguous()
        out[:, :, start : start + n] = probs
    return out


def plain_rows(module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict,
               heads: torch.Tensor | None, rows: list[int]) -> float | None:
    """The scaling where `attention_probs` of these rows is nothing but softmax(scaling * q k^T) (every head in order:
    `heads` None or 0, 1, ...; no mask, no extra logit term, no causal mask that could hide a key from these rows),
    so that `stacked_probs` may compute them together with other calls'; else None. Raises on unknown terms as
    `attention_probs` does."""
    check_terms(module, kwargs)
    if attention_mask is not None or any(kwargs[k] is not None for k in kwargs.keys() & RECOMPUTED):
        return None
    n_heads, q_len = query.shape[1], query.shape[2]
    if n_heads % key.shape[1] or heads is not None and (heads.numel() != n_heads or not _is_range(heads, 0)):
        return None
    if _is_causal(module, kwargs) and not (q_len == 1 or rows == [q_len - 1]):
        return None
    return _scaling(module, query, kwargs)


def stacked_probs(queries: list[torch.Tensor], keys: list[torch.Tensor], scalings: list[float]) -> torch.Tensor:
    """Probabilities [L, B, H, r, K] of L calls that `plain_rows` accepted, with the same shapes, from their query
    rows [B, H, r, D] and keys [B, Hkv, K, D]: a product per call (the keys are not copied), then one scaling and one
    softmax for all (the same float32 operations as `attention_probs`, per call)."""
    batch, n_heads, r, _ = queries[0].shape
    kv_heads, kv_len = keys[0].shape[1], keys[0].shape[2]
    group = n_heads // kv_heads * r  # each key head with its group of query heads, without copying the keys per head
    if queries[0].dtype != torch.float32 or keys[0].dtype != torch.float32:
        queries, keys = [q.float() for q in queries], [k.float() for k in keys]
    if kv_heads != n_heads:
        queries = [q.reshape(batch, kv_heads, group, -1) for q in queries]
    scores = torch.stack([torch.matmul(q, k.mT) for q, k in zip(queries, keys)])
    scores = scores.view(len(scores), batch, n_heads, r, kv_len)
    if len(set(scalings)) == 1:
        scores = scores.mul_(scalings[0])
    else:
        scores = scores.mul_(torch.tensor(scalings, dtype=torch.float32, device=scores.device).view(-1, 1, 1, 1, 1))
    return torch.softmax(scores, dim=-1)
