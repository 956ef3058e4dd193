#!/usr/bin/env python
"""Benchmark full-matrix capture streamed to disk (`capture(..., out=dir)`) against eager + `output_attentions`.

    flock /tmp/attnscope-heavy.lock python bench/stream.py        # 1k, 2k and 4k tokens -> bench/results/stream.md/.json
    python bench/stream.py --small     # 64 tokens, one round, memory of eager+oa and stream fp16 only (CI smoke run)

SmolLM2-135M, every layer and head, every query row. Configurations: a plain SDPA forward, eager +
`output_attentions=True` (float32, what the eager tools do: the 1.0x baseline, every matrix held in memory, nothing
written), eager + output_attentions then saved with a checksum per tensor (context: the eager way onto disk), and the
streamed capture storing float32 or float16.
Peak memory: one fresh subprocess per configuration and length; after a warm-up call on a tiny input, VmHWM is reset
to the current RSS and the peak increase of the measured call is read (the same rule as bench/capture.py); the
absolute peak RSS is reported beside it. Each cell runs twice: with `MALLOC_MMAP_THRESHOLD_=65536` (RSS follows live
tensors) and with glibc's default malloc (what a user sees), each ratio against eager under the same allocator. Time: configurations interleaved in a shuffled order each round in one
process; each ratio is the median over rounds of (config time / eager time in that round). Eager + output_attentions
runs only where its attention tensors (layers x heads x L^2 x 4 bytes) fit under `--eager-limit-gb`; beyond, the
need is computed and the peak extrapolated from the lengths it ran at (stated as such in the results)."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from capture import machine, make_inputs, status_kb, trim  # noqa: E402  (shared bench helpers)

RESULTS = HERE / "results"
MODEL = "smollm2-135m"
CONFIGS = ["sdpa", "eager+oa", "eager+oa+save", "stream fp32", "stream fp16"]
TIMED_ONLY = {"eager+oa+save"}  # eager, then its attentions written to disk with a checksum each (what a file costs)
MMAP_THRESHOLD = 65536
SMALL = 64  # tokens of the --small run


def load():
    import attnscope

    return attnscope.load(MODEL)


def inputs(m, n: int) -> dict:
    return make_inputs(m, "smollm2-1024", n)


def call(m, x: dict, name: str, out_dir: Path):
    """One measured call; eager must already be switched on for 'eager+oa' (switching is not timed)."""
    import torch

    import attnscope

    if name == "sdpa":
        return m(**x)
    if name == "eager+oa":
        return m(**x, output_attentions=True)
    if name == "eager+oa+save":
        from safetensors.torch import save_file

        from attnscope.capture.checksums import tensor_checksum

        out = m(**x, output_attentions=True)
        tensors = {str(i): a.contiguous() for i, a in enumerate(out.attentions)}
        out_dir.mkdir(parents=True, exist_ok=True)  # the same checksum as the streamed trace's (XXH3-128)
        sums = {k: tensor_checksum(t)["digest"] for k, t in tensors.items()}
        save_file(tensors, str(out_dir / "eager.safetensors"), metadata=sums)
        return out
    dtype = torch.float16 if name.endswith("fp16") else torch.float32
    with attnscope.capture(m, queries=None, dtype=dtype, out=out_dir, overwrite=True) as trace:
        m(**x)
    return trace


def switch(m, name: str, on: bool) -> None:
    if name.startswith("eager"):
        m.hf.set_attn_implementation("eager" if on else "sdpa")


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else 0


def eager_need(layers: int, heads: int, n: int) -> int:
    """Bytes of the attention tensors eager + output_attentions returns (float32): they all exist at once."""
    return layers * heads * n * n * 4


# --- memory: one fresh subprocess per configuration ---------------------------------------------------------
def mem_child(n: int, name: str, threads: int, scratch: str) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    m = load()
    x, tiny = inputs(m, n), inputs(m, 16)
    out_dir = Path(scratch) / f"mem-{name.replace(' ', '-')}-{n}"
    switch(m, name, True)
    warm = call(m, tiny, name, out_dir)  # code paths, lazy init, the weight fingerprint
    del warm
    trim()
    before = status_kb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    out = call(m, x, name, out_dir)
    dt = time.perf_counter() - t0
    after = status_kb()
    stored = disk_bytes(out_dir) if name.startswith("stream") else sum(a.numel() * a.element_size() for a in out.attentions or ())
    shutil.rmtree(out_dir, ignore_errors=True)
    print("MEMJSON" + json.dumps({"rss_before_kb": before, "hwm_kb": after["VmHWM"],
                                  "peak_increase_kb": after["VmHWM"] - before, "stored_bytes": stored, "seconds": dt}))


def run_mem(n: int, name: str, threads: int, scratch: Path, default_malloc: bool = False) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": str(threads),
                        "PYTHONPATH": str(HERE.parent / "src")}
    if default_malloc:
        env.pop("MALLOC_MMAP_THRESHOLD_")
    proc = subprocess.run([sys.executable, __file__, "--mem", str(n), name, "--threads", str(threads),
                           "--scratch", str(scratch)], capture_output=True, text=True, env=env, cwd=HERE.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[len("MEMJSON"):])


# --- time and values: one process, interleaved ---------------------------------------------------------------
def time_length(m, n: int, names: list[str], warm: int, rounds: int, scratch: Path, seed: int = 0) -> dict:
    x = inputs(m, n)
    times = {name: [] for name in names}
    rng = random.Random(seed)
    for r in range(warm + rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            switch(m, name, True)
            trim()
            t0 = time.perf_counter()
            out = call(m, x, name, scratch / "timed")
            dt = time.perf_counter() - t0
            switch(m, name, False)
            del out
            shutil.rmtree(scratch / "timed", ignore_errors=True)
            if r >= warm:
                times[name].append(dt)
    return times


def ratios(times: dict, name: str, base: str) -> dict:
    rs = [a / b for a, b in zip(times[name], times[base])]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def check_values(m, n: int, scratch: Path) -> dict:
    """Max abs difference of the streamed trace (read back lazily from disk) against eager output_attentions."""
    import attnscope

    x = inputs(m, n)
    switch(m, "eager+oa", True)
    eager = call(m, x, "eager+oa", scratch).attentions
    switch(m, "eager+oa", False)
    out = {}
    for name in ("stream fp32", "stream fp16"):
        call(m, x, name, scratch / "values")
        trace = attnscope.Trace.load(scratch / "values")
        diffs = [(trace.attention("text", layer).float() - ref).abs().max().item() for layer, ref in enumerate(eager)]
        out[name] = {"layer0": diffs[0], "all_layers": max(diffs)}
        shutil.rmtree(scratch / "values", ignore_errors=True)
    out["layers"], out["heads"] = len(eager), int(eager[0].shape[1])
    return out


def checksum_rates(size: int = 256 << 20) -> dict:
    """GB/s (one core) of the checksum every streamed byte goes through (XXH3-128, fed 1 MiB pieces as the writer
    feeds row blocks) and of blake2b (what streamed shards used before), measured here."""
    import torch

    from attnscope.capture.checksums import TensorDigest

    data = torch.randint(0, 255, (size >> 20, 1 << 20), dtype=torch.uint8)
    out = {}
    for algorithm in ("xxh3_128", "blake2b"):
        t0 = time.perf_counter()
        digest = TensorDigest(data.dtype, data.shape, algorithm)
        for row in data:
            digest.update(row)
        digest.entry()
        out[algorithm] = size / 1e9 / (time.perf_counter() - t0)
    return out


def page_cache_cost(scratch: Path, shards: int = 16, shard: int = 32 << 20, pause: float = 3.0) -> dict:
    """CPU seconds per GB of writing shards with pwrite (1 MiB pieces), left in the page cache vs written through
    (`shard_io.write_through`: flushed and dropped once 64 MiB more were written, as the writer does) vs by direct I/O
    from one page-aligned buffer (`shard_io.write_piece`, what the writer does for a full matrix's aligned rows; None
    where the file system has no direct I/O)."""
    import torch

    from attnscope.capture import shard_io, stream

    piece = torch.rand(1 << 18).view(torch.uint8).numpy()  # 1 MiB
    raw = torch.empty((1 << 20) + shard_io.ALIGN, dtype=torch.uint8)
    aligned = raw[-raw.data_ptr() % shard_io.ALIGN:][: 1 << 20].copy_(torch.from_numpy(piece))
    out = {}
    for mode in ("page cache", "write-through", "direct"):
        time.sleep(pause)  # freed pages left alone for a while, as between runs
        paths, c0 = [], time.process_time()
        for i in range(shards):
            path = scratch / f"pc-{i}.bin"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            direct = shard_io.open_direct(path) if mode == "direct" else None
            if mode == "direct" and direct is None:
                os.close(fd)
                break
            for off in range(0, shard, len(piece)):
                if direct is None:
                    os.pwrite(fd, piece, off)
                else:
                    direct = shard_io.write_piece(fd, direct, aligned, off)
            for f in {fd, direct} - {None}:
                os.close(f)
            paths.append(path)
            if mode != "page cache" and len(paths) > stream.WRITEBACK_BYTES // shard:
                shard_io.write_through(paths.pop(0))
        for path in paths:
            if mode != "page cache":
                shard_io.write_through(path)
        out[mode] = (time.process_time() - c0) / (shards * shard / 1e9) if paths or mode != "direct" else None
        for i in range(shards):
            (scratch / f"pc-{i}.bin").unlink(missing_ok=True)
    return out


# --- report -------------------------------------------------------------------------------------------------
def extrapolate(mem: dict, layers: int, heads: int) -> dict | None:
    """Fit eager's measured peak increase as a + b L^2 through the two longest lengths it ran at."""
    ran = sorted((int(n), v["eager+oa"]["peak_increase_kb"] * 1024, v["eager+oa"]["rss_before_kb"] * 1024)
                 for n, v in mem.items() if "peak_increase_kb" in v.get("eager+oa", {}))
    if len(ran) < 2:
        return None
    (n1, p1, _), (n2, p2, loaded) = ran[-2:]
    b = (p2 - p1) / (n2 * n2 - n1 * n1)
    a = p1 - b * n1 * n1
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"from": [n1, n2], "a_bytes": a, "b_bytes_per_token2": b, "machine_bytes": total, "loaded_bytes": loaded,
            "max_tokens": int(((total - loaded - a) / b) ** 0.5), "per_length": {}}


