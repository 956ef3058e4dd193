"""The command line's generate / heads / eval / models commands, run in-process through `attnscope.cli.main`.

The zoo loaders are pointed at the session fixtures (conftest.py) so each model is loaded once; scene-vlm (its
trained weights ship with the package) is loaded once for this module. Runs are tiny (3 new tokens, one POPE
question, one CHAIR caption) because the point is the wiring, not the numbers."""
from __future__ import annotations

import json
import math

import pytest

from attnscope.cli import main
from attnscope.models import zoo

PROMPT = "Alice lives in Paris. Bob lives in Rome. Alice lives in"


@pytest.fixture
def use(monkeypatch):
    """use(name, model): `load(name)` (as the commands call it) returns the already loaded `model`."""
    def put(name, model):
        monkeypatch.setitem(zoo.LOADERS, name, lambda: model)
    return put


@pytest.fixture(scope="module")
def scene():
    try:
        return zoo.load("scene-vlm")
    except FileNotFoundError as err:  # the trained weights are missing from this checkout
        pytest.skip(str(err))


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_models_lists_scene_vlm(capsys):
    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"dinov2-small", "minilm", "smollm2-135m", "scene-vlm"} <= set(lines)
    from attnscope.models import scene_vlm

    rows = {r["name"]: r for r in zoo.zoo_state()}
    trained = (scene_vlm.WEIGHTS_DIR / scene_vlm.WEIGHTS_FILE).is_file()
    expected = trained and rows["dinov2-small"]["installed"] and rows["smollm2-135m"]["installed"]
    assert rows["scene-vlm"]["installed"] == expected
    assert ("missing" in lines["scene-vlm"]) == (not expected)


def test_generate_steering_changes_text_and_zero_strength_does_not(smollm, use, capsys):
    use("smollm2-135m", smollm)
    ids = smollm.encode(PROMPT)["input_ids"][0].tolist()
    rome = smollm.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    span = "/".join(str(i) for i, t in enumerate(ids) if t == rome)  # the key positions of " Rome"
    base = ["generate", "--model", "smollm2-135m", "--text", PROMPT, "--new-tokens", "3", "--json"]

    assert main([*base, "--steer", f"pai:alpha=3,keys={span},layers=20:30", "--compare"]) == 0
    strong = _json(capsys)
    assert strong["new_tokens"] == strong["unsteered"]["new_tokens"] == 3
    assert strong["steer"] == [f"pai:alpha=3,keys={span},layers=20:30"]
    assert strong["text"] != strong["unsteered"]["text"]  # the edit reached generate

    assert main([*base, "--steer", f"pai:alpha=0,keys={span}"]) == 0
    zero = _json(capsys)
    assert zero["text"] == strong["unsteered"]["text"]
    assert "unsteered" not in zero and zero["seconds"] > 0

    first, last = int(span.split("/")[0]), int(span.split("/")[-1])
    assert main([*base, "--steer", f"pai:alpha=3,keys={first}:{last + 1},layers=20:30"]) == 0  # a range of keys
    assert _json(capsys)["text"] == strong["text"]


