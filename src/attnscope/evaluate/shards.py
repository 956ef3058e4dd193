"""Sharding an evaluation over processes and machines, and merging the shards exactly.

An evaluation's work items (POPE's distinct questions, CHAIR's images) are listed in one fixed order; shard `i` of
`n` answers items i, i+n, i+2n, ... Each item is answered alone (batch of one, greedy or seeded per item), so an
answer does not depend on the shard that gave it, and the merged records (put back in the item order) and every
metric computed from them are the same, bit for bit, for any number of shards (timings aside).

Two ways to run shards:
* launched together, by `accelerate launch` (its multi-process launcher, on one machine or several:
  `--num_machines N --machine_rank R`) or `torchrun` (`--nnodes N --node_rank R`): each process reads its shard from
  the environment the launcher sets (`RANK` = machine rank x processes per machine + local rank, `WORLD_SIZE`,
  `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` = machine rank), answers it, and sends it to rank 0 over a gloo
  process group (no shared filesystem is needed between machines); rank 0 merges and writes `out`;
* independently (a job array, machines with no rendezvous): `shard="i/n"` (`--shard i/n`) writes
  `out.shard-i-of-n.jsonl`; once all n exist, `merge` (`--merge`) checks and merges them into `out`.
A shard file starts with a header naming its shard, the evaluation's settings and a fingerprint of the whole item
list, so shards of different runs, a missing shard or a truncated one are refused by name, never merged; the header
and every answer row carry chained checksums and the file ends with a closing line (`shard_file.py`), so a row edited,
moved, repeated, cut or copied from another shard after writing is refused too, naming the file and the row."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import shard_file
from .shard_file import ShardError

__all__ = ["Shard", "ShardError", "combine", "exchange", "find", "from_launcher", "header", "merge", "parse", "read",
           "resolve", "write"]

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`; `launched`: started by a launcher, so the shards meet in a process group."""

    index: int
    count: int
    machine: int = 0
    local: int = 0
    launched: bool = False

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"shard {self.index} of {self.count} does not exist: shards are 0..count-1 of count >= 1")

    def take(self, items: Sequence) -> list:
        """This shard's items: every count-th, starting at index."""
        return list(items)[self.index::self.count]

    def path(self, out: str | Path) -> Path:
        return Path(f"{out}.shard-{self.index}-of-{self.count}.jsonl")


