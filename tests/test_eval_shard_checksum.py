"""Shard files of a real scene-vlm POPE / CHAIR run (`evaluate/shard_file.py`): every kind of edit made to a shard
after writing (an answer, a caption word, an item id; a row cut, repeated, moved, copied from another shard; the
header; the closing line) is refused at merge, naming the file and the row; untouched shards merge to the unsharded
result bit for bit; shards written before the checksums merge the same, with an UncheckedMetadataWarning."""
from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest

from attnscope.capture.trace import UncheckedMetadataWarning
from attnscope.evaluate import chair as chair_mod
from attnscope.evaluate import pope as pope_mod
from attnscope.evaluate import shards
from attnscope.evaluate.shards import ShardError

RUN = dict(max_new_tokens=3, boot=20)


@pytest.fixture(scope="module")
def scene(scene_vlm):
    return scene_vlm


@pytest.fixture(scope="module")
def pope_run(scene, tmp_path_factory):
    """The unsharded result and the texts of two shard files (3 + 2 of 5 distinct questions)."""
    qs, image_of = pope_mod.scene_questions(n=3)
    single = pope_mod.evaluate_pope(scene, qs, image_of, **RUN)
    out = tmp_path_factory.mktemp("pope") / "pope.jsonl"
    for index in range(2):
        pope_mod.evaluate_pope(scene, qs, image_of, out=out, shard=f"{index}/2", **RUN)
    texts = [p.read_text() for p in shards.find(out)]
    assert [len(t.splitlines()) for t in texts] == [1 + 3 + 1, 1 + 2 + 1]  # header, rows, closing line
    return qs, single, texts


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _place(tmp_path, texts, name="pope.jsonl"):
    out = tmp_path / name
    for index, text in enumerate(texts):
        shards.Shard(index, len(texts)).path(out).write_text(text)
    return out


def _lines(text):
    return [json.loads(line) for line in text.splitlines()]


def _text(lines):
    return "".join(json.dumps(x) + "\n" for x in lines)


def _edit(lines):
    """Shard 0's lines -> each edited copy and what its error must say (file and row named by the caller)."""
    head, r1, r2, r3, end = lines
    other = "No" if "yes" in r2["answer"].lower() else "Yes"
    renamed = "scene-x" if r2["image_id"] != "scene-x" else "scene-y"
    yield "answer", [head, r1, r2 | {"answer": other}, r3, end], r"row 2 \(line 3.*does not match its checksum"
    yield "item id", [head, r1, r2 | {"image_id": renamed}, r3, end], r"row 2 \(line 3.*does not match its checksum"
    yield "question", [head, r1, r2, r3 | {"question": r3["question"] + "?"}, end], r"row 3 \(line 4.*does not match"
    yield "reordered", [head, r2, r1, r3, end], r"row 1 \(line 2.*edited, moved, repeated or copied"
    yield "repeated", [head, r1, r1, r2, r3, end], r"row 2 \(line 3.*does not match its checksum"
    yield "last row cut", [head, r1, r2, end], r"closing line counts 3 rows .* but 2 precede it: rows were removed"
    yield "closing line cut", [head, r1, r2, r3], "ends after row 3 without its closing line: the shard stopped early"
    yield "closing line edited", [head, r1, r2, end | {"rows": 2}], "closing line counts 2 rows ending in another digest"
    yield "line appended", [head, r1, r2, r3, end, r3], r"line 5 closes the shard but 1 line\(s\) follow it"
    yield "checksum taken out", [head, r1, {k: v for k, v in r2.items() if k != "row_checksum"}, r3, end], \
        r"row 2 \(line 3.*has no checksum"
    yield "header edited", [head | {"answered": 2}, r1, r2, r3, end], "metadata does not match its checksum"
    yield "header unsealed", [{k: v for k, v in head.items() if k != "metadata_checksum"}, r1, r2, r3, end], \
        r"header has no checksum but row 1 \(line 2.*has one"


