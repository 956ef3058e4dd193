"""`Explanation`: scores over a sequence's input tokens, the map over each image at pixel resolution, and the
method, parameters and target that produced them. Saved as JSON or safetensors (never pickle), rendered as PNG or
self-contained HTML.

A saved file carries the checksum of its own metadata (field "metadata_checksum", `capture.checksums.sealed`: the
method, parameters, target, token maps, sizes and, in a .json file, the scores) and a .safetensors file the checksum
of each tensor ("tensors"), checked by `load`: a label or score edited after writing raises
`ExplanationFileError`; a file written before them loads with an `UncheckedMetadataWarning`."""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..capture.checksums import entry_checksum, sealed, tensor_checksum
from ..capture.trace import check_metadata
from ..core.tokens import TokenMap

FORMAT = "attnscope.explanation/1"
LABELS = "the method, its parameters, the target, a token or its role, the scores"


class ExplanationFileError(ValueError):
    """A file that is not a valid attnscope explanation, or one changed after it was written."""


@dataclass
class Explanation:
    """Scores over the tokens of one sequence (`stream`), with its `TokenMap`.

    `pixel_size` is the (height, width) of the model's pixel input and `patch` the (height, width) of one patch in
    pixels; a patch at grid (r, c) covers pixels [r*ph:(r+1)*ph, c*pw:(c+1)*pw]. Pixel-level methods (gradient x
    input, integrated gradients) also keep `pixel_scores` [H, W], which `image_map` returns as they are."""

    method: str
    params: dict
    scores: torch.Tensor
    tokens: TokenMap
    stream: str
    target: dict = field(default_factory=dict)
    target_value: float | None = None
    model: str = ""
    pixel_size: tuple[int, int] | None = None
    patch: tuple[int, int] | None = None
    pixel_scores: torch.Tensor | None = None
    photo: Image.Image | None = None
    seconds: float | None = None
    extras: dict = field(default_factory=dict)
    # kept in memory only, for .faithfulness(): the wrapped model, the inputs and the bound target
    _model: object = field(default=None, repr=False, compare=False)
    _inputs: dict | None = field(default=None, repr=False, compare=False)
    _target: object = field(default=None, repr=False, compare=False)
    _pixels: object = field(default=None, repr=False, compare=False)  # the pixel input as [H, W, 3] RGB, for display

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores).detach().float().cpu().reshape(-1)
        if self.scores.numel() != len(self.tokens):
            raise ValueError(f"{self.scores.numel()} scores for {len(self.tokens)} tokens")
        if self.pixel_scores is not None:
            self.pixel_scores = torch.as_tensor(self.pixel_scores).detach().float().cpu()

    def __repr__(self) -> str:
        top = ", ".join(f"{t}={s:.3g}" for _, t, s in self.top(3))
        return f"Explanation({self.method!r}, {self.model!r}, stream={self.stream!r}, {len(self.tokens)} tokens, top: {top})"

    # --- reading ------------------------------------------------------------------------------------------
    def top(self, k: int = 5, roles: tuple[str, ...] | None = None) -> list[tuple[int, str, float]]:
        """The k highest-scoring positions as (position, token, score), optionally among `roles`."""
        idx = [i for i, r in enumerate(self.tokens.roles) if roles is None or r in roles]
        order = sorted(idx, key=lambda i: -float(self.scores[i]))[:k]
        return [(i, self.tokens.tokens[i], float(self.scores[i])) for i in order]

    @property
    def images(self) -> int:
        return len(self.tokens.grids)

    def grid(self, image: int = 0) -> np.ndarray:
        """Scores over image `image`'s patch grid, shape (rows, cols)."""
        if image >= len(self.tokens.grids):
            raise ValueError(f"this explanation has {len(self.tokens.grids)} image(s) in its {self.stream!r} tokens; "
                             "explain an input with an image, or read .scores over the tokens")
        rows, cols = self.tokens.grids[image]
        return self.scores.numpy()[self.tokens.image_positions(image)].reshape(rows, cols)

    def covered(self) -> np.ndarray:
        """[H, W] bool: the pixels the patch grid of image 0 covers (a size that is not a multiple of the patch size
        leaves a strip on the right/bottom that the model never sees)."""
        rows, cols = self.tokens.grids[0]
        ph, pw = self._cell()
        out = np.zeros(self.pixel_size, dtype=bool)
        out[: rows * ph, : cols * pw] = True
        return out

    def _cell(self) -> tuple[int, int]:
        if self.patch is not None:
            return self.patch
        rows, cols = self.tokens.grids[0]
        return self.pixel_size[0] // rows, self.pixel_size[1] // cols

    def image_map(self, image: int = 0, size: tuple[int, int] | str | None = None, mode: str = "bilinear") -> np.ndarray:
        """The map over image `image` at pixel resolution: [H, W] float32 aligned with the model's pixel input
        (patch (r, c) over its own pixels; pixels no patch covers get the map's minimum). `size=(h, w)` resizes
        to another resolution, `size="photo"` to the photo the explanation was made from. `mode`: "bilinear"
        (smooth, centred on patch centres) or "nearest" (constant per patch)."""
        if self.pixel_size is None:
            raise ValueError(f"this explanation ({self.model}, stream {self.stream!r}) has no pixel input; read .scores")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest'; got {mode!r}")
        if self.pixel_scores is not None and image == 0:
            full = self.pixel_scores.numpy().astype(np.float32)
        else:
            grid = torch.as_tensor(self.grid(image), dtype=torch.float32)[None, None]
            rows, cols = grid.shape[-2:]
            ph, pw = self._cell()
            up = torch.nn.functional.interpolate(grid, size=(rows * ph, cols * pw), mode=mode,
                                                 **({"align_corners": False} if mode == "bilinear" else {}))[0, 0]
            full = np.full(self.pixel_size, float(grid.min()), dtype=np.float32)
            full[: rows * ph, : cols * pw] = up.numpy()[: self.pixel_size[0], : self.pixel_size[1]]
        if size is None:
            return full
        if size == "photo":
            if self.photo is None:
                raise ValueError("no photo is attached to this explanation; pass size=(height, width)")
            size = (self.photo.size[1], self.photo.size[0])
        t = torch.from_numpy(full)[None, None]
        return torch.nn.functional.interpolate(t, size=tuple(size), mode=mode,
                                               **({"align_corners": False} if mode == "bilinear" else {}))[0, 0].numpy()

    # --- evaluation ---------------------------------------------------------------------------------------
    def faithfulness(self, **kwargs):
        """Deletion / insertion AUC and the negative-perturbation test, each beside a random map's; see
        `attnscope.evaluate.faithfulness.faithfulness` for the options."""
        from ..evaluate.faithfulness import faithfulness  # evaluate is downstream of explain; imported on use

        return faithfulness(self, **kwargs)

    # --- files --------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"format": FORMAT, "method": self.method, "params": _plain(self.params), "stream": self.stream,
                "target": _plain(self.target), "target_value": self.target_value, "model": self.model,
                "pixel_size": self.pixel_size, "patch": self.patch, "seconds": self.seconds,
                "extras": _plain(self.extras), "tokens": self.tokens.to_dict()}

    def to_dict(self) -> dict:
        pixels = {} if self.pixel_scores is None else {"pixel_scores": self.pixel_scores.tolist()}
        return self.meta() | {"scores": self.scores.tolist()} | pixels

    def save(self, path: str | Path) -> Path:
        """By suffix: .json (scores, pixel scores + metadata), .safetensors (tensors + JSON metadata), .png (figure), .html."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.write_text(json.dumps(sealed(self.to_dict()), indent=1))
        elif suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {"scores": self.scores.contiguous()}
            if self.pixel_scores is not None:
                tensors["pixel_scores"] = self.pixel_scores.contiguous()
            sums = {name: tensor_checksum(t) for name, t in tensors.items()}
            save_file(tensors, str(path), metadata={"attnscope": json.dumps(sealed(self.meta() | {"tensors": sums}))})
        elif suffix == ".png":
            import matplotlib.pyplot as plt

            fig = self.show()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        elif suffix in (".html", ".htm"):
            path.write_text(self.to_html())
        else:
            raise ValueError(f"cannot save an explanation as {suffix or 'a file with no suffix'}; use .json, .safetensors, .png or .html")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        """Read a .json or .safetensors file written by `save` (no model attached: faithfulness needs one), checking
        its metadata (and a .safetensors file's tensors) against the checksums written with it: a label or score
        edited after writing raises `ExplanationFileError`; a file written before them loads with an
        `UncheckedMetadataWarning`."""
        path = Path(path)
        pixel, tensors = None, {}
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("attnscope")
                if raw is None:
                    raise ExplanationFileError(f"{path} is not an attnscope explanation (no 'attnscope' metadata)")
                meta = json.loads(raw)
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            scores, pixel = tensors.get("scores"), tensors.get("pixel_scores")
        else:
            meta = json.loads(path.read_text())
            scores = torch.tensor(meta["scores"]) if isinstance(meta, dict) and "scores" in meta else None
            if isinstance(meta, dict) and meta.get("pixel_scores") is not None:
                pixel = torch.tensor(meta["pixel_scores"], dtype=torch.float32)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ExplanationFileError(f"{path}: unsupported explanation format {found!r}; expected {FORMAT}")
        check_metadata(meta, path, what="explanation", labels=LABELS, resave="Explanation.save",
                       error=ExplanationFileError)
        if path.suffix.lower() == ".safetensors":
            _check_tensors(meta.get("tensors"), tensors, path)
        if scores is None:
            raise ExplanationFileError(f"{path}: an explanation file without scores")
        return cls(meta["method"], meta["params"], scores, TokenMap.from_dict(meta["tokens"]), meta["stream"],
                   meta["target"], meta["target_value"], meta["model"],
                   tuple(meta["pixel_size"]) if meta.get("pixel_size") else None,
                   tuple(meta["patch"]) if meta.get("patch") else None, pixel, None, meta.get("seconds"),
                   meta.get("extras", {}))

    # --- rendering ----------------------------------------------------------------------------------------
    def title(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return f"{self.method}({params})" if params else self.method

    def show(self, ax=None):
        """A matplotlib figure: the map over the photo/pixels for images (with a colour bar in the method's score
        units, and detected attention sinks boxed in cyan with a legend), a bar per token for text."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            wide = self.pixel_size is None
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(self.tokens)) if wide else 4.2, 3.2 if wide else 4.4))
        if self.pixel_size is not None and self.images:
            background = self.photo if self.photo is not None else self._pixels
            heat = self.image_map(size="photo" if self.photo is not None else None)
            if background is not None:
                ax.imshow(background)
            im = ax.imshow(heat, cmap="inferno", alpha=0.55 if background is not None else 1.0)
            ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"{self.method} score")
            boxed = False
            for pos in self.tokens.sinks if hasattr(self.tokens, "sinks") else []:
                patch = self.tokens.patch[pos]
                if patch is not None and patch[0] == 0:
                    ph, pw = self._cell()
                    sy = (self.photo.size[1] / self.pixel_size[0]) if self.photo is not None else 1.0
                    sx = (self.photo.size[0] / self.pixel_size[1]) if self.photo is not None else 1.0
                    ax.add_patch(matplotlib.patches.Rectangle(((patch[2]) * pw * sx, patch[1] * ph * sy), pw * sx, ph * sy,
                                                              fill=False, ec="cyan", lw=1, label=None if boxed else
                                                              "attention sink (explain/sinks.py)"))
                    boxed = True
            if boxed:  # say what the cyan boxes are
                ax.legend(loc="lower left", fontsize=6, framealpha=0.7, handlelength=1)
            ax.axis("off")
        else:
            vals = self.scores.numpy()
            ax.bar(range(len(vals)), vals, color=["#c44" if v > 0 else "#48c" for v in vals])
            ax.set_xticks(range(len(vals)), [t.replace("Ġ", "·").replace("Ċ", "\\n") for t in self.tokens.tokens],
                          rotation=90, fontsize=7)
        import textwrap

        title = textwrap.fill(f"{self.model}: {self.title()}", 60)
        ax.set_title(f"{title}\ntarget {self.target.get('name', '')}"
                     + (f" = {self.target_value:.3g}" if self.target_value is not None else ""), fontsize=7)
        if fig is not None:
            fig.tight_layout()
        return fig if fig is not None else ax.figure

    def to_html(self) -> str:
        """Self-contained HTML (no network): a PNG for image maps, coloured tokens for text. A stub until the
        viewer renders explanations itself."""
        head = (f"<h3>{html.escape(self.model)}: {html.escape(self.title())}</h3>"
                f"<p>target: {html.escape(json.dumps(_plain(self.target)))} = {self.target_value}</p>")
        body = ""
        if self.pixel_size is not None and self.images:
            import matplotlib.pyplot as plt

            fig = self.show()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            body += f'<img alt="map" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
        vals = self.scores.numpy()
        scale = float(np.abs(vals).max()) or 1.0
        spans = []
        for tok, role, v in zip(self.tokens.tokens, self.tokens.roles, vals):
            if role == "image":
                continue
            a = min(1.0, abs(float(v)) / scale)
            colour = f"rgba(220,60,60,{a:.2f})" if v >= 0 else f"rgba(60,120,220,{a:.2f})"
            spans.append(f'<span title="{float(v):.4g}" style="background:{colour};padding:1px">{html.escape(tok)}</span>')
        body += "<p style='font-family:monospace;line-height:1.8'>" + " ".join(spans) + "</p>"
        return f"<!doctype html><html><head><meta charset='utf-8'><title>attnscope explanation</title></head><body>{head}{body}</body></html>"


def _check_tensors(sums: dict | None, tensors: dict, path) -> None:
    """The tensors of a .safetensors explanation are the ones its metadata lists, each matching its checksum
    (`sums` None: a file written before they were recorded, whose metadata warned already)."""
    if sums is None:
        return
    if not isinstance(sums, dict) or set(sums) != set(tensors) or "scores" not in tensors:
        raise ExplanationFileError(f"{path}: holds tensors {sorted(tensors)}, its metadata lists "
                                   f"{sorted(sums) if isinstance(sums, dict) else sums!r} (the file was edited)")
    for name, tensor in tensors.items():
        try:
            want = entry_checksum({"checksum": sums[name]})
        except ValueError as err:
            raise ExplanationFileError(f"{path}: tensor {name!r}: {err}") from err
        if tensor_checksum(tensor, want["algorithm"]) != want:
            raise ExplanationFileError(f"{path}: tensor {name!r} does not match its checksum (the file was changed or "
                                       "damaged after it was written)")


def _plain(value):
    """JSON-safe copy: tensors to lists, tuples to lists, private keys dropped."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
