"""`CheckResult`: the verdict table `attnscope check` prints, one `Row` per check."""
from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, REFUSED = "pass", "FAIL", "REFUSED"


@dataclass
class Row:
    """One check: what was compared, its status (pass / FAIL / REFUSED), the largest difference seen (None where
    nothing numeric was compared) and a one-line detail (the worst place, or the error's own message)."""

    check: str
    status: str
    max_diff: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "max_diff": self.max_diff, "detail": self.detail}


@dataclass
class CheckResult:
    """The rows of one `attnscope.check` run on one model and probe.

    `ok` is True when no row FAILs: every number was either verified or refused by name (never silently wrong);
    `passed` is True when every row passes. `max_diff` is the largest |captured - eager| over all compared rows."""

    model: str
    rows: list[Row] = field(default_factory=list)
    atol: float = 0.0
    transformers: str = ""
    probe: str = ""

    @property
    def ok(self) -> bool:
        return not any(r.status == FAIL for r in self.rows)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.status == PASS for r in self.rows)

    @property
    def status(self) -> str:
        """pass, REFUSED (something refused by name, nothing failed) or FAIL."""
        if not self.ok:
            return FAIL
        return PASS if self.passed else REFUSED

    @property
    def max_diff(self) -> float | None:
        diffs = [r.max_diff for r in self.rows if r.max_diff is not None]
        return max(diffs) if diffs else None

    def first(self, status: str) -> Row | None:
        return next((r for r in self.rows if r.status == status), None)

    def add(self, check: str, status: str, max_diff: float | None = None, detail: str = "") -> Row:
        row = Row(check, status, max_diff, " ".join(str(detail).split()))
        self.rows.append(row)
        return row

    def to_markdown(self) -> str:
        head = (f"attnscope check {self.model} (transformers {self.transformers}, tolerance {self.atol:g}; probe: "
                f"{self.probe}): {self.status}\n\n")
        lines = ["| check | verdict | max \\|captured - eager\\| | detail |", "|---|---|---|---|"]
        for r in self.rows:
            detail = r.detail.replace("|", "\\|")
            lines.append(f"| {r.check} | {r.status} | {_num(r.max_diff)} | {detail} |")
        return head + "\n".join(lines) + "\n"

    def __str__(self) -> str:
        width = max([len(r.check) for r in self.rows] + [5])
        out = [f"attnscope check {self.model}  (transformers {self.transformers}, tolerance {self.atol:g})",
               f"probe: {self.probe}", ""]
        for r in self.rows:
            out.append(f"{r.check:<{width}}  {r.status:<7}  {_num(r.max_diff):>8}  {r.detail}")
        n = {s: sum(r.status == s for r in self.rows) for s in (PASS, FAIL, REFUSED)}
        out += ["", f"{self.status}: {n[PASS]} pass, {n[FAIL]} FAIL, {n[REFUSED]} REFUSED"]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"model": self.model, "status": self.status, "ok": self.ok, "atol": self.atol,
                "transformers": self.transformers, "probe": self.probe, "max_diff": self.max_diff,
                "rows": [r.to_dict() for r in self.rows]}


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"
