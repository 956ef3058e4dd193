"""Sharded evaluation (`evaluate/shards.py`): shard assignment from what multi-node launchers set, and results that
merge to the unsharded run bit for bit (answers, metrics, intervals) for 1, 2 and 3 shards of uneven sizes; a
missing, truncated, duplicated or foreign shard is refused by name. The real multi-machine launch (two
`accelerate launch --num_machines 2 --machine_rank R` on one machine, no shared directory) is in
test_cli_commands.py."""
from __future__ import annotations

import json

import pytest

from attnscope.evaluate import chair as chair_mod
from attnscope.evaluate import pope as pope_mod
from attnscope.evaluate import shards
from attnscope.evaluate.shards import Shard, ShardError
from attnscope.models import zoo


def launcher_env(machines: int, per_machine: int, machine: int, local: int) -> dict:
    """What `accelerate launch --multi_gpu --num_machines M --machine_rank R --num_processes M*K` (torchrun under it)
    sets in each process."""
    return {"RANK": str(machine * per_machine + local), "WORLD_SIZE": str(machines * per_machine),
            "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(per_machine), "GROUP_RANK": str(machine),
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("machines, per_machine, items", [(2, 2, 7), (3, 1, 5), (2, 3, 4), (1, 1, 3)])
def test_every_item_goes_to_exactly_one_process_of_every_machine_layout(machines, per_machine, items):
    found = [shards.from_launcher(launcher_env(machines, per_machine, m, k))
             for m in range(machines) for k in range(per_machine)]
    assert [(s.machine, s.local) for s in found] == [(m, k) for m in range(machines) for k in range(per_machine)]
    taken = [i for s in found for i in s.take(range(items))]
    assert sorted(taken) == list(range(items))  # a partition: every item once, whatever the sizes
    sizes = [len(s.take(range(items))) for s in found]
    assert max(sizes) - min(sizes) <= 1
    assert all(s.launched for s in found) == (machines * per_machine > 1)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "4"}, "RANK is not set"),
    (launcher_env(2, 2, 1, 0) | {"RANK": "1"}, "inconsistent launcher environment"),
    (launcher_env(2, 2, 1, 0) | {"RANK": "4", "GROUP_RANK": "2"}, "does not exist"),
])
def test_bad_launcher_environments_are_refused(env, message):
    with pytest.raises(ShardError, match=message):
        shards.from_launcher(env)


def test_shard_specs():
    assert shards.parse("1/3") == Shard(1, 3) and shards.parse(" 0 / 1 ") == Shard(0, 1)
    for bad, message in (("3/3", "does not exist"), ("x", "INDEX/COUNT"), ("1-3", "INDEX/COUNT")):
        with pytest.raises(ShardError, match=message):
            shards.parse(bad)
    assert shards.resolve(None) is None and shards.resolve("2/5") == Shard(2, 5)


@pytest.fixture(scope="module")
def scene():
    try:
        return zoo.load("scene-vlm")
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def questions():
    qs, image_of = pope_mod.scene_questions(n=3)  # 9 questions, 5 distinct: shards of 3+2 and 2+2+1
    assert len(dict.fromkeys((q.image_id, q.question) for q in qs)) == 5
    return qs, image_of


def _exact(result) -> tuple:
    """Everything a result holds except wall times and the shard count."""
    records = [{k: v for k, v in r.items() if k != "seconds"} for r in result.records]
    metrics = {s: {k: v for k, v in m.items() if k != "seconds_per_answer"} for s, m in result.metrics.items()}
    return records, json.dumps(metrics, sort_keys=True), {k: v for k, v in result.config.items() if k != "processes"}


def test_pope_merges_to_the_unsharded_result_for_any_number_of_shards(scene, questions, tmp_path):
    qs, image_of = questions
    run = dict(max_new_tokens=3, boot=50)
    single = pope_mod.evaluate_pope(scene, qs, image_of, **run)
    assert {r["parsed"] for r in single.records} & {"yes", "no"}  # real answers, real metrics
    for count in (2, 3):
        out = tmp_path / f"pope{count}.jsonl"
        for index in reversed(range(count)):  # any order
            assert pope_mod.evaluate_pope(scene, qs, image_of, out=out, shard=f"{index}/{count}", **run) is None
        files = shards.find(out)
        assert [len(shards.read(p)[1]) for p in files] == [len(Shard(i, count).take(range(5))) for i in range(count)]
        if count == 3:
            _refuses_bad_shard_sets(qs, out, files)
        merged = pope_mod.merge_pope(qs, out, boot=50)
        assert _exact(merged) == _exact(single) and merged.config["processes"] == count
        assert not shards.find(out)  # merged away
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [x["answer"] for x in lines if x["type"] == "answer"] == [r["answer"] for r in single.records]


