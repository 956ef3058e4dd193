"""`attnscope.capture`: record attention rows during any forward or generate call, backend untouched."""
from __future__ import annotations

import torch

from .. import __version__
from ..core import seam
from ..core.dispatch import AttentionCall, Handler, attach, excluded
from ..core.probs import as_rows, check_chunk
from ..core.ledger import Ledger, LedgerError, kept_positions
from ..core.tokens import CACHED_STREAMS, QUERY_STREAM, TokenMap
from ..core.sites import NoAttentionError
from ..models.roles import TokenMapError, fit_vision_maps, text_maps
from ..models.placement import placement
from ..models.wrapped import Model
from .selection import Selection, resolve_positions
from .stream import STREAMED_DTYPES, TraceWriter
from .summaries import Reducer, Summaries
from .checksums import tensor_checksum
from .continuation import Continuation
from .trace import Record, Run, Trace

_open_captures: set[int] = set()


def as_model(model) -> Model:
    return model if isinstance(model, Model) else Model(model)


class capture:
    """Context manager that records attention probabilities into a `Trace`.

    >>> with attnscope.capture(model, streams="text", layers=[0, -1], queries="last") as trace:
    ...     model(**model.encode("Attention is all you need"))
    >>> trace.attention("text", 5, head=0)        # [batch, queries, keys]

    Selections: `streams` (names), `layers` (ints, slice, "all"/None, or {stream: layers}), `heads`, `queries`/`keys`
    (positions, slices, or token roles such as "last", "image", "generated", "text"). Only modules in the
    selection compute anything beyond the original backend. `offload=True` moves each captured tensor to
    the CPU as soon as it is computed; `dtype` is the stored precision; `grad=True` keeps the captured
    probabilities in the autograd graph (for gradient-based explanations), otherwise they are detached.

    `out="trace_dir/"` streams the trace to disk: each record is written (safetensors shards, checksummed) as soon
    as it is computed and then read back from there on demand, so memory holds about one layer's rows however much
    is captured (see `stream.py`). The directory gets its metadata when the block ends, and is left marked
    INCOMPLETE if it raises; `Trace.load(dir)` opens it lazily. A non-empty directory is refused unless
    `overwrite=True`.

    `summaries=("role_mass", "lookback", "entropy", "topk")` (or "all") keeps per-row reductions computed inside
    each call instead of rows, `topk` keys each (default 5; passing it without the "topk" summary is an error), and
    the block yields a `Summaries` (`capture/summaries.py`)."""

    def __init__(self, model, streams=None, layers=None, heads=None, queries=None, keys=None,
                 offload: bool = False, dtype: torch.dtype = torch.float32, chunk: int = 256, grad: bool = False,
                 out=None, overwrite: bool = False, summaries=None, topk: int | None = None):
        check_chunk(chunk)  # before anything else: range() would give no chunk at all
        self.model = as_model(model)
        self.selection = Selection(streams, layers, heads, queries, keys)
        self.offload, self.dtype, self.chunk, self.grad = offload, dtype, chunk, grad
        if out is not None and grad:
            raise ValueError("grad=True keeps the probabilities in the autograd graph, which a trace on disk cannot "
                             "hold: capture in memory (out=None) for gradients")
        if out is not None and dtype not in STREAMED_DTYPES:
            raise ValueError(f"a streamed trace stores {[str(d) for d in STREAMED_DTYPES]}; got dtype={dtype}")
        self.out, self.overwrite = out, overwrite
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.trace = Trace()
        self.reducer = None
        if summaries is None and topk is not None:  # it would be ignored without a word
            raise ValueError(f"topk={topk!r} is the number of keys of the 'topk' summary, and rows are captured: pass "
                             "summaries=('topk', ...) (or 'all'), or drop topk=")
        if summaries is not None:  # reductions in place of rows
            if out is not None:
                raise ValueError("summaries are kept in memory (they hold no rows): drop out= and save them after the "
                                 "block with `.save(path)` (one file), or capture rows to stream them")
            if keys is not None:
                raise ValueError("summaries reduce over every key of a call; drop keys= (role_mass gives the mass per "
                                 "token role)")
            if grad or dtype != torch.float32:  # the reductions are float32 and outside the autograd graph
                raise ValueError(f"summaries are float32 numbers without gradients; drop "
                                 f"{'grad=True' if grad else f'dtype={dtype}'} (capture rows for that)")
            self.reducer, self.trace = Reducer(summaries, topk, chunk), Summaries()
            self.trace._reducer = self.reducer  # readers reduce what is still queued first
        self._attachment = None
        self._writer = None
        self._hooks = []

    # --- context -----------------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        hf = self.model.hf
        if id(hf) in _open_captures:
            raise RuntimeError("a capture is already open on this model; nested captures on one model are not supported")
        chosen = self.selection.sites(self.model.sites)  # validates before anything is touched
        if not chosen:  # streams=[], layers=[], layers={}, a spent generator: a trace with nothing in it
            sel = self.selection
            raise ValueError(f"streams={sel.streams!r}, layers={sel.layers!r} select no attention module, so capture "
                             f"would return an empty trace; this model's streams are {self.model.streams}: name at "
                             "least one layer, or leave streams= and layers= as None for all")
        self._head_list = {m: self.selection.head_indices(s) for m, s in chosen.items()}
        # every head in order needs no index (`_probs` passes None); index tensors are made when asked for
        self._all_heads = {m for m, h in self._head_list.items() if h == list(range(chosen[m].num_heads))}
        self._head_tensors = {}
        self._calls_this_forward, self._in_forward, self._pending = 0, False, None
        self._images = None  # the last sequence's image inputs (pixel values, grid): see `_before_forward`
        self._continuation = Continuation()  # no-cache generation: each step a new run (`continuation.py`)
        self._parts, self._bases = {}, {}
        self._placed = {}  # call shape -> positions resolved in this forward (`record`)
        self._ledger = Ledger(on_reorder=self._reorder)
        if self.out is not None:  # after the selection is validated: a bad selection creates no directory
            self._writer = TraceWriter(self.out, self.overwrite)
        try:
            self._hooks = [hf.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                           hf.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True)]
            self._hooks += [m.register_forward_pre_hook(self._before_vision, with_kwargs=True) for m in self._vision_roots()]
            self._hooks += [m.register_forward_pre_hook(self._before_encoder, with_kwargs=True) for m in self._encoder_roots()]
            self._attachment = attach(hf, {m: (s, _Recorder(self)) for m, s in chosen.items()})
            _open_captures.add(id(hf))
        except BaseException as err:
            self._close()
            self._finish(err)
            raise
        self.trace.provenance = {
            "model": self.model.name, "class": type(hf).__name__, "attnscope": __version__,
            "backend": {s.stream: seam.get_implementation(m.config) for m, s in _first_per_stream(chosen).items()},
            "dtype": str(self.dtype).removeprefix("torch."), "model_dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
            "selection": self.selection.to_dict(), "inputs": [], "streams": dict(self.model.streams),
        }
        self.trace.provenance["backend"] = {k: v.removeprefix("attnscope_") if v else v
                                            for k, v in self.trace.provenance["backend"].items()}
        placed = placement(hf)
        if placed:  # split with accelerate: modules per device ("disk": offloaded)
            self.trace.provenance["placement"] = placed
        return self.trace

    def __exit__(self, *exc) -> None:
        self._close()
        if self.reducer is not None:
            self.reducer.flush()
            self.trace._reducer = None
        if exc[0] is None and self.trace.runs and self._awaits_generated() and not any(
                r.records for r in self.trace.runs):  # "generated" selected, and nothing was generated
            error = self._selects_nothing(self.trace.runs[-1])
            self._finish(error)
            raise error
        if exc[0] is None and self.trace.runs:
            self.trace.provenance["weights"] = self.model.fingerprint
        self._finish(exc[1])

    def _awaits_generated(self) -> bool:
        """Whether the queries or keys name the generated tokens, which a prefill has none of (checked at the end)."""
        return any(spec == "generated" or isinstance(spec, list) and "generated" in spec
                   for spec in (self.selection.queries, self.selection.keys))

    def _selects_nothing(self, run) -> ValueError:
        roles = sorted({r for maps in run.tokens.values() for t in maps[:1] for r in t.roles})
        return ValueError(f"the selection queries={self.selection.queries!r}, keys={self.selection.keys!r} selects "
                          f"no position of this input (its roles: {roles}); capture would return an empty trace")

    def _finish(self, error) -> None:
        """A streamed trace gets its last shard and its metadata (partial, and marked, if the block raised)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.finish(self.trace, error)

    def _close(self) -> None:
        if getattr(self, "_continuation", None) is not None:
            self._continuation.reset()  # drops the last generate call's frame
        if getattr(self, "_ledger", None) is not None:
            self._ledger.close()
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        _open_captures.discard(id(self.model.hf))

    # --- hooks -------------------------------------------------------------------------------------------
    def _vision_roots(self):
        """Vision towers of a VLM: generate() may run them before the first forward (pre-encoding images)."""
        if self.model.spec.kind != "vlm":
            return []
        return [self.model.hf.get_submodule(p) for p, s in self.model.spec.streams.items() if s == "vision"]

    def _start_run(self, run: Run) -> Run:
        self.trace.runs.append(run)
        self._parts, self._bases = {}, {}
        self._calls_this_forward = 0
        self._placed.clear()
        return run

    def _encoder_roots(self):
        """An encoder-decoder's encoder: generate runs it once before the first forward of the decoder."""
        if self.model.spec.kind != "encdec":
            return []
        return [self.model.hf.get_submodule(p) for p, s in self.model.spec.streams.items() if s == "encoder"]

    def _before_encoder(self, module, args, kwargs):
        if self._in_forward or excluded(self._attachment):  # a steer block's branch forward is not this sequence
            return None
        ids = args[0] if args else kwargs.get(seam.INPUT_IDS)
        self._pending = {seam.INPUT_IDS: ids, seam.MASK: kwargs.get(seam.MASK)}
        self._start_run(Run(tokens=self.model.token_maps(self._pending)))
        return None

    def _before_vision(self, module, args, kwargs):
        if self._in_forward or excluded(self._attachment):
            return None
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        grid = kwargs.get("grid_thw", kwargs.get("image_grid_thw"))
        self._pending = {"pixel_values": pixel_values, "image_grid_thw": grid}
        self._start_run(Run(tokens=self.model.vision_token_maps(self._pending)))
        return None

    def _before_forward(self, module, args, kwargs):
        if excluded(self._attachment):
            return None
        self._in_forward = True
        self._placed.clear()  # positions resolved per call shape hold within one forward
        inputs = self.model.bind(args, kwargs)
        begin = self._ledger.begin(inputs, pruning=bool(kept_positions(self.model.hf, create=False)))
        if not begin.new and self.trace.runs:  # the next decode step of the sequence in flight
            self._continuation.reset()  # a cached step: no chain of no-cache forwards
            run = self.trace.runs[-1]
            run.steps += 1
            self._calls_this_forward = 0
            self._extend_tokens(run, seam.new_token_ids(inputs))
            self._note_length(run)
            return None
        pixels = inputs.get("pixel_values")
        bound, inputs = inputs, seam.without_cache(inputs)
        if self._pending is not None:  # the vision tower already ran for this sequence
            pixels = self._pending.get("pixel_values") if pixels is None else pixels
            if pixels is not None:
                self._images = {"pixel_values": pixels, "image_grid_thw": self._pending.get("image_grid_thw")}
            run = self.trace.runs[-1]
            run.tokens = self.model.token_maps({k: v for k, v in self._pending.items() if v is not None} |
                                               {k: v for k, v in inputs.items() if v is not None})
            self._pending = None
        else:
            if pixels is not None:
                self._images = {"pixel_values": pixels, "image_grid_thw": inputs.get("image_grid_thw")}
            elif (self.model.spec.kind == "vlm" and inputs.get(seam.ENCODED_IMAGES) is not None
                  and self._images is not None):
                # generate without a cache re-feeds the image features it encoded once (`mm_encoder_outputs`), not
                # the pixels: the image positions are labelled from the pixels that were encoded (as the steer
                # session does), not read as text
                pixels = self._images["pixel_values"]
                inputs = inputs | {k: v for k, v in self._images.items() if v is not None}
            run = self._start_run(Run(tokens=self.model.token_maps(inputs)))
        self._continuation.label(run, bound, begin.prefix, seam.generate_call())
        if begin.prefix:  # a cache filled before this block: those positions exist, their roles are unknown
            run.prefix = begin.prefix
            for stream in CACHED_STREAMS:
                if run.tokens.get(stream):
                    run.tokens[stream] = [TokenMap.unknown(begin.prefix).concat(t) for t in run.tokens[stream]]
        self._note_length(run)
        self._note_inputs(run, pixels)
        return None

    @staticmethod
    def _note_length(run: Run) -> None:
        maps = next((run.tokens[s] for s in CACHED_STREAMS if run.tokens.get(s)), None)
        if maps:
            run.lengths.append(len(maps[0]))

    def _reorder(self, beam_idx) -> None:
        """Beam search reordered the cache: each row's token maps now continue the beam it was given."""
        if not self.trace.runs:
            return
        run = self.trace.runs[-1]
        run.reorder(beam_idx.tolist(), CACHED_STREAMS)
        self._placed.clear()

    def _after_forward(self, module, args, kwargs, output):
        if excluded(self._attachment):
            return None
        self._in_forward = False
        if self.reducer is not None:  # every layer of this step was called: reduce them in one batch
            self.reducer.flush()
        if output is None:  # the forward raised; its own error is the one to see
            return None
        run = self.trace.runs[-1]
        if run.steps == 0 and self._calls_this_forward and not run.records and (
                self.selection.queries is not None or self.selection.keys is not None) and not self._awaits_generated():
            raise self._selects_nothing(run)
        if run.steps == 0 and self._calls_this_forward == 0 and self._head_list:
            raise NoAttentionError(
                f"{type(module).__name__} ran without calling the attention function of any selected module; its "
                "attention does not go through transformers' AttentionInterface for these inputs. Pass "
                "`attention_modules=` to attnscope.load/wrap, or select other streams"
            )
        return None

    def _extend_tokens(self, run: Run, input_ids) -> None:
        """One new token per row is a generated token; several (a new turn fed on top of the cache) are prompt
        text, labelled by the text role builder."""
        for stream in CACHED_STREAMS:
            maps = run.tokens.get(stream)
            if not maps or input_ids is None:
                continue
            tok = self.model.tokenizer
            if input_ids.shape[1] > 1:
                for tmap, added in zip(maps, text_maps(tok, input_ids, None)):
                    for role, token in zip(added.roles, added.tokens):
                        tmap.append(token, role)
                continue
            for tmap, ids in zip(maps, input_ids.tolist()):
                for tid in ids:
                    tmap.append(tok.convert_ids_to_tokens(tid) if tok is not None else str(tid))

    def _note_inputs(self, run: Run, pixels=None) -> None:
        for stream, maps in run.tokens.items():
            if stream in CACHED_STREAMS and maps and self.model.tokenizer is not None:
                self.trace.provenance["inputs"].append("".join(maps[0].tokens)[:2000])
        if isinstance(pixels, torch.Tensor):  # images: their model input's shape and a checksum identify them
            digest = tensor_checksum(pixels)  # XXH3: a pixel tensor is hashed at every prefill
            self.trace.provenance["inputs"].append(f"pixel_values {list(pixels.shape)} {digest['algorithm']}:{digest['digest']}")

    # --- the recorder called from the attention function ------------------------------------------------
    def record(self, call: AttentionCall, output) -> None:
        """Record the selected rows of one attention call.

        A module called several times in one step (Qwen2-VL's vision tower: once per image) gets parts 0, 1, ...
        and its calls are laid end to end, so positions stay absolute within the stream's token map."""
        self._calls_this_forward += 1
        if not self.trace.runs:  # an inner module called directly, outside the wrapped forward
            self._start_run(Run())
        run = self.trace.runs[-1]
        q_len, kv_len = call.query.shape[2], call.key.shape[2]
        tmaps = run.tokens.get(call.site.stream)
        where = f"{call.site.stream} layer {call.site.layer}: "
        if call.query.shape[1] != call.site.num_heads:  # every head passes as None: its labels come from the site
            raise ValueError(f"{where}{type(call.module).__name__} attends with {call.query.shape[1]} query heads, but "
                             f"had {call.site.num_heads} when the model was wrapped (its heads were changed since: "
                             "pruned or replaced); wrap it again (`attnscope.wrap(model.hf, model.tokenizer)`, or pass the "
                             "transformers model to capture) so the heads are read afresh")
        pruned = kept_positions(self.model.hf, create=False).get((call.site.stream, call.site.layer))
        if pruned is not None and call.site.stream in CACHED_STREAMS and pruned.shape[1] == kv_len:
            if pruned.shape[0] > 1 and not bool((pruned == pruned[:1]).all()):
                raise LedgerError(f"{where}token pruning kept different positions in each batch row; capture one row "
                                  "at a time to label its keys")
            return self._record_at(call, run, pruned[0].tolist(), tmaps)
        cached = call.site.stream in CACHED_STREAMS and self._ledger.length
        # every layer of a forward with the same call shape has the same positions: resolved once per forward
        shape = (call.site.stream, q_len, kv_len, self._ledger.length, len(tmaps[0]) if tmaps else -1)
        known = self._placed.get(shape) if cached else None
        if known is not None and known[0] is tmaps and known[1] is run:
            return self._record_placed(call, run, tmaps, *known[2:])
        if cached:  # positions from the ledger: windows, crops and prefix caches
            q_start, base = self._ledger.placed(q_len, kv_len, where)
            total = self._ledger.length
            part = 0
        elif call.site.stream in QUERY_STREAM and self._ledger.length:  # cross-attention: decoder rows, encoder keys
            q_start, base, total, part = self._ledger.length - q_len, 0, kv_len, 0
        else:  # no cache: a module called several times in one step lays its calls end to end
            counter = (call.module, run.steps)
            part, base = self._parts.get(counter, 0), self._bases.get(counter, 0)
            self._parts[counter], self._bases[counter] = part + 1, base + kv_len
            total = base + kv_len
            q_start = total - q_len
        if (tmaps and part == 0 and call.site.stream not in CACHED_STREAMS and len(tmaps[0]) != kv_len
                and len(tmaps[0].grids) == 1):  # one raster image per call: its prefix is what the tower produced
            tmaps = run.tokens[call.site.stream] = fit_vision_maps(tmaps, kv_len, self.model, where)
        exact = call.site.stream in CACHED_STREAMS or call.site.stream in QUERY_STREAM
        if tmaps and (len(tmaps[0]) < total or exact and len(tmaps[0]) != total):
            raise TokenMapError(f"{where}the token map has {len(tmaps[0])} entries but the call sees {total} positions; "
                                "attnscope will not label keys with a shifted map")
        total = max(len(tmaps[0]) if tmaps else 0, total)
        qmaps, q_total = tmaps, total
        if call.site.stream in QUERY_STREAM:
            qmaps, q_total = run.tokens.get(QUERY_STREAM[call.site.stream]), self._ledger.length
        queries = resolve_positions(self.selection.queries, qmaps, q_total, "queries")
        rows = list(range(q_len)) if queries is None else [p - q_start for p in queries if q_start <= p < q_start + q_len]
        keys = resolve_positions(self.selection.keys, tmaps, total, "keys")
        local_keys = None if keys is None else [p - base for p in keys if base <= p < base + kv_len]
        # selected keys a sliding window already evicted: exactly zero attention, recorded as such
        evicted = [] if keys is None or call.site.stream not in CACHED_STREAMS else [p for p in keys if p < base]
        if cached:
            self._placed[shape] = (tmaps, run, q_start, base, part, rows, local_keys, evicted)
        return self._record_placed(call, run, tmaps, q_start, base, part, rows, local_keys, evicted)

    def _record_placed(self, call: AttentionCall, run: Run, tmaps, q_start: int, base: int, part: int,
                       rows: list[int], local_keys: list[int] | None, evicted: list[int]) -> None:
        """Record a call whose query `rows` and key columns (`local_keys`, None: all; `evicted`: selected keys a
        sliding window dropped) are placed: queries from `q_start`, keys from `base`."""
        kv_len = call.key.shape[2]
        if not rows or (local_keys == [] and not evicted):
            return
        if self.reducer is not None:
            return self.reducer.record(run, call, self._heads_for(call.module), rows, [r + q_start for r in rows],
                                       range(base, base + kv_len), tmaps, part)
        if self._writer is not None and not evicted:  # a large record goes to disk a chunk of rows at a time
            n_keys = kv_len if local_keys is None else len(local_keys)
            shape = [call.query.shape[0], len(self._head_list[call.module]), len(rows), n_keys]
            if shape[0] * shape[1] * shape[2] * shape[3] * self._itemsize >= self._writer.shard_bytes:
                abs_keys = None if local_keys is None and base == 0 else [base + k for k in (local_keys or range(kv_len))]
                rec = Record(None, list(self._head_list[call.module]), [r + q_start for r in rows], abs_keys, run.steps, part)
                chunks = self._row_chunks(call, rows, local_keys, self._writer.buffers(shape, self.dtype))
                return self._keep(run, call, rec, (shape, chunks))
        probs = self._probs(call, rows, local_keys) if local_keys != [] else None
        abs_keys = None if local_keys is None and base == 0 else [base + k for k in (local_keys or range(kv_len))]
        if evicted:
            zeros = torch.zeros(call.query.shape[0], len(self._head_list[call.module]), len(rows), len(evicted),
                                dtype=self.dtype, device=call.query.device)
            probs = zeros if probs is None else torch.cat([zeros, probs], -1)
            abs_keys = evicted + (abs_keys if local_keys else [])
        if self.offload:
            probs = probs.to("cpu")  # blocking: a non-blocking copy to the host may be read before it lands
        self._keep(run, call, Record(probs, list(self._head_list[call.module]), [r + q_start for r in rows], abs_keys,
                                     run.steps, part))

    def _keep(self, run: Run, call: AttentionCall, rec: Record, rows=None) -> None:
        entries = run.records.setdefault((call.site.stream, call.site.layer), [])
        entries.append(rec)
        where = (len(self.trace.runs) - 1, call.site.stream, call.site.layer, len(entries) - 1, rec)
        if rows is not None:
            self._writer.add_rows(*where, rows[0], self.dtype, rows[1])
        elif self._writer is not None:
            self._writer.add(*where)

    def _row_chunks(self, call: AttentionCall, rows: list[int], keys: list[int] | None, buffer):
        """(first row, probs [B, H, chunk, K]) for consecutive chunks of `rows`, as `_probs` would compute them in one
        call (the same chunks, so the same bits), for a record streamed to disk; each computed in `buffer(rows)`, a
        tensor the writer hands out (`TraceWriter.buffers`)."""
        for start in range(0, len(rows), self.chunk):
            part = rows[start: start + self.chunk]
            with torch.no_grad():
                yield start, self._probs(call, part, keys, out=buffer(len(part)))

    def _record_at(self, call: AttentionCall, run: Run, key_pos: list[int], tmaps) -> None:
        """Record a call of a layer whose keys are the original positions `key_pos` (token pruning dropped the
        others; queries are the last of them)."""
        q_len = call.query.shape[2]
        total = len(tmaps[0]) if tmaps else self._ledger.length
        query_pos = key_pos[len(key_pos) - q_len:]
        queries = resolve_positions(self.selection.queries, tmaps, total, "queries")
        rows = list(range(q_len)) if queries is None else [i for i, p in enumerate(query_pos) if p in set(queries)]
        keys = resolve_positions(self.selection.keys, tmaps, total, "keys")
        local = list(range(len(key_pos))) if keys is None else [i for i, p in enumerate(key_pos) if p in set(keys)]
        if not rows or not local:
            return
        if self.reducer is not None:
            return self.reducer.record(run, call, self._heads_for(call.module), rows, [query_pos[r] for r in rows],
                                       key_pos, tmaps, 0)
        probs = self._probs(call, rows, None if keys is None else local)
        if self.offload:
            probs = probs.to("cpu")  # blocking: a non-blocking copy to the host may be read before it lands
        self._keep(run, call, Record(probs, list(self._head_list[call.module]), [query_pos[r] for r in rows],
                                     [key_pos[i] for i in local], run.steps, 0))

    def _head_index(self, module) -> torch.Tensor:
        """The selected heads of `module` as an index tensor (every head included), made once per block."""
        heads = self._head_tensors.get(module)
        if heads is None:
            heads = self._head_tensors[module] = torch.tensor(self._head_list[module])
        return heads

    def _heads_for(self, module) -> torch.Tensor | None:
        """The selected heads of `module`: None for every head (no index tensor built and read back per call)."""
        return None if module in self._all_heads else self._head_index(module)

    def _probs(self, call: AttentionCall, rows: list[int], keys: list[int] | None, out=None) -> torch.Tensor:
        # an edit may have computed the probabilities the model really used (call.probs or call.patches); every head
        # and a run of rows go as such (no index tensor built and read back per call)
        heads = self._heads_for(call.module)
        args = (heads, as_rows(rows), None if keys is None else torch.tensor(keys, dtype=torch.long))
        if torch.is_grad_enabled() and not self.grad:  # rows kept out of the graph unless grad=True
            with torch.no_grad():
                return call.probs_for(*args, chunk=self.chunk, dtype=self.dtype, out=out).to(self.dtype)
        return call.probs_for(*args, chunk=self.chunk, dtype=self.dtype, out=out).to(self.dtype)


def _first_per_stream(chosen: dict) -> dict:
    """The first selected module of each stream (one config read per stream, not per layer)."""
    first = {}
    for module, site in chosen.items():
        first.setdefault(site.stream, (module, site))
    return dict(first.values())


class _Recorder(Handler):
    def __init__(self, session: capture):
        self.session = session

    def observe(self, call: AttentionCall, output) -> None:
        self.session.record(call, output)