def mib(kb_or_bytes: float, kb: bool = True) -> str:
    return f"{kb_or_bytes / (1024 if kb else 1024 * 1024):,.0f}"


def _peak(v: dict | None, base: dict | None) -> tuple[str, str]:
    """('MiB (peak RSS)', 'ratio to eager') for one memory cell."""
    if not v or "peak_increase_kb" not in v:
        return "", ""
    cell = f"{mib(v['peak_increase_kb'])} ({mib(v['hwm_kb'])})"
    if v is base:
        return cell, "1 (baseline)"
    return cell, (f"{v['peak_increase_kb'] / base['peak_increase_kb']:.3f}x" if base and "peak_increase_kb" in base else "n/a")


def write_report(res: dict, path: Path) -> None:
    L = ["# Full matrices streamed to disk vs eager + `output_attentions`\n"]
    if res["small"]:
        L.append("**Small run (`--small`): a smoke test of the benchmark, not a result.**\n")
    if res.get("regenerated"):
        L.append(f"Note: {res['regenerated']}.\n")
    L.append(f"Command: `{res['command']}` (total {res['seconds']:.0f} s).  ")
    mc = res["machine"]
    L.append(f"Machine: {mc.get('cpu', '?')}, {mc.get('cores', '?')} cores, {mc.get('mem_mib', 0):,} MiB RAM, torch "
             f"{mc.get('torch', '?')}, transformers {mc.get('transformers', '?')}; torch threads {res['threads']}; "
             f"load average at start {res['load_start']}, at end {res['load_end']}.\n")
    L.append(f"SmolLM2-135M ({res['layers']} layers x {res['heads']} heads), batch 1, every query row of every layer "
             "and head. **Baseline (1.0x): `eager+oa`**, eager attention with `output_attentions=True`, which returns "
             "every layer's float32 matrix held in memory and writes nothing to disk. `stream fp32`/`stream fp16`: "
             "`attnscope.capture(model, queries=None, dtype=..., out=dir)`: the plain SDPA forward, and each layer's "
             "rows recomputed a chunk of 256 query rows at a time into one of four page-aligned buffers the writer "
             "hands out and takes back (scores and softmax in place), each chunk written at its place in that layer's "
             "safetensors shard by a background thread while the next is computed, by direct I/O (O_DIRECT: from the "
             "buffer to the disk, no copy into the page cache; rows of 1024 float32 or float16 keys are 4 KiB-aligned) "
             "and hashed from memory as it is written (XXH3-128), each finished shard flushed to disk (fdatasync) and "
             "dropped from the page cache once 64 MiB more were written, all of them before trace.json: the streamed "
             "runs pay for putting every byte on disk, the baseline does not. `eager+oa+save` (timed only, context): the baseline, then its attentions "
             "written to one safetensors file with the same checksum per tensor (left in the page cache, not flushed). "
             "Peak = peak RSS increase of the measured call over the RSS just before it (model loaded, warmed up), in "
             "a fresh process per cell; the absolute peak RSS of that process is in parentheses. Each cell ran twice: "
             f"with `MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` (tensors of 64 KiB or more get their own mmap and go "
             "back to the OS when freed, so RSS follows live tensors) and with glibc's default malloc (freed memory "
             "may stay in the heap: what a user sees); each ratio is against eager under the same allocator. Time "
             "ratio = median over interleaved rounds (shuffled order) of (config time / eager + output_attentions time "
             "in that round); timed rounds per length: "
             + ", ".join(f"{n} tokens {v['timed']} (warm-up {v['warm']})" for n, v in res["rounds"].items())
             + "; the spread (min..max over rounds) is in parentheses.\n")
    L.append("| tokens | config | peak MiB, mmap 64K (peak RSS) | vs eager+oa | peak MiB, default malloc (peak RSS) "
             "| vs eager+oa | median s | time vs eager+oa | time vs SDPA | stored MiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for n, cells in res["memory"].items():
        base = cells.get("eager+oa")
        base_d = (base or {}).get("default_malloc")
        times = res["time"].get(n, {})
        for name in CONFIGS:
            v = cells.get(name)
            t = times.get("median_s", {}).get(name)
            if v is None and t is None:
                continue
            if v and "skipped" in v:
                L.append(f"| {n} | {name} | not run: {v['skipped']} | | | | | | | {mib(v['need_bytes'], kb=False)} |")
                continue
            if v and "error" in v:
                L.append(f"| {n} | {name} | failed (see JSON) | | | | | | | |")
                continue
            peak, pr = _peak(v, base) if v else ("not measured", "")
            dpeak, dpr = _peak((v or {}).get("default_malloc"), base_d)
            if v and dpr and v.get("default_malloc") is base_d:
                dpr = "1 (baseline)"
            tv, ts = times.get("vs_eager", {}).get(name), times.get("vs_sdpa", {}).get(name)
            trat = ("1 (baseline)" if name == "eager+oa" else f"{tv['median']:.3f}x ({tv['min']:.2f}..{tv['max']:.2f})"
                    ) if tv else "n/a"
            tcell = f"{t:.2f} | {trat} | {ts['median']:.3f}x" if t else "n/a | n/a | n/a"
            stored = mib(v["stored_bytes"], kb=False) if v and "stored_bytes" in v else ""
            L.append(f"| {n} | {name} | {peak} | {pr} | {dpeak} | {dpr} | {tcell} | {stored} |")
    ex = res.get("eager_extrapolation")
    L.append("\n## Against the goals (peak <= 0.25x, time <= 1.0x of eager + output_attentions)\n")
    for n, cells in res["memory"].items():
        base = cells.get("eager+oa", {})
        for name in ("stream fp32", "stream fp16"):
            v, tv = cells.get(name, {}), res["time"].get(n, {}).get("vs_eager", {}).get(name)
            if "peak_increase_kb" not in v:
                continue
            if "peak_increase_kb" in base:
                mem = f"peak {v['peak_increase_kb'] / base['peak_increase_kb']:.3f}x (mmap 64K)"
                d, bd = v.get("default_malloc", {}), base.get("default_malloc", {})
                if "peak_increase_kb" in d and "peak_increase_kb" in bd:
                    mem += f", {d['peak_increase_kb'] / bd['peak_increase_kb']:.3f}x (default malloc)"
            elif ex and n in ex.get("per_length", {}):
                mem = (f"peak {v['peak_increase_kb'] * 1024 / ex['per_length'][n]:.3f}x of the extrapolated eager peak "
                       "(mmap 64K; eager not run)")
            else:
                continue
            L.append(f"- {n} tokens, {name}: {mem}; time " + (f"{tv['median']:.2f}x ({tv['min']:.2f}..{tv['max']:.2f})"
                                                               if tv else "n/a (eager cannot run)") + ".")
    rates, pc = res.get("checksum_gbps"), res.get("page_cache_cpu_s_per_gb")
    first = next(iter(res["memory"]))
    fp32 = res["memory"][first].get("stream fp32", {}).get("stored_bytes")
    if isinstance(rates, dict) and pc and fp32:
        gb = fp32 / 1e9
        L.append(f"\nWhere the time goes: the streamed capture does the plain SDPA forward and recomputes every row (as "
                 "the in-memory capture does, 0.96x of eager in bench/results/capture.md); the writer thread then puts "
                 f"{fp32 / 2**20:,.0f} MiB of float32 rows ({first} tokens) on disk. Measured here at the end of the run: "
                 f"XXH3-128 hashes {rates['xxh3_128']:.2f} GB/s on one core ({gb / rates['xxh3_128']:.2f} s for those rows; "
                 f"blake2b, used before, {rates['blake2b']:.2f} GB/s, {gb / rates['blake2b']:.1f} s, and the shard was "
                 f"read back to hash it); writing into the page cache costs {pc['page cache']:.2f} s of CPU per GB when "
                 f"it has to take pages not used in the last seconds (on this VM touching such memory is slow), "
                 f"{pc['write-through']:.2f} s per GB written through (each shard flushed and dropped, so the "
                 "next shards reuse its pages), "
                 + (f"{pc['direct']:.2f} s per GB by direct I/O from one page-aligned buffer (what the writer now does "
                    "with the reused chunk buffers)" if pc.get("direct") is not None else
                    "direct I/O not available on this file system") + ". "
                 "Before the reused page-aligned chunk buffers and direct writes the 1024-token float32 stream measured "
                 "1.031x (0.96..1.07) (bench/results/stream.md at commit ea78d22); before XXH3 and write-through "
                 "(blake2b read back, writes left in the page cache) 2.13x (fp32) and 2.06x (fp16) (at commit f7729ec). "
                 "The baseline pays no disk at all; "
                 "`eager+oa+save` shows what the eager way costs once the same rows go to disk.\n")
    L.append("\n## Where eager + `output_attentions` stops\n")
    L.append(f"Its float32 attention tensors alone need layers x heads x L^2 x 4 bytes = {res['layers']} x {res['heads']} "
             "x L^2 x 4: " + ", ".join(f"{n} tokens {eager_need(res['layers'], res['heads'], int(n)) / 2**30:.2f} GiB"
                                       for n in res["memory"]) + ".")
    if ex:
        L.append(f"Fitting its measured peak increase (mmap 64K) as a + b L^2 through {ex['from'][0]} and {ex['from'][1]} "
                 f"tokens (b = {ex['b_bytes_per_token2']:.0f} bytes per token^2, a = {ex['a_bytes'] / 2**20:,.0f} MiB) "
                 "extrapolates (not measured) to " + ", ".join(f"{n} tokens {v / 2**30:.1f} GiB" for n, v in ex["per_length"].items())
                 + f"; on this {ex['machine_bytes'] / 2**30:.0f} GiB machine, with nothing else running and the model "
                 f"loaded ({ex['loaded_bytes'] / 2**30:.2f} GiB RSS), it runs out of memory beyond about {ex['max_tokens']:,} tokens (less with other processes "
                 "running: it was not run where it would need more than the limit below).")
    L.append(f"Limit used for running it here: {res['eager_limit_gb']} GB of attention tensors (the machine is shared).\n")
    if res.get("values"):
        v = res["values"]
        L.append("## Values\n")
        L.append(f"At {v['tokens']} tokens, the streamed trace read back from disk (checksums verified) vs eager "
                 f"`output_attentions`: max abs difference fp32 {v['stream fp32']['layer0']:.1e} at layer 0, "
                 f"{v['stream fp32']['all_layers']:.1e} over all layers; fp16 storage {v['stream fp16']['all_layers']:.1e} "
                 "over all layers. Layer 0 sees the same q and k in both; deeper layers also carry the SDPA-vs-eager "
                 "forward difference. The streamed rows equal the in-memory capture's bit for bit "
                 "(tests/test_trace_stream.py).\n")
    L.append("Notes: a streamed full matrix never exists whole in memory: at most four chunks of 256 query rows (two "
             "queued, one being written by the background writer thread, one being computed); records under 16 MiB are "
             "gathered into shards of about 16 MiB. The four chunk buffers are kept from one full-matrix record to the "
             "next until the capture ends (no fresh pages to fault in for every chunk; 36 MiB at 1024 tokens in "
             "float32, part of the peak above). After each full-matrix record the writer gives the heap's free "
             "pages back (glibc malloc_trim), which is what keeps the default-malloc peak near the mmap-64K one. Rows "
             "written by direct I/O never enter the page cache; other written files' pages are the kernel's page cache, "
             "not the process's memory, and at most ~64 MiB of them stay cached. The 4k-token stream is stored in float16 (float32 would be ~18 GB on disk). Every output "
             "directory is deleted after its measurement.\n")
    path.write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="64 tokens, one round (CI smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager-limit-gb", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--mem", nargs=2, metavar=("TOKENS", "CONFIG"))
    ap.add_argument("--scratch", default=None)
    args = ap.parse_args()
    if args.mem:
        return mem_child(int(args.mem[0]), args.mem[1], args.threads, args.scratch)
    import torch

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    # tokens: (warm-up rounds, timed rounds); longer inputs run after shorter ones warmed the process up
    plan = {SMALL: (1, 1)} if args.small else {1024: (1, 5), 2048: (0, 2), 4096: (0, 1)}
    lengths = list(plan)
    scratch = Path(tempfile.mkdtemp(prefix="attnscope-stream-bench-"))
    m = load()
    layers, heads = m.hf.config.num_hidden_layers, m.hf.config.num_attention_heads
    res = {"small": args.small, "threads": args.threads, "eager_limit_gb": args.eager_limit_gb, "machine": machine(),
           "command": "python bench/stream.py" + (" --small" if args.small else ""), "layers": layers, "heads": heads,
           "load_start": [round(v, 2) for v in os.getloadavg()], "memory": {}, "time": {},
           "rounds": {str(n): {"warm": w, "timed": r} for n, (w, r) in plan.items()}}
    try:
        for n in lengths:
            fits = eager_need(layers, heads, n) <= args.eager_limit_gb * 1e9
            names = [c for c in CONFIGS if not c.startswith("eager") or fits]
            if n > 2048:  # float32 at 4k would be ~18 GB on disk: the long run stores float16
                names = [c for c in names if c != "stream fp32"]
            cells = {}
            for name in CONFIGS:
                if name == "eager+oa" and not fits:
                    cells[name] = {"skipped": f"needs {eager_need(layers, heads, n) / 2**30:.1f} GiB of attention tensors",
                                   "need_bytes": eager_need(layers, heads, n)}
                elif name in names and name not in TIMED_ONLY and (name in ("eager+oa", "stream fp16")
                                                                    or not args.small and n != 2048):
                    cells[name] = run_mem(n, name, args.threads, scratch)
                    if "error" not in cells[name]:
                        cells[name]["default_malloc"] = run_mem(n, name, args.threads, scratch, default_malloc=True)
                    print(n, name, cells[name], flush=True)
            res["memory"][str(n)] = cells
            times = time_length(m, n, names, *plan[n], scratch)
            base = "eager+oa" if "eager+oa" in names else None
            res["time"][str(n)] = {"raw": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
                                   "vs_sdpa": {k: ratios(times, k, "sdpa") for k in names},
                                   "vs_eager": {k: ratios(times, k, base) for k in names} if base else {}}
            print(n, res["time"][str(n)]["median_s"], flush=True)
        vn = SMALL if args.small else 1024
        res["values"] = check_values(m, vn, scratch) | {"tokens": vn}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["checksum_gbps"] = checksum_rates(64 << 20 if args.small else 256 << 20)
    scratch.mkdir(exist_ok=True)
    try:
        res["page_cache_cpu_s_per_gb"] = page_cache_cost(scratch, *((4, 32 << 20, 0.0) if args.small else ()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ex = extrapolate(res["memory"], layers, heads)
    if ex:
        for n in lengths:
            if "skipped" in res["memory"][str(n)].get("eager+oa", {}):
                ex["per_length"][str(n)] = ex["a_bytes"] + ex["b_bytes_per_token2"] * n * n
    res["eager_extrapolation"] = ex
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    res["seconds"] = time.time() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    name = "stream-small" if args.small else "stream"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1))
    write_report(res, args.out / f"{name}.md")
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