def _refuses_bad_shard_sets(qs, out, files):
    """Missing, duplicated, truncated, foreign and mismatched shards: each refused by name, nothing written."""
    texts = {p: p.read_text() for p in files}
    missing = files[2]
    missing.unlink()
    with pytest.raises(ShardError, match=r"shard\(s\) \[2\] of 3 are missing; run them \(--shard 2/3"):
        pope_mod.merge_pope(qs, out)
    head, *rows = texts[missing].splitlines()
    missing.write_text("\n".join([head, *rows[:-2]]) + "\n")  # interrupted: its answer and closing line cut
    with pytest.raises(ShardError, match="shard-2-of-3.jsonl ends after row 0 without its closing line"):
        pope_mod.merge_pope(qs, out)
    head, rows = _read_plain(texts[missing])
    shards.write(Shard(2, 3), out, head | {"settings": head["settings"] | {"max_new_tokens": 8}}, rows)
    with pytest.raises(ShardError, match=r"other settings than shard 0 \(max_new_tokens\)"):
        pope_mod.merge_pope(qs, out)
    missing.write_text(texts[missing])
    with pytest.raises(ShardError, match="different pope item list"):
        pope_mod.merge_pope(qs[:6], out)  # merged against another question set
    stray = Shard(0, 2).path(out)
    stray.write_text(texts[files[0]])
    with pytest.raises(ShardError, match="holds shard 0 of 3; a shard file keeps its name"):
        pope_mod.merge_pope(qs, out)
    head, rows = _read_plain(texts[files[0]])
    shards.write(Shard(0, 2), out, head | {"count": 2}, rows)
    with pytest.raises(ShardError, match="shards of different runs"):
        pope_mod.merge_pope(qs, out)
    stray.unlink()
    assert not out.exists() and all(p.read_text() == texts[p] for p in files)


def _read_plain(text: str) -> tuple[dict, list[dict]]:
    """A shard file's header and rows without their checksum fields (to write a shard as another run would)."""
    lines = [json.loads(line) for line in text.splitlines()]
    head = {k: v for k, v in lines[0].items() if k != "metadata_checksum"}
    return head, [{k: v for k, v in r.items() if k != "row_checksum"} for r in lines[1:-1]]


def test_chair_merges_to_the_unsharded_result(scene, tmp_path):
    images, image_of = chair_mod.scene_images(n=3)
    run = dict(max_new_tokens=4, boot=20)
    single = chair_mod.evaluate_chair(scene, images, image_of, **run)
    out = tmp_path / "chair.jsonl"
    for index in range(2):
        assert chair_mod.evaluate_chair(scene, images, image_of, out=out, shard=f"{index}/2", **run) is None
    with pytest.raises(ShardError, match="other ground-truth classes"):
        chair_mod.merge_chair([(i, ["bag"]) for i, _ in images], out)
    merged = chair_mod.merge_chair(images, out, boot=20)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(merged.records) == strip(single.records)
    assert json.dumps(merged.metrics["ci"], sort_keys=True) == json.dumps(single.metrics["ci"], sort_keys=True)


def test_shards_of_a_model_with_the_same_name_but_other_weights_are_refused(scene, questions, tmp_path):
    """A checkpoint retrained at the same path, or another machine's copy: the name alone does not say which weights
    answered, so shards answered by different weights must not merge into one result."""
    import torch

    qs, image_of = questions
    run = dict(max_new_tokens=2, boot=20)
    out = tmp_path / "pope.jsonl"
    pope_mod.evaluate_pope(scene, qs, image_of, out=out, shard="0/2", **run)
    norm = scene.hf.model.language_model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.mul_(2.0)
        pope_mod.evaluate_pope(scene, qs, image_of, out=out, shard="1/2", **run)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    with pytest.raises(ShardError, match=r"other settings than shard 0 \(weights\)"):
        pope_mod.merge_pope(qs, out)