def test_generate_plain_text_output_with_compare(smollm, use, capsys):
    use("smollm2-135m", smollm)
    assert main(["generate", "--model", "smollm2-135m", "--text", PROMPT, "--new-tokens", "1", "--compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("unsteered: ") and lines[1].startswith("steered (no --steer given): ")
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]


def test_generate_bad_spec_is_a_one_line_error(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--text", "hi", "--steer", "nosuchmethod:alpha=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method 'nosuchmethod'") and len(err.splitlines()) == 1
    for known in ("pai", "vcd", "heads", "fastv"):
        assert known in err
    assert main(["generate", "--model", "smollm2-135m", "--text", "hi", "--steer", "pai:alpha"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_heads_minilm_entropy_table(minilm, use, capsys, tmp_path):
    use("minilm", minilm)
    text = "Attention is all you need"
    keys = minilm.encode(text)["input_ids"].shape[1]
    out = tmp_path / "heads.json"
    assert main(["heads", "--model", "minilm", "--text", text, "--metrics", "entropy", "--top", "5",
                 "--json", str(out), "--csv", str(tmp_path / "heads.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("minilm: 72 heads") and "by entropy" in printed[0]
    rows = printed[2:7]  # header line, then the top 5
    shown = [float(r.split()[-1]) for r in rows]
    assert len(printed) >= 7 and shown == sorted(shown, reverse=True)
    doc = json.loads(out.read_text())
    layers, heads = minilm.hf.config.num_hidden_layers, minilm.hf.config.num_attention_heads
    assert len(doc["rows"]) == layers * heads == 72
    assert {(r["layer"], r["head"]) for r in doc["rows"]} == {(i, h) for i in range(layers) for h in range(heads)}
    assert all(0 <= r["entropy"] <= math.log(keys) + 1e-5 for r in doc["rows"])
    assert max(shown) == pytest.approx(max(r["entropy"] for r in doc["rows"]), abs=1e-3)
    assert len((tmp_path / "heads.csv").read_text().splitlines()) == 73


def test_heads_needs_an_input_and_known_metrics(minilm, use, capsys):
    use("minilm", minilm)
    assert main(["heads", "--model", "minilm"]) == 2
    assert main(["heads", "--model", "minilm", "--text", "hi", "--metrics", "nonsense"]) == 2
    assert "unknown metrics" in capsys.readouterr().err


def test_eval_and_image_generation_refuse_text_models(minilm, smollm, use, capsys):
    use("minilm", minilm)
    use("smollm2-135m", smollm)
    for argv in (["eval", "pope", "--model", "minilm", "--n", "4"],
                 ["eval", "chair", "--model", "smollm2-135m", "--n", "1"],
                 ["generate", "--model", "smollm2-135m", "--text", "What is this?", "--image", "chelsea"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "not a vision-language model" in err and len(err.splitlines()) == 1


def test_eval_pope_on_scene_vlm(scene, use, capsys, tmp_path):
    use("scene-vlm", scene)
    out = tmp_path / "pope.jsonl"
    assert main(["eval", "pope", "--model", "scene-vlm", "--n", "1", "--split", "random", "--new-tokens", "2",
                 "--boot", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "POPE on scene-vlm, baseline" in printed and "| random | 1 |" in printed
    for name in ("accuracy", "precision", "recall", "F1", "yes-ratio", "unparseable"):
        assert name in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["answer", "summary"]
    assert lines[0]["question"].startswith("Is there a") and lines[1]["split"] == "random"


def test_eval_chair_steered_on_scene_vlm(scene, use, capsys):
    use("scene-vlm", scene)
    assert main(["eval", "chair", "--model", "scene-vlm", "--n", "1", "--new-tokens", "3", "--boot", "20",
                 "--steer", "pai:alpha=0.5", "--json"]) == 0
    doc = _json(capsys)
    assert doc["benchmark"] == "chair" and doc["config"]["method"] == "pai" and doc["config"]["images"] == 1
    assert {"chair_s", "chair_i", "recall"} <= set(doc["metrics"]["ci"])
    assert main(["eval", "pope", "--model", "scene-vlm", "--split", "random,sideways"]) == 2
    assert "unknown POPE splits ['sideways']" in capsys.readouterr().err


def test_two_machines_under_accelerate_launch_equal_one_process(scene, use, tmp_path, capsys):
    """`accelerate launch --multi_gpu --num_machines 2 --machine_rank R --num_processes 2 ... --shard`, started twice on
    this machine, stands for two machines: each launcher runs in its own directory (`--out pope.jsonl` is relative, so
    they share no files), rank 1 (machine 1) sends its answers to rank 0 over the process group, and rank 0 writes the
    merged result, equal to a one-process run's bit for bit (timings aside); no shard file is left on either machine.
    (`--multi_gpu` is accelerate's multi-process launcher, torchrun; on CPUs it runs CPU processes. `--cpu` would start
    one process.)"""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import attnscope

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate is not installed (pip install attnscope[eval])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["eval", "pope", "--model", "scene-vlm", "--n", "3", "--new-tokens", "3", "--boot", "50", "--json"]
    src = str(Path(attnscope.__file__).resolve().parents[1])
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    machines = []
    for rank in (0, 1):
        (tmp_path / f"machine{rank}").mkdir()
        machines.append(subprocess.Popen(
            [launcher, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
             "--dynamo_backend", "no", "-m", "attnscope.cli", *args, "--shard", "--out", "pope.jsonl"],
            cwd=tmp_path / f"machine{rank}", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = [m.communicate(timeout=600) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [err[-2000:] for _, err in done]
    use("scene-vlm", scene)
    assert main([*args, "--out", str(tmp_path / "single.jsonl")]) == 0
    summary = lambda text: json.loads(next(x for x in text.splitlines() if x.startswith("{")))  # noqa: E731
    single, sharded = summary(capsys.readouterr().out), summary(done[0][0])
    assert sharded["config"]["processes"] == 2 and not done[1][0].strip()

    def exact(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.pop("seconds", None), r.pop("seconds_per_answer", None), r.get("config", {}).pop("processes", None)
        return rows

    assert exact(tmp_path / "machine0" / "pope.jsonl") == exact(tmp_path / "single.jsonl")
    assert [r["answer"] for r in exact(tmp_path / "single.jsonl") if r["type"] == "answer"]
    assert sorted(p.name for p in (tmp_path / "machine0").iterdir()) == ["pope.jsonl"]
    assert list((tmp_path / "machine1").iterdir()) == []
    drop = lambda m: {s: {k: v for k, v in x.items() if k != "seconds_per_answer"} for s, x in m.items()}  # noqa: E731
    assert drop(sharded["metrics"]) == drop(single["metrics"])


def test_eval_shard_options(scene, use, tmp_path, capsys, monkeypatch):
    """--shard INDEX/COUNT and --merge round trip; bad specs and a missing shard are one error line; --shard alone in a
    single process warns that nothing is split (`accelerate launch --cpu` starts one process)."""
    use("scene-vlm", scene)
    out = str(tmp_path / "pope.jsonl")
    base = ["eval", "pope", "--model", "scene-vlm", "--n", "1", "--split", "random", "--new-tokens", "2", "--boot", "10"]
    for argv, message in (([*base, "--shard", "3/3", "--out", out], "shard 3 of 3 does not exist"),
                          ([*base, "--shard", "1-2", "--out", out], "INDEX/COUNT"),
                          ([*base, "--merge"], "pass --out"),
                          ([*base, "--merge", "--shard", "0/2", "--out", out], "without --shard")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert main([*base, "--shard", "0/2", "--out", out]) == 0
    assert "merge all shards with --merge" in capsys.readouterr().out
    assert main([*base, "--merge", "--out", out]) == 2
    assert "shard(s) [1] of 2 are missing" in capsys.readouterr().err
    assert main([*base, "--shard", "1/2", "--out", out]) == 0 and main([*base, "--merge", "--out", out]) == 0
    assert "| random | 1 |" in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*base, "--shard", "--out", out]) == 0
    assert "this is the only process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1")  # launched, but --shard forgotten
    assert main([*base, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "add --shard" in err and len(err.splitlines()) == 1, err


def test_generate_on_a_model_split_over_cpu_and_disk_equals_the_unsplit_model(smollm, use, tmp_path, capsys):
    """--device-map / --max-memory / --offload-folder place the model (load's keywords); steered output unchanged."""
    base = ["generate", "--model", "smollm2-135m", "--text", PROMPT, "--new-tokens", "3", "--json",
            "--steer", "pai:alpha=1,keys=3,layers=12:30"]
    for extra, message in ((["--max-memory", "cpu"], "DEVICE=SIZE pairs"),
                           (["--offload-folder", str(tmp_path)], "only with a device map"),
                           (["--device-map", "{oops"], "not a JSON object"),
                           (["--device-map", '{"model.layers.0": "disk"}'], "pass offload_folder")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    # the real loader (a fresh model), before `use` points load() at the session's unsplit one
    assert main([*base, "--device-map", "auto", "--max-memory", "cpu=300MB", "--offload-folder", str(tmp_path)]) == 0
    split_out = _json(capsys)
    assert any(tmp_path.iterdir())  # layers went to disk
    use("smollm2-135m", smollm)
    assert main(base) == 0
    plain = _json(capsys)
    assert plain.pop("seconds") > 0 and split_out.pop("seconds") > 0 and plain == split_out


def test_launched_eval_processes_offload_to_folders_of_their_own(monkeypatch, tmp_path):
    """Under a launcher, K processes of one machine get the same --offload-folder; placing into one folder, a process
    rewrites the weight files another is reading (bus errors, or zeros read as weights). Each gets rank-RANK in it."""
    from attnscope.models import zoo as zoo_mod

    seen = []

    class Stop(Exception):
        pass

    def fake_load(name, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(zoo_mod, "load", fake_load)
    base = ["eval", "pope", "--n", "1", "--device-map", "auto", "--max-memory", "cpu=300MB", "--offload-folder",
            str(tmp_path / "offload"), "--out", str(tmp_path / "pope.jsonl"), "--shard"]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(Stop):
            main(base)
    assert [k["offload_folder"] for k in seen] == [str(tmp_path / "offload" / "rank-0"), str(tmp_path / "offload" / "rank-1")]
