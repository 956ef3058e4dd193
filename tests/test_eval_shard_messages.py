"""What a user is told about shard files at merge (`evaluate/shard_file.py`, `attnscope eval --merge`), on shard files
written by `shards.write` (mechanics only: no model runs; the answers are placeholders): shards written before the
checksums warn on the command line too; a file whose content is unchanged (a byte-order mark, blank lines) merges; the
messages name the true line, the cause and the fix; a shard still being written is named, not called missing."""
from __future__ import annotations

import json
import re
import warnings

import pytest

from attnscope import cli
from attnscope.capture.trace import UncheckedMetadataWarning
from attnscope.evaluate import pope, shards
from attnscope.evaluate.shards import ShardError

ARGS = ["eval", "pope", "--n", "2", "--split", "random", "--boot", "10"]


def _questions():
    return pope.scene_questions(n=2, scene_split="test", seed=0, splits=["random"])[0]


def _write(out, count=2, old=False, steer=None):
    """The `count` shard files of a POPE run over `_questions()` (as `--shard i/count` writes them), or as an
    attnscope before the checksums wrote them (`old`: header and rows, no checksums, no closing line)."""
    unique = list(dict.fromkeys((q.image_id, q.question) for q in _questions()))
    settings = {"model": "scene-vlm", "weights": None, "method": pope.method_name(steer), "steer": repr(steer),
                "max_new_tokens": 8, "sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    paths = []
    for index in range(count):
        shard = shards.Shard(index, count)
        rows = [{"image_id": i, "question": q, "answer": "Yes" if n % 2 else "No", "seconds": 0.5, "new_tokens": 1}
                for n, (i, q) in enumerate(shard.take(unique))]
        path = shards.write(shard, out, shards.header(shard, "pope", unique, settings), rows)
        if old:
            lines = [json.loads(line) for line in path.read_text().splitlines()][:-1]
            path.write_text("".join(json.dumps({k: v for k, v in x.items() if k not in ("metadata_checksum",
                                                                                          "row_checksum")}) + "\n"
                                    for x in lines))
        paths.append(path)
    return paths


def _merge(out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pope.merge_pope(_questions(), out, boot=10)
    return result, [w for w in caught if issubclass(w.category, UncheckedMetadataWarning)]


def test_the_command_line_merge_of_old_shards_prints_the_warning(tmp_path, capsys):
    for old in (True, False):
        out = tmp_path / f"{old}.jsonl"
        paths = _write(out, old=old)
        assert cli.main([*ARGS, "--merge", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if "evaluation shard metadata had no checksum" in line]
        if old:  # one `warning:` line per file, naming it
            assert len(said) == 2 and all(line.startswith("warning: ") for line in said), err
            assert all("the answers" in line for line in said), err  # not only the header: no answer was checked
            assert all(any(str(p) in line for line in said) for p in paths), err
        else:
            assert not said, err


def test_a_byte_order_mark_or_blank_lines_change_nothing_and_merge(tmp_path):
    reference, _ = _merge(_write(tmp_path / "ref" / "p.jsonl")[0].parent / "p.jsonl")
    out = tmp_path / "p.jsonl"
    first, second = _write(out)
    first.write_bytes(b"\xef\xbb\xbf" + first.read_bytes())  # an editor's save on Windows
    second.write_text(second.read_text().replace("\n", "\n\n"))
    merged, warned = _merge(out)
    assert not warned and merged.records == reference.records


def test_messages_name_the_true_line_and_the_fix(tmp_path):
    out = tmp_path / "p.jsonl"
    first, _ = _write(out)
    lines = first.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    edited = lines[:1] + ["\n", "\n"] + [lines[1].replace('"answer": "No"', '"answer": "Yes"')] + lines[2:]
    first.write_text("".join(edited))
    with pytest.raises(ShardError, match=re.escape(f"{first}, row 1 (line 4,") + ".*does not match its checksum"):
        pope.merge_pope(_questions(), out)
    # a row pretty-printed over several lines is an edit, not a file cut while being copied
    row = json.loads(lines[1])
    first.write_text(lines[0] + json.dumps(row, indent=2) + "\n" + "".join(lines[2:]))
    with pytest.raises(ShardError, match=r"line 2 is not valid JSON .*edited") as caught:
        pope.merge_pope(_questions(), out)
    assert "rerun that shard" in str(caught.value)
    # an edited header names the fix
    head = json.loads(lines[0]) | {"answered": 7}
    first.write_text(json.dumps(head) + "\n" + "".join(lines[1:]))
    with pytest.raises(ShardError, match="metadata does not match its checksum.*; rerun that shard"):
        pope.merge_pope(_questions(), out)


def test_a_header_whose_checksum_was_taken_out_is_refused_without_claiming_an_old_file(tmp_path):
    out = tmp_path / "p.jsonl"
    first, _ = _write(out)
    lines = first.read_text().splitlines(keepends=True)
    head = {k: v for k, v in json.loads(lines[0]).items() if k != "metadata_checksum"}
    first.write_text(json.dumps(head) + "\n" + "".join(lines[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedMetadataWarning)
        with pytest.raises(ShardError, match="header has no checksum but row 1"):
            pope.merge_pope(_questions(), out)


def test_a_shard_still_being_written_is_named(tmp_path):
    out = tmp_path / "p.jsonl"
    _, second = _write(out)
    second.rename(second.with_name(second.name + ".tmp"))  # shards.write renames it into place when done
    with pytest.raises(ShardError, match=re.escape(second.name + ".tmp") + ".*still being written"):
        pope.merge_pope(_questions(), out)


def test_merge_refuses_options_the_shards_did_not_run_with(tmp_path, capsys):
    """`--merge` with a steering method, model or decoding option the shards did not use is one `error:` line and
    nothing merged (the result was reported under the shards' settings, the options dropped without a word);
    the same options as the shards', or none, merge."""
    out = tmp_path / "p.jsonl"
    paths = _write(out)
    for extra in (["--steer", "pai:alpha=0.5"], ["--new-tokens", "3"], ["--sample"], ["--model", "smollm2-135m"],
                  ["--temperature", "0.5"]):
        assert cli.main([*ARGS, "--merge", "--out", str(out), *extra]) != 0, extra
        err = capsys.readouterr().err
        assert err.startswith("error: the shards ran with ") and err.count("error:") == 1, (extra, err)
        assert all(p.exists() for p in paths) and not out.exists(), extra
    assert cli.main([*ARGS, "--merge", "--out", str(out), "--new-tokens", "8", "--model", "scene-vlm"]) == 0
    steered = tmp_path / "steered.jsonl"
    _write(steered, steer=[pope.resolve_steer("pai:alpha=0.5")])
    assert cli.main([*ARGS, "--merge", "--out", str(steered), "--steer", "pai:alpha=0.5"]) == 0
    assert json.loads(steered.read_text().splitlines()[-1])["config"]["method"] == "pai"
