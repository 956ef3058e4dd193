"""The weights fingerprint of a `Model`: a blake2b hash over every parameter's and buffer's name, shape, dtype and bytes
(`weights`: the `state_dict()`, then every buffer it leaves out: non-persistent ones such as RoPE's `inv_freq`, which a
context-extension experiment edits in place, position ids, causal masks), recomputed only when the weights changed.
Everything said below of a parameter holds for a buffer, persistent or not. Tensors only: a module's other
attributes (RoPE's `attention_scaling`, an attention's `scaling`, a norm's epsilon), its class and its code are not
covered, and an edit of them leaves the fingerprint as it was.

Hashing reads every byte (seconds for a 7B model), and the fingerprint is asked for at the end of every capture
block, so `fingerprint` keeps the hash, per module, with a `key` of the weights that reads no bytes but a small
sample: per tensor its name, identity, PyTorch's write counter (`_version`: counts in-place writes such as an
optimizer step, `load_state_dict`, `p.mul_` under `no_grad`), storage address, shape, strides, dtype and device,
plus `SAMPLE` or more of its elements evenly spaced through its memory, at least one in every row and in every column
(a tensor under several names, tied weights, is keyed under each and sampled once).
The sample catches writes through `p.data` (PyTorch gives `.data` a counter of its own, so those writes leave
`_version` alone) that touch a sampled element: any dense write (`p.data.add_`, `copy_`, a rank-one edit), any write
of whole rows (a token's embedding, an output unit) and of whole columns (a neuron zeroed in a down projection, an
embedding dimension); a write of a few elements through `.data` may go unseen:
`Model.refresh_fingerprint()` then hashes again. Offloaded weights (accelerate leaves them on the meta device between
forwards and swaps in new meta tensors at each forward; buffers only with `offload_buffers`, non-persistent ones never)
are keyed by name, shape and dtype and by what tells their stored bytes changed without reading them
(`placement.stamp`: an offload file's inode, size and times; a tensor accelerate holds in memory by identity, write
counter and address): their bytes are read from the weights map (`placement.stored`) only when hashing. Where a
weights map is of a kind `placement` does not know (or holds an inference tensor, which has no write counter), the
stamp is a digest of that tensor's bytes, read at every fingerprint read. An edit of an offload file (or of a
tensor the weights map holds) after the placement changes the fingerprint; one within the file system's timestamp
granularity of the last read, or through `.data`, needs `Model.refresh_fingerprint()`.

Building the key walks `weights` and samples every tensor (about 10 ms of host time on a 7B model, a fifth of a
GPU prefill), so the key is compared through a plan kept with it (`fingerprint_plan.py`): the same structure, the
same tensor objects with the same counters and layouts, and the same sampled bytes read through views kept of each
tensor's storage, all checked without `state_dict()`. Whatever the plan does not find the same, or cannot check (meta
or inference tensors, state-dict hooks), takes the full walk, which builds a new plan."""
from __future__ import annotations

import hashlib
import math
import threading
import warnings
from contextlib import contextmanager
from typing import NamedTuple
from weakref import WeakKeyDictionary

import torch
from torch import nn

from .fingerprint_plan import Plan, build
from .placement import stamp, stored

SAMPLE = 1024  # elements sampled per tensor for the key


def _buffers(module: nn.Module, prefix: str = ""):
    """(dotted name, buffer) for every buffer under `module`, walked as `state_dict()` walks (`_modules` in order, a
    module under each of its names): `named_buffers(remove_duplicate=False)`'s names and order."""
    for name, buffer in module._buffers.items():
        if buffer is not None:
            yield prefix + name, buffer
    for name, child in module._modules.items():
        if child is not None:
            yield from _buffers(child, f"{prefix}{name}.")


def weights(hf: nn.Module) -> dict:
    """What the fingerprint covers: `state_dict(keep_vars=True)`, then every buffer it does not hold under its name
    (the non-persistent ones), named ("buffer", dotted name): no state_dict name (a string) equals it, and a buffer
    made persistent, or not, changes its name. The fast check (fingerprint_plan.py) follows both walks."""
    state = hf.state_dict(keep_vars=True)
    left_out = {("buffer", name): b for name, b in _buffers(hf) if state.get(name) is not b}
    return {**state, **left_out}