def test_every_edit_of_a_pope_shard_is_refused_naming_the_file_and_row(pope_run, tmp_path):
    qs, _, texts = pope_run
    lines = _lines(texts[0])
    foreign = _lines(texts[1])[1]  # shard 1's first row, checksum and all
    cases = list(_edit(lines)) + [
        ("foreign row", [*lines[:2], foreign, *lines[3:]], r"row 2 \(line 3.*copied from another shard"),
        ("cut mid-line", None, "line 3 is not valid JSON"),
    ]
    for n, (kind, edited, says) in enumerate(cases):
        where = tmp_path / str(n)
        where.mkdir()
        raw = texts[0].splitlines(keepends=True)
        text = _text(edited) if edited is not None else "".join(raw[:2]) + raw[2][: len(raw[2]) // 2]  # copy cut
        out = _place(where, [text, texts[1]])
        name = re.escape(shards.Shard(0, 2).path(out).name)
        with pytest.raises(ShardError, match=name + r"[:,]? .*" + says):
            pope_mod.merge_pope(qs, out)
        assert not out.exists(), kind  # nothing merged, the shards kept
        assert shards.Shard(0, 2).path(out).read_text() == text


def test_untouched_pope_shards_merge_to_the_unsharded_result_bit_for_bit(pope_run, tmp_path):
    qs, single, texts = pope_run
    rows = [r for t in texts for r in _lines(t)[1:-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedMetadataWarning)  # checked files: no warning
        merged = pope_mod.merge_pope(qs, _place(tmp_path, texts), boot=20)
    assert _strip(merged.records) == _strip(single.records)
    metrics = lambda r: {s: {k: v for k, v in m.items() if k != "seconds_per_answer"} for s, m in r.metrics.items()}  # noqa: E731
    assert json.dumps(metrics(merged), sort_keys=True) == json.dumps(metrics(single), sort_keys=True)
    by_key = {(r["image_id"], r["question"]): r for r in rows}  # each record is its shard row, timings included
    for rec in merged.records:
        row = by_key[(rec["image_id"], rec["question"])]
        assert {k: rec[k] for k in row if k not in ("image_id", "question", "row_checksum")} == \
            {k: v for k, v in row.items() if k not in ("image_id", "question", "row_checksum")}


def test_shards_written_before_the_checksums_merge_with_a_warning(pope_run, tmp_path):
    qs, single, texts = pope_run

    def old(text):  # what an attnscope before the checksums wrote: the header and the rows, nothing more
        head, *rows, _ = _lines(text)
        return _text([{k: v for k, v in x.items() if k not in ("metadata_checksum", "row_checksum")}
                      for x in (head, *rows)])

    with pytest.warns(UncheckedMetadataWarning, match="evaluation shard metadata had no checksum") as caught:
        merged = pope_mod.merge_pope(qs, _place(tmp_path, [old(t) for t in texts]), boot=20)
    assert {w.filename for w in caught if issubclass(w.category, UncheckedMetadataWarning)} == {__file__}
    assert _strip(merged.records) == _strip(single.records)


def test_an_edited_chair_caption_is_refused_and_untouched_shards_merge_exactly(scene, tmp_path):
    images, image_of = chair_mod.scene_images(n=2)
    run = dict(max_new_tokens=6, boot=20)
    single = chair_mod.evaluate_chair(scene, images, image_of, **run)
    out = tmp_path / "chair.jsonl"
    for index in range(2):
        chair_mod.evaluate_chair(scene, images, image_of, out=out, shard=f"{index}/2", **run)
    texts = [p.read_text() for p in shards.find(out)]
    head, row, *rest = _lines(texts[0])
    words = row["caption"].split() or [""]
    edited = row | {"caption": " ".join(["a", *words[1:]] if words[0] != "a" else ["the", *words[1:]])}
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_out = _place(bad, [_text([head, edited, *rest]), texts[1]], "chair.jsonl")
    with pytest.raises(ShardError, match=r"chair.jsonl.shard-0-of-2.jsonl, row 1 \(line 2, image .*does not match"):
        chair_mod.merge_chair(images, bad_out)
    merged = chair_mod.merge_chair(images, out, boot=20)
    assert _strip(merged.records) == _strip(single.records)
    assert json.dumps(merged.metrics["ci"], sort_keys=True) == json.dumps(single.metrics["ci"], sort_keys=True)
    shutil.rmtree(bad)
