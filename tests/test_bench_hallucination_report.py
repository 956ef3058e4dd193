"""`bench/hallucination.py --report` states the sizes the stored run used (counted in its raw files), not this
invocation's defaults: a tiny fake raw folder with 2 POPE questions per split, 3 captions and 4 traced captions,
summarized without a model."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:the 95% intervals are bootstrapped over only")  # a tiny fake run

SPLITS = ("random", "popular", "adversarial")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_hallucination",
                                                  Path(__file__).resolve().parents[1] / "bench" / "hallucination.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def answers(method: str, per_split: int) -> list[dict]:
    rows = []
    for split in SPLITS:
        for i in range(per_split):
            label = i % 2 == 0
            rows.append({"type": "answer", "split": split, "image_id": f"test-{i:06d}", "object": "bag", "label": label,
                         "question": "Is there a bag in the image?", "answer": "Yes" if label else "No", "seconds": 0.5,
                         "new_tokens": 2, "parsed": "yes" if label else "no", "method": method})
    return rows + [{"type": "summary", "split": s, "n": per_split} for s in SPLITS]


def fake_run(raw: Path) -> None:
    raw.mkdir(parents=True)
    write_jsonl(raw / "pope-baseline.jsonl", answers("baseline", 2))
    write_jsonl(raw / "pope-pai.jsonl", answers("pai", 1))  # a method run with fewer questions
    write_jsonl(raw / "chair-pai.jsonl", [{"type": "caption", "image_id": f"test-{i:06d}", "caption": "a red bag center",
                                           "gold": ["bag"], "seconds": 1.0, "new_tokens": 5, "method": "pai"}
                                          for i in range(3)])
    (raw / "traces.json").write_text(json.dumps([{"image_id": f"test-{i:06d}", "text": ""} for i in range(4)]))


def test_report_states_the_stored_sizes_not_the_defaults(tmp_path):
    bench = load_bench()
    fake_run(tmp_path / "hallucination")
    assert bench.main(["--report", "--results", str(tmp_path), "--boot", "5"]) == 0
    cfg = json.loads((tmp_path / "hallucination.json").read_text())["config"]
    assert (cfg["n"], cfg["chair"], cfg["lookback"]) == (2, 3, 4)
    assert cfg["differ"] == {"pai": {"n": 1}}
    md = (tmp_path / "hallucination.md").read_text()
    setup = md[md.index("## Setup"):md.index("## POPE")]
    assert "* POPE: 2 questions per split" in setup and "* CHAIR: 3 captions" in setup
    assert "* Observations and Lookback Lens: 4 further captions" in setup
    assert "`pai` was run with other sizes: POPE questions per split 1." in setup
    sizes = [line for line in setup.splitlines() if line.startswith(("* POPE", "* CHAIR", "* Observations"))]
    assert len(sizes) == 3 and not re.search(r"\b(300|100|240)\b", "\n".join(sizes))  # not --n/--chair/--lookback's defaults


def test_sizes_that_differ_between_splits_or_are_missing_are_said(tmp_path):
    bench = load_bench()
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [r for r in answers("baseline", 2) if not (r["split"] == "adversarial" and r.get("image_id") == "test-000001")]
    write_jsonl(raw / "pope-baseline.jsonl", rows)
    sizes = bench.stored_sizes(raw)
    assert sizes == {"n": {"random": 2, "popular": 2, "adversarial": 1}, "chair": None, "lookback": None, "differ": {}}
    lines = "\n".join(bench.setup_lines(sizes | {"model": "m", "pairs": [["bag", "sandal"]]}))
    assert "questions per split: random 2, popular 2, adversarial 1" in lines
    assert "* CHAIR: not run" in lines and "* Observations and Lookback Lens: not run" in lines
