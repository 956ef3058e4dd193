"""An evaluation shard file (`out.shard-i-of-n.jsonl`), checked line by line when it is read back for a merge.

Layout, one JSON object per line:
* the header (shard, settings, item-list fingerprint; `shards.header`), sealed like a trace's metadata
  (`capture.checksums.sealed`: XXH3-128 of its canonical JSON, field `metadata_checksum`);
* one line per answered item, carrying `row_checksum`: XXH3-128 over the previous line's digest (the header's for
  the first row) then the row's canonical JSON (`checksums.canonical_json`, the checksum field left out). Chained
  this way, a row whose text was edited (a "yes" made "no", a caption word, an item id), one moved to another place,
  repeated, or copied in from another shard (whose chain starts from another header) fails at that row, named;
* a closing line `{"type": "shard-end", "rows": n, "last": <the last row's digest>}`, written with the rest once
  every item is answered: a file without it stopped early or is still being copied, and rows cut from its end
  disagree with it.

The whole file is written at once (a temporary file renamed into place). Files written before the checksums (no
`metadata_checksum` in the header, no `row_checksum` in the rows, no closing line) are still merged, with an
`UncheckedMetadataWarning`; a file that mixes the two is refused. As for traces, this detects damage and edits,
not a forger who recomputes every digest: it is no signature."""
from __future__ import annotations

import json
from pathlib import Path

import xxhash

from ..capture.checksums import METADATA_FIELD, canonical_json, sealed
from ..capture.trace import check_metadata

ROW_FIELD = "row_checksum"
END = "shard-end"
LABELS = "the shard, the settings, the item list, the answers"


class ShardError(ValueError):
    """Shards that cannot be merged into one result; the message names the missing or mismatched shard."""


def _chain(previous: str, row: dict) -> str:
    h = xxhash.xxh3_128(bytes.fromhex(previous))
    h.update(canonical_json(row))
    return h.hexdigest()


def write_lines(path: Path, head: dict, rows: list[dict]) -> Path:
    """The sealed header, every row with its chained checksum, the closing line; atomically (tmp, then rename)."""
    head = sealed(head)
    last, lines = head[METADATA_FIELD]["digest"], [head]
    for row in rows:
        plain = json.loads(json.dumps(row))  # as it will be read back
        if ROW_FIELD in plain or plain.get("type") == END:
            raise ValueError(f"an answer row may not hold the field {ROW_FIELD!r} or type {END!r}: {sorted(plain)}")
        last = _chain(last, plain)
        lines.append(plain | {ROW_FIELD: last})
    lines.append({"type": END, "rows": len(rows), "last": last})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(path)
    return path


def _name(row: dict, number: int, line: int) -> str:
    item = row.get("image_id") if isinstance(row, dict) else None
    return f"row {number} (line {line}" + (f", image {item!r})" if item is not None else ")")


def read(path: Path, stacklevel: int = 3) -> tuple[dict, list[dict]]:
    """(header, rows) of a shard file, every row checked against its chained checksum (`ShardError` naming the file
    and the row); the checksum fields are left out of what is returned. Blank lines and a byte-order mark (an editor's
    save) change no content and are skipped. `stacklevel`: where an `UncheckedMetadataWarning` points, counted from
    `check_metadata` (3: the caller of this function)."""
    lines, numbers = [], []  # the JSON objects and the line of the file each was read from
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise ShardError(f"{path}, line {number} is not valid JSON ({err}): the shard was cut while being written "
                             "or copied, or edited (each line is one JSON object); rerun that shard") from err
        numbers.append(number)
    if not lines or not isinstance(lines[0], dict) or lines[0].get("type") != "shard":
        raise ShardError(f"{path} is not an attnscope shard file (no shard header); rerun that shard")
    head, rows = lines[0], lines[1:]
    if not all(isinstance(r, dict) for r in rows):
        raise ShardError(f"{path}: a line after the header is not a JSON object; rerun that shard")
    if METADATA_FIELD not in head:  # written before the checksums, unless the header's was taken out
        marked = [n for n, r in enumerate(rows) if ROW_FIELD in r or r.get("type") == END]
        if marked:
            raise ShardError(f"{path}: its header has no checksum but "
                             f"{_name(rows[marked[0]], marked[0] + 1, numbers[marked[0] + 1])} has one: the header's "
                             "checksum was taken out; rerun that shard")
    try:
        check_metadata(head, path, stacklevel=stacklevel, what="evaluation shard", labels=LABELS,
                       resave="rerun that shard with this attnscope", error=ShardError)
    except ShardError as err:
        raise ShardError(f"{err}; rerun that shard") from err
    if METADATA_FIELD not in head:
        return head, rows
    return {k: v for k, v in head.items() if k != METADATA_FIELD}, _checked(path, head[METADATA_FIELD]["digest"],
                                                                            rows, numbers[1:])


def _checked(path: Path, last: str, rows: list[dict], numbers: list[int]) -> list[dict]:
    """The rows of a sealed shard, each checked against the chain from `last` (the header's digest); `numbers`: the
    line of the file each row was read from."""
    ends = [n for n, r in enumerate(rows) if r.get("type") == END]
    if not ends:
        raise ShardError(f"{path} ends after row {len(rows)} without its closing line: the shard stopped early or is "
                         "still being written or copied; wait for it to finish, or rerun it")
    if ends[0] != len(rows) - 1:
        raise ShardError(f"{path}: line {numbers[ends[0]]} closes the shard but {len(rows) - 1 - ends[0]} line(s) follow "
                         "it (added after the shard was written); rerun that shard")
    end, rows = rows[-1], rows[:-1]
    out = []
    for number, (row, line) in enumerate(zip(rows, numbers), 1):
        digest = row.get(ROW_FIELD)
        plain = {k: v for k, v in row.items() if k != ROW_FIELD}
        if not isinstance(digest, str):
            raise ShardError(f"{path}, {_name(row, number, line)} has no checksum: it was added or edited after the shard "
                             "was written; rerun that shard")
        last = _chain(last, plain)
        if digest != last:
            raise ShardError(f"{path}, {_name(row, number, line)} does not match its checksum: it was edited, moved, "
                             "repeated or copied from another shard after the shard was written; rerun that shard")
        out.append(plain)
    if end.get("rows") != len(rows) or end.get("last") != last:
        raise ShardError(f"{path}: its closing line counts {end.get('rows')} rows ending in another digest, but "
                         f"{len(rows)} precede it: rows were removed after row {len(rows)}; rerun that shard")
    return out