def weights_hash(hf: nn.Module, state: dict) -> str:
    """blake2b over parameter and buffer names, shapes, dtypes and bytes (`weights`; offloaded ones read from the
    weights map)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        if tensor.device.type == "meta":  # offloaded: the real bytes sit in accelerate's weights map
            tensor = stored(hf, name if isinstance(name, str) else name[1])
            if tensor is None:
                return "unavailable: offloaded weights without a readable weights map"
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # read in place
    return digest.hexdigest()


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """At least SAMPLE elements of `tensor` (or all), evenly spaced through its memory, with one at least in every row
    (a slice along its first dimension of more than one: an embedding's token, a projection's output unit) and in
    every column (an embedding's dimension, a projection's input unit: a neuron's weights in a down projection): a
    view whose step is no longer than a row nor than the number of rows and prime to the row's length, so that the
    sampled elements' columns go through every column. A permuted layout (channels_last, a transposed matrix) is read
    in memory order (its rows: the dimension of the largest stride). Any other layout: a grid over its dimensions (a
    copy of about SAMPLE elements)."""
    if not tensor.is_contiguous():  # a permuted layout (channels_last, a transpose): its dimensions in memory order
        permuted = tensor.permute(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
        tensor = permuted if permuted.is_contiguous() else tensor
    if tensor.is_contiguous():
        numel, dims = tensor.numel(), list(tensor.shape)
        while len(dims) > 1 and dims[0] == 1:  # [1, N, D] (a position embedding): its rows are the N
            dims.pop(0)
        rows = dims[0] if len(dims) > 1 else numel
        row = numel // max(1, rows)
        step = max(1, min(numel // SAMPLE, row, rows))
        while math.gcd(step, row) != 1:
            step -= 1
        return tensor.view(-1)[::step]
    per_dim = math.ceil(SAMPLE ** (1 / tensor.dim()))
    return tensor[tuple(slice(None, None, max(1, size // per_dim)) for size in tensor.shape)].reshape(-1)


def _walk(state: dict) -> tuple[tuple | None, dict]:
    """The key of `state` (`weights_key`) and its sample views, per device and dtype, each with its tensor. A tensor
    under several names (tied weights: an embedding and the LM head) is keyed under each name and sampled once."""
    entries, views, seen = [], {}, set()
    for name, t in state.items():
        if t.device.type == "meta":
            entries.append((name, tuple(t.shape), t.dtype, "meta"))
            continue
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: no write counter
            return None, {}
        entries.append((name, id(t), version, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                        t.device))
        place = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)  # the same memory read the same way
        if t.numel() and place not in seen:
            seen.add(place)
            views.setdefault((t.device, t.dtype), []).append((t, _sample(t.detach())))
    # one copy per device and dtype, read as bytes (so NaN equals NaN); compared on the device, one read of a flag
    sampled = {where: torch.cat([view for _, view in pairs]).view(torch.uint8) for where, pairs in views.items()}
    return (tuple(entries), sampled), views


def weights_key(state: dict) -> tuple | None:
    """What identifies the weights without reading them (see the module docstring); None where PyTorch counts no
    writes (inference tensors), so the caller hashes every time."""
    return _walk(state)[0]


def _stamped(key: tuple | None, hf: nn.Module, state: dict) -> tuple | None:
    """`key` with, for every offloaded (meta) tensor, what tells its stored bytes changed (`placement.stamp`: its
    offload file's inode, size and times; a tensor the weights map holds, by identity, write counter and address; the
    digest of its bytes where neither can be told: a weights map of a kind not known there, an inference tensor): the
    meta tensor itself holds no bytes, and accelerate swaps in new ones at each forward."""
    if key is None:
        return None
    offloaded = [name for name, t in state.items() if t.device.type == "meta"]
    if not offloaded:
        return key
    modules = dict(hf.named_modules(remove_duplicate=False))  # a module under several names: under each
    stamps = tuple((name, stamp(hf, name if isinstance(name, str) else name[1], modules)) for name in offloaded)
    return key[0] + stamps, key[1]


def same_key(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None or a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    return all(torch.equal(a[1][where], b[1][where]) for where in a[1])


class _Kept(NamedTuple):
    key: tuple | None
    digest: str
    plan: Plan | None  # the fast check of `key` (fingerprint_plan.py); None: every read takes the full walk


_KEPT: WeakKeyDictionary = WeakKeyDictionary()  # module -> _Kept: every `Model` wrapping it shares them


_FROZEN: WeakKeyDictionary = WeakKeyDictionary()  # module -> {thread: how many `frozen` blocks it has open on it}
_UNCOUNTED: WeakKeyDictionary = WeakKeyDictionary()  # module -> threads whose reads inside `frozen` may have been stale


def _frozen_here(hf: nn.Module) -> int:
    """How many `frozen` blocks this thread has open on `hf` (another thread's block leaves this one's reads full)."""
    return _FROZEN.get(hf, {}).get(threading.get_ident(), 0)


def _uncounted(kept: _Kept | None) -> bool:
    """Whether the kept plan's sample shows a write PyTorch did not count since the plan was built."""
    if kept is None or kept.plan is None:
        return False
    try:
        return kept.plan.uncounted()
    except (AttributeError, RuntimeError, TypeError):
        return True


def _unchanged(hf: nn.Module, kept: _Kept | None) -> bool:
    if kept is None or kept.plan is None:
        return False
    try:
        return kept.plan.unchanged(hf, sampled=not _frozen_here(hf))
    except (AttributeError, RuntimeError, TypeError):  # something the plan did not expect: the full walk decides
        return False


def fingerprint(hf: nn.Module) -> str:
    """The weights' hash, kept per module (a model wrapped again, as `capture(hf_model)` does, is not hashed again)
    while the kept plan (fingerprint_plan.py), or else `weights_key` on a full walk, says they did not change."""
    with torch.no_grad():
        kept = _KEPT.get(hf)
        if _unchanged(hf, kept):
            return kept.digest
        if _FROZEN.get(hf) and _uncounted(kept):  # reads since the plan was built skipped the sample: remember it
            _UNCOUNTED.setdefault(hf, set()).update(_FROZEN[hf])
        state = weights(hf)
        key, views = _walk(state)
        key = _stamped(key, hf, state)
        digest = kept.digest if kept is not None and same_key(key, kept.key) else weights_hash(hf, state)
        _KEPT[hf] = _Kept(key, digest, build(hf, state, views) if key is not None else None)
    return digest


class WeightsChangedError(RuntimeError):
    """Weights were written inside `frozen` in a way only the sampled bytes show (through `.data`): fingerprints read
    inside after that write named the weights from before it."""


@contextmanager
def frozen(hf: nn.Module):
    """A block in which the weights are declared unchanged but for writes PyTorch counts: a fingerprint read inside
    (every capture block's end) checks the structure, identities, write counters and layouts, not the sampled bytes,
    whose copy touches about every memory page of the weights (8 ms on scene-vlm on the CPU, per read). A dataset-scale
    run with one capture per item reads it once per item. The full check runs when the block opens and when it ends;
    if only the sampled bytes show a change at the end (a write through `.data` inside, which the reads inside could
    not see), `WeightsChangedError` is raised (a warning instead where the block raised): traces captured after that
    write carry the fingerprint from before it. A read inside that a counted write or a structural change sends to the
    full walk first looks for such a write in the sample (that walk's new hash would hide it by the end); a counted
    write with no read after it inside is no error. Not seen: an uncounted write to a storage a counted write (or a
    replaced tensor) then also changes before the block ends. Nested blocks check at the outermost's ends. The block
    belongs to its thread: another thread's reads meanwhile compare the sample (a write there through `.data` still
    raises here at the end), but everything its own thread runs before the block ends is inside it, code that runs
    while a generator holding the block is suspended included. Where the block itself raised, its error goes on
    with the message as a note (and a warning, unless warnings are raised as errors). Yields the fingerprint."""
    me = threading.get_ident()
    outer = not _frozen_here(hf)
    digest = fingerprint(hf) if outer else None
    _FROZEN.setdefault(hf, {})[me] = _frozen_here(hf) + 1
    error = None
    try:
        yield digest if outer else fingerprint(hf)
    except BaseException as err:
        error = err
        raise
    finally:
        depths = _FROZEN.get(hf, {})
        depths[me] = depths.get(me, 1) - 1
        if not depths[me]:
            del depths[me]
        if not depths:
            _FROZEN.pop(hf, None)
        if outer:
            # an uncounted write since the last full walk, or one a full walk inside found (after a counted write or
            # a structural change, which would otherwise hide it); a counted write after the last read is not one
            stale = _UNCOUNTED.get(hf, set())
            changed = me in stale
            stale.discard(me)
            if not stale:
                _UNCOUNTED.pop(hf, None)
            changed = changed or _uncounted(_KEPT.get(hf))
            fingerprint(hf)  # the full check: the fingerprint is the bytes' own again after the block
            if changed:
                message = ("the weights were written inside frozen_weights() in a way PyTorch does not count (through "
                           "`.data`, or memory shared with numpy): fingerprints read inside after that write, such as "
                           "a capture's provenance['weights'], name the weights from before it. Write under "
                           "torch.no_grad() without `.data`, call refresh_fingerprint() after such a write, or leave "
                           "the weights unfrozen")
                if error is None:
                    raise WeightsChangedError(message)
                error.add_note(message)  # the block's own error goes on, and says it in its traceback
                try:
                    warnings.warn(message, stacklevel=3)
                except Warning:  # warnings raised as errors: the block's own error stays the one raised
                    pass


def forget(hf: nn.Module) -> None:
    """Drop the kept hash: the next `fingerprint(hf)` reads every byte again."""
    _KEPT.pop(hf, None)


def release(hf: nn.Module) -> None:
    """Drop the kept plan, keep the hash: the views the plan holds let go of storages the module no longer uses (the
    module was just moved or placed); the next `fingerprint(hf)` takes the full walk."""
    kept = _KEPT.get(hf)
    if kept is not None:
        _KEPT[hf] = kept._replace(plan=None)