def parse(spec: str) -> Shard:
    """`"i/n"`: shard i of n (0-based)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise ShardError(f"--shard takes INDEX/COUNT (shard 0/3 is the first of three); got {spec!r}")
    return Shard(int(m[1]), int(m[2]))


def from_launcher(env=None) -> Shard:
    """This process's shard from the environment a launcher sets (accelerate launch, torchrun; one process or many,
    on one machine or several). Without `WORLD_SIZE` > 1 this process is the only shard."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Shard(0, 1)
    if "RANK" not in env:
        raise ShardError(f"WORLD_SIZE={world} but RANK is not set; start the shards with `accelerate launch` or "
                         "`torchrun`, or give each one --shard INDEX/COUNT")
    rank = int(env["RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    local = int(env.get("LOCAL_RANK", rank % local_world))
    machine = int(env.get("GROUP_RANK", rank // local_world))
    if not 0 <= local < local_world or (local_world and machine * local_world + local != rank):
        raise ShardError(f"inconsistent launcher environment: RANK={rank}, LOCAL_RANK={local}, LOCAL_WORLD_SIZE="
                         f"{local_world}, GROUP_RANK={machine} (expected RANK = GROUP_RANK x LOCAL_WORLD_SIZE + "
                         "LOCAL_RANK: the same --num_processes per machine on every machine)")
    return Shard(rank, world, machine, local, launched=True)


SINGLE = ("--shard: this is the only process (WORLD_SIZE unset or 1), so it answers everything. `accelerate launch "
          "--cpu` starts one process (its several CPU processes need --mpirun_hostfile); on CPUs start K with "
          "`accelerate launch --multi_gpu --num_processes K` or `torchrun --nproc_per_node K`")


def resolve(shard) -> Shard | None:
    """None (no sharding), True (the launcher's; None when this is the only process), "i/n", or a `Shard`."""
    if shard is None or shard is False:
        return None
    if shard is True:
        found = from_launcher()
        return found if found.count > 1 else None  # the only process: nothing to split
    return shard if isinstance(shard, Shard) else parse(shard)


def fingerprint(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def header(shard: Shard, benchmark: str, items: Sequence, settings: dict) -> dict:
    """What makes shards of one evaluation mergeable: the item list and the settings that change answers."""
    return {"type": "shard", "benchmark": benchmark, "index": shard.index, "count": shard.count,
            "items": fingerprint([list(i) if isinstance(i, tuple) else i for i in items]), "settings": settings,
            "answered": len(shard.take(items))}


def write(shard: Shard, out: str | Path, head: dict, rows: list[dict]) -> Path:
    """`out.shard-i-of-n.jsonl`: the sealed header, one checksummed line per answered item, a closing line
    (`shard_file`); written atomically."""
    return shard_file.write_lines(shard.path(out), head, rows)


def read(path: Path, callers: int = 0) -> tuple[dict, list[dict]]:
    """(header, rows) of a shard file, every line checked (`shard_file.read`: `ShardError` naming the file and row);
    a file written before the checksums warns at the caller `callers` frames above the caller of `read`."""
    return shard_file.read(path, stacklevel=4 + callers)


def find(out: str | Path) -> list[Path]:
    out = Path(out)
    return sorted(out.parent.glob(f"{_glob_escape(out.name)}.shard-*-of-*.jsonl"))


def _glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def combine(shards: list[tuple[dict, list[dict]]], benchmark: str, items: Sequence, key) -> tuple[dict, list[dict]]:
    """Check that `shards` (header, rows) are all n shards of one evaluation of `items`, each complete, and return
    (settings, rows in item order). `key(row)` is the item a row answers."""
    if not shards:
        raise ShardError(f"no {benchmark} shards to merge; run every shard first (--shard INDEX/COUNT --out OUT)")
    counts = sorted({h["count"] for h, _ in shards})
    if len(counts) != 1:
        raise ShardError(f"shards of different runs: counts {counts}; merge the shards of one run (remove the others)")
    count = counts[0]
    by_index: dict[int, tuple[dict, list[dict]]] = {}
    for head, rows in shards:
        if head["index"] in by_index:
            raise ShardError(f"shard {head['index']} of {count} appears twice")
        by_index[head["index"]] = (head, rows)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise ShardError(f"shard(s) {missing} of {count} are missing; run them (--shard {missing[0]}/{count} with the "
                         "same settings and --out), then merge again")
    first = by_index[0][0]
    expected = fingerprint([list(i) if isinstance(i, tuple) else i for i in items])
    order = {tuple(i) if isinstance(i, list) else i: n for n, i in enumerate(items)}
    merged: dict = {}
    for index in range(count):
        head, rows = by_index[index]
        if head["benchmark"] != benchmark or head["items"] != expected:
            raise ShardError(f"shard {index} of {count} answered a different {head['benchmark']} item list than this "
                             f"{benchmark} run (other --n, --seed, --split or scene split?); rerun it with the same settings")
        if head["settings"] != first["settings"]:
            diff = sorted(k for k in set(head["settings"]) | set(first["settings"])
                          if head["settings"].get(k) != first["settings"].get(k))
            raise ShardError(f"shard {index} of {count} ran with other settings than shard 0 ({', '.join(diff)}); "
                             "rerun it with the same model, steering and decoding settings")
        mine = Shard(index, count).take(items)
        got = [key(r) for r in rows]
        if len(rows) != head["answered"] or sorted(map(order.__getitem__, got)) != [order[i] for i in mine]:
            raise ShardError(f"shard {index} of {count} holds {len(rows)} of its {len(mine)} answers (interrupted while "
                             "writing?); rerun it")
        merged.update(zip(got, rows))
    return first["settings"], [merged[i] for i in items]


def exchange(shard: Shard | None, out, benchmark: str, items: Sequence, settings: dict, rows: list[dict],
             key) -> tuple[dict, list[dict]] | None:
    """This process's rows -> (settings, every item's row in item order) where the result is to be scored here, or
    None (a shard written for a later `merge`, or a launched shard other than rank 0)."""
    if shard is None:
        return settings, rows
    if out is None:
        raise ShardError("a sharded evaluation writes its shard next to `out`; pass out=... (--out)")
    head = header(shard, benchmark, items, settings)
    path = write(shard, out, head, rows)  # kept until rank 0 has merged, so a failed run can be merged later
    if not shard.launched:
        return None
    import torch.distributed as dist

    group, own = _group(shard)
    merged, ok = None, False
    try:
        everything = [None] * shard.count if shard.index == 0 else None
        dist.gather_object((head, rows), everything, dst=0, group=group)
        if shard.index == 0:
            merged = combine(everything, benchmark, items, key)
        ok = True
    finally:
        flag = [ok]
        dist.broadcast_object_list(flag, src=0, group=group)
        if flag[0]:
            path.unlink(missing_ok=True)
        if own:
            dist.destroy_process_group()
    return merged


def _group(shard: Shard):
    """A gloo process group over the launched shards (the launcher's MASTER_ADDR/MASTER_PORT); (group, created)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != shard.count:
            raise ShardError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE is {shard.count}")
        return (None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")), False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ShardError(f"launched shards meet at MASTER_ADDR:MASTER_PORT, but {missing} are not set; start them with "
                         "`accelerate launch` or `torchrun`, or run each with --shard INDEX/COUNT and --merge after")
    dist.init_process_group("gloo", rank=shard.index, world_size=shard.count)
    return None, True


def merge(out: str | Path, benchmark: str, items: Sequence, key, expect: dict | None = None
          ) -> tuple[dict, list[dict], list[Path]]:
    """Read `out.shard-*-of-*.jsonl` and combine them: (settings, rows in item order, the shard files). `expect`:
    settings the merge was asked for (a model, steering, decoding options given again at `--merge`); shards that ran
    with others are refused, so a result is never reported under options that did not produce it."""
    paths = find(out)
    writing = sorted(Path(out).parent.glob(f"{_glob_escape(Path(out).name)}.shard-*-of-*.jsonl.tmp"))
    if writing:  # `write` renames it into place once the shard is whole: merging now would miss or mix a shard
        raise ShardError(f"{writing[0]} is still being written (or was left by a shard that stopped): wait for that "
                         "shard to finish, or remove the file and rerun the shard, then merge again")
    found = []
    for path in paths:  # a loop, not a comprehension (its own frame before Python 3.12): warnings point at the
        found.append(read(path, callers=2))  # caller of merge_pope / merge_chair
    for path, (head, _) in zip(paths, found):
        if Shard(head["index"], head["count"]).path(out).name != path.name:
            raise ShardError(f"{path} holds shard {head['index']} of {head['count']}; a shard file keeps its name")
    settings, rows = combine(found, benchmark, items, key)
    wrong = sorted(k for k, v in (expect or {}).items() if settings.get(k) != v)
    if wrong:
        raise ShardError(f"the shards ran with {', '.join(f'{k}={settings.get(k)!r}' for k in wrong)}, but this merge "
                         f"asks for {', '.join(f'{k}={expect[k]!r}' for k in wrong)}; merge with the shards' settings "
                         "(or leave those options out), or rerun every shard with these")
    return settings, rows, paths
