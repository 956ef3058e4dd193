"""TokenMap: what each position of a sequence is (image patch at row/col, CLS, text, generated, ...).

Methods select positions by role ("image", "last", "generated"), never by hard-coded index ranges."""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("cls", "register", "image", "special", "system", "text", "generated", "pad", "unknown", "prefix")
# "prefix": a vision token before the patch grid that is neither CLS nor a declared register (a distillation token)
CACHED_STREAMS = ("language", "text", "decoder")  # streams a KV cache feeds; their maps grow by a token per step
QUERY_STREAM = {"cross": "decoder"}  # streams whose queries are another stream's positions (keys: their own map)


@dataclass
class TokenMap:
    """Roles of one sequence. `patch[i]` is (image index, row, col) for image patches, else None;
    `grids[k]` is the (rows, cols) grid of image k; `sinks` lists attention-sink positions (tokens with massive
    activations or that take a large share of attention), filled by `attnscope.explain.sinks.detect_sinks`."""

    roles: list[str]
    tokens: list[str]
    patch: list[tuple[int, int, int] | None] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    sinks: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.patch:
            self.patch = [None] * len(self.roles)
        if not (len(self.roles) == len(self.tokens) == len(self.patch)):
            raise ValueError("roles, tokens and patch must have one entry per position")
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
        if any(not 0 <= i < len(self.roles) for i in self.sinks):
            raise ValueError(f"sink positions {self.sinks} fall outside the sequence of {len(self.roles)} positions")

    def __len__(self) -> int:
        return len(self.roles)

    @classmethod
    def unknown(cls, length: int) -> TokenMap:
        return cls(["unknown"] * length, [""] * length)

    @classmethod
    def vision(cls, rows: int, cols: int, prefix: tuple[str, ...] = ("cls",), image: int = 0) -> TokenMap:
        """A vision-tower sequence: `prefix` roles (CLS, registers) then a row-major patch grid."""
        n = rows * cols
        patches = [(image, i // cols, i % cols) for i in range(n)]
        return cls(
            list(prefix) + ["image"] * n,
            [r.upper() if r == "cls" else r for r in prefix] + [f"patch({r},{c})" for _, r, c in patches],
            [None] * len(prefix) + patches,
            [(rows, cols)],
        )

    def positions(self, role: str) -> list[int]:
        """Positions holding `role`, or "last" for the final position."""
        if role == "last":
            return [len(self) - 1] if len(self) else []
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {ROLES + ('last',)}, or integer positions")
        return [i for i, r in enumerate(self.roles) if r == role]

    def spans(self) -> list[tuple[str, int, int]]:
        """Maximal runs of one role as (role, start, end) with `end` exclusive."""
        out: list[tuple[str, int, int]] = []
        for i, role in enumerate(self.roles):
            if out and out[-1][0] == role and out[-1][2] == i:
                out[-1] = (role, out[-1][1], i + 1)
            else:
                out.append((role, i, i + 1))
        return out

    def image_positions(self, image: int = 0) -> list[int]:
        """Positions of image `image`'s patches in row-major grid order."""
        found = [(p[1], p[2], i) for i, p in enumerate(self.patch) if p is not None and p[0] == image]
        return [i for _, _, i in sorted(found)]

    def copy(self) -> TokenMap:
        return TokenMap(list(self.roles), list(self.tokens), list(self.patch), list(self.grids), list(self.sinks))

    def concat(self, other: TokenMap) -> TokenMap:
        """This map followed by `other` (its positions shifted; image indices kept)."""
        n = len(self)
        return TokenMap(self.roles + other.roles, self.tokens + other.tokens, self.patch + other.patch,
                        self.grids + other.grids, self.sinks + [i + n for i in other.sinks])

    def head(self, n: int) -> TokenMap:
        """The first `n` positions."""
        return TokenMap(self.roles[:n], self.tokens[:n], self.patch[:n], list(self.grids), [i for i in self.sinks if i < n])

    def append(self, token: str, role: str = "generated") -> None:
        self.roles.append(role)
        self.tokens.append(token)
        self.patch.append(None)

    def to_dict(self) -> dict:
        return {"roles": self.roles, "tokens": self.tokens, "patch": self.patch, "grids": self.grids, "sinks": self.sinks}

    @classmethod
    def from_dict(cls, data: dict) -> TokenMap:
        patch = [tuple(p) if p is not None else None for p in data.get("patch") or []]
        return cls(list(data["roles"]), list(data["tokens"]), patch, [tuple(g) for g in data.get("grids", [])],
                   [int(i) for i in data.get("sinks") or []])
