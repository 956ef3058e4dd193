"""The verified-architectures generator (scripts/verified_architectures.py) runs in CI: every family of
scripts/tiny_families.py gets a row (no crash), families known to pass say pass, and every row that does not pass
says why. The table it writes has one row per family."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KNOWN_TO_PASS = ["llama", "bert", "vit", "dinov2", "llava"]


@pytest.fixture(scope="module")
def generator():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("verified_architectures", ROOT / "scripts" / "verified_architectures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 7 and cells[0] not in ("family", "---"):
            rows[cells[0]] = cells
    return rows


def test_every_family_gets_a_row_and_the_known_ones_pass(generator, tmp_path, capsys):
    out = tmp_path / "architectures.md"
    assert generator.main(["--out", str(out)]) == 0
    names = [f.name for f in generator.FAMILIES]
    assert len(names) >= 25 and len(set(names)) == len(names)
    table = _table(out)
    assert list(table) == names
    for name, (_, kind, cls, version, status, diff, detail) in table.items():
        assert status in ("pass", "FAIL", "REFUSED", "n/a"), name
        assert status == "n/a" or cls.endswith(("Model", "ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
        if status == "pass":
            assert float(diff) <= 1e-4 and not detail
        else:
            assert detail, f"{name} is {status} without saying why"
    for name in KNOWN_TO_PASS:
        assert table[name][4] == "pass", (name, table[name][6])
    assert "wrote" in capsys.readouterr().out


def test_a_subset_and_the_committed_table_lists_every_family(generator, tmp_path):
    out = tmp_path / "sub.md"
    generator.main(["--families", "llama,dinov2", "--out", str(out)])
    assert list(_table(out)) == ["llama", "dinov2"]
    committed = _table(ROOT / "docs" / "architectures.md")
    assert list(committed) == [f.name for f in generator.FAMILIES]  # regenerate the docs when a family is added
    with pytest.raises(SystemExit, match="unknown families"):
        generator.main(["--families", "no_such_family", "--out", str(out)])
