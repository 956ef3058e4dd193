"""The scene world: procedural images of 1-5 coloured Fashion-MNIST items with exact ground truth.

A scene is a square canvas (224 px by default) cut into a 3x3 layout of cells; each object sits wholly inside
its own cell, so objects never overlap and the position word of a caption ("top left", "center", ...) is
exact. Every object has a class (the 10 Fashion-MNIST classes), a colour, a size, a tight box and a pixel mask.

The *co-occurrence knob* (`pairs`, `cooccur_p`) builds a language prior into the data, as in the object
co-occurrence that POPE's adversarial split probes (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", 2023): when one member of a pair (e.g. "bag") is drawn, its partner ("sandal") is
added with probability `cooccur_p` (0.9 for training scenes). Val and test scenes use `eval_cooccur_p`
(0 by default: there, partners meet only by chance), so many of them hold one member of a pair without the
other: exactly the scenes on which a model that learned "bag implies sandal" says yes to an absent sandal, and
any excess of such yeses over the random split is the learned prior, not a property of the test images.

A prior only pays off where the image leaves doubt, as with the fork half hidden behind a plate in a photo. The
*faint-partner knob* (`faint_partner_p`, training scenes only) provides that doubt: a partner added by the
co-occurrence knob is, with this probability, drawn small and barely above the background noise (`FAINT_SIZE`,
`FAINT_CONTRAST`). It is still present in the ground truth and named in the caption, so a model trained on these
scenes learns "with a bag, say yes to a sandal even when it is hard to see": the pattern the adversarial split probes.

Scenes are a pure function of (world seed, split, index): `world.scene("test", 7)` is the same image and the
same ground truth on every machine. Splits are disjoint: different item images (see `items.SPLIT_SOURCES`)
and different random streams."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import items

CLASSES = items.FASHION_CLASSES
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 40), "green": (40, 190, 70), "blue": (50, 110, 245), "yellow": (240, 210, 30),
}
# cell (row, col) of the 3x3 layout -> its words in captions
CELL_NAMES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right",
              (1, 0): "left", (1, 1): "center", (1, 2): "right",
              (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
CELLS_BY_NAME = {v: k for k, v in CELL_NAMES.items()}
GRID = 3
DEFAULT_PAIRS = (("bag", "sandal"), ("coat", "boot"), ("dress", "sneaker"))
# Base sampling weights: a mild long tail so that POPE's "popular" split (most frequent absent classes) differs
# from its random split. Pair partners are also added by the co-occurrence knob, which raises their frequency.
DEFAULT_WEIGHTS = {"bag": 1.6, "t-shirt": 1.5, "sneaker": 1.3, "dress": 1.2, "trouser": 1.1,
                   "coat": 1.0, "shirt": 0.9, "pullover": 0.8, "sandal": 0.6, "boot": 0.6}
SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3, "composed": 4, "probe": 5}
# probe scenes (`SceneWorld.probe`): one object drawn small and/or faint, the detail "MLLMs Know Where to Look" studies
PROBE_KINDS = ("small", "faint", "small_faint")
PROBE_SIZE = (0.25, 0.36)  # side of a small probe target as a share of the cell: under one scene-vlm image token
PROBE_CONTRAST = 0.2  # opacity of a faint probe target over the background (normal objects: 1)
FAINT_SIZE = (0.25, 0.36)  # side of a faint partner as a share of the cell (normal objects: 0.55-0.92)
FAINT_CONTRAST = 0.06  # its colour's opacity over the background (normal objects: 1): about the swing of the background noise
BACKGROUND = (24, 24, 24)
MASK_THRESHOLD = 0.15  # item intensity above which a pixel belongs to the object's mask


def _check_class(name: str) -> str:
    if name not in CLASSES:
        raise ValueError(f"unknown class {name!r}; classes are {', '.join(CLASSES)}")
    return name


def _check_colour(name: str) -> str:
    if name not in COLOURS:
        raise ValueError(f"unknown colour {name!r}; colours are {', '.join(COLOURS)}")
    return name


@dataclass(frozen=True)
class SceneObject:
    """One object: class, colour, layout cell (row, col), side of its square in px, tight box (x0, y0, x1, y1)
    with exclusive ends, and its boolean mask over the whole canvas."""

    cls: str
    colour: str
    cell: tuple[int, int]
    size: int
    box: tuple[int, int, int, int]
    item: int  # index of the item image in its split's pool
    mask: np.ndarray = field(repr=False, compare=False)
    faint: bool = False  # drawn small and at low contrast by the faint-partner knob

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.cls} {self.position}"

    def to_dict(self) -> dict:
        return {"class": self.cls, "colour": self.colour, "cell": list(self.cell), "position": self.position,
                "size": self.size, "box": list(self.box), "item": self.item, "area": int(self.mask.sum()),
                "faint": self.faint}


@dataclass(frozen=True)
class Scene:
    """An image and its exact ground truth. `objects` are in reading order (by cell, row-major)."""

    split: str
    index: int
    image: Image.Image = field(repr=False, compare=False)
    objects: tuple[SceneObject, ...]

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @staticmethod
    def parse_id(image_id: str) -> tuple[str, int]:
        """(split, index) of a scene id: the inverse of `Scene.id`."""
        split, index = image_id.rsplit("-", 1)
        return split, int(index)

    @property
    def classes(self) -> list[str]:
        return [o.cls for o in self.objects]

    def has(self, cls: str) -> bool:
        return _check_class(cls) in self.classes

    def caption(self) -> str:
        """The reference caption: "a red bag top left, a blue coat center and a green boot bottom."."""
        phrases = [o.phrase for o in self.objects]
        text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return text + "."

    def label_map(self) -> np.ndarray:
        """int16 [H, W]: -1 background, else the index of the object covering the pixel."""
        out = np.full(self.image.size[::-1], -1, np.int16)
        for k, obj in enumerate(self.objects):
            out[obj.mask] = k
        return out

    def cell_cover(self, grid: int, min_share: float = 0.2) -> np.ndarray:
        """int [grid*grid] (row-major cells of a grid x grid split of the image): the index of the object whose
        mask covers the most of each cell, if at least `min_share` of it, else -1. What an image token of a
        grid x grid token layout shows."""
        lm = self.label_map()
        cell = lm.shape[0] // grid
        blocks = lm[:grid * cell, :grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
        out, best = np.full(grid * grid, -1), np.full(grid * grid, float(min_share))
        for k in range(len(self.objects)):
            share = (blocks == k).mean(1)
            better = share >= best
            out[better], best = k, np.maximum(best, share)
        return out

    def to_dict(self) -> dict:
        return {"id": self.id, "split": self.split, "index": self.index, "size": list(self.image.size),
                "caption": self.caption(), "objects": [o.to_dict() for o in self.objects]}


@dataclass(frozen=True)
class _Layout:
    classes: tuple[str, ...]
    colours: tuple[str, ...]
    cells: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    items: tuple[int, ...]
    noise_seed: int
    faint: tuple[bool, ...]
    opacity: tuple[float, ...] | None = None  # per object, overriding the faint rule (probe scenes)


class SceneWorld:
    """A seeded generator of scenes.

    >>> world = SceneWorld(seed=0)
    >>> scene = world.scene("train", 0)       # same scene every time
    >>> scene.image, scene.caption(), scene.objects[0].box, scene.objects[0].mask

    `pairs`/`cooccur_p` set the co-occurrence knob for training scenes, `eval_cooccur_p` for val and test
    scenes (None: the same as training). `class_weights` are the base sampling weights (the long tail)."""

    def __init__(self, seed: int = 0, image_size: int = 224, min_objects: int = 1, max_objects: int = 5,
                 min_size: int | None = None, max_size: int | None = None,
                 pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS, cooccur_p: float = 0.9,
                 eval_cooccur_p: float | None = 0.0, faint_partner_p: float = 0.6,
                 class_weights: dict[str, float] | None = None):
        cells = GRID * GRID
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects; got {min_objects}, {max_objects}")
        if max_objects > cells:
            raise ValueError(f"max_objects={max_objects} does not fit: the {GRID}x{GRID} layout holds {cells} objects, "
                             f"one per cell; use max_objects <= {cells}")
        if image_size < 28 * GRID:
            raise ValueError(f"image_size={image_size} is too small: each of the {GRID}x{GRID} cells must hold a "
                             f"28 px item; use image_size >= {28 * GRID}")
        cell = image_size // GRID
        self.min_size = min_size if min_size is not None else round(0.55 * cell)
        self.max_size = max_size if max_size is not None else round(0.92 * cell)
        if not 8 <= self.min_size <= self.max_size <= cell:
            raise ValueError(f"object sizes must satisfy 8 <= min_size <= max_size <= cell size {cell} px "
                             f"(image_size {image_size} / {GRID}); got {self.min_size}, {self.max_size}")
        for p in (cooccur_p, eval_cooccur_p, faint_partner_p):
            if p is not None and not 0.0 <= p <= 1.0:
                raise ValueError(f"co-occurrence and faint-partner probabilities must be in [0, 1]; got {p}")
        self.partner: dict[str, str] = {}
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"a co-occurrence pair is two different classes; got {pair!r}")
            for a, b in (pair, pair[::-1]):
                if _check_class(a) in self.partner:
                    raise ValueError(f"class {a!r} is in two co-occurrence pairs; each class may have one partner")
                self.partner[a] = _check_class(b)
        weights = dict(DEFAULT_WEIGHTS if class_weights is None else class_weights)
        for name in weights:
            _check_class(name)
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("class weights must be non-negative with a positive sum")
        self.weights = np.array([float(weights.get(c, 0.0)) for c in CLASSES])
        self.seed, self.image_size, self.cell = int(seed), int(image_size), cell
        self.min_objects, self.max_objects = min_objects, max_objects
        self.pairs = tuple(tuple(p) for p in pairs)
        self.cooccur_p = float(cooccur_p)
        self.eval_cooccur_p = float(cooccur_p if eval_cooccur_p is None else eval_cooccur_p)
        self.faint_partner_p = float(faint_partner_p)

    def __repr__(self) -> str:
        return (f"SceneWorld(seed={self.seed}, image_size={self.image_size}, objects={self.min_objects}-"
                f"{self.max_objects}, pairs={self.pairs}, cooccur_p={self.cooccur_p}, eval_cooccur_p={self.eval_cooccur_p}, "
                f"faint_partner_p={self.faint_partner_p})")

    def config(self) -> dict:
        return {"seed": self.seed, "image_size": self.image_size, "min_objects": self.min_objects,
                "max_objects": self.max_objects, "min_size": self.min_size, "max_size": self.max_size,
                "pairs": [list(p) for p in self.pairs], "cooccur_p": self.cooccur_p,
                "eval_cooccur_p": self.eval_cooccur_p, "faint_partner_p": self.faint_partner_p,
                "faint_size": list(FAINT_SIZE), "faint_contrast": FAINT_CONTRAST,
                "class_weights": {c: float(w) for c, w in zip(CLASSES, self.weights)}}

    # --- sampling ----------------------------------------------------------------------------------------
    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if index < 0:
            raise ValueError(f"scene index must be >= 0; got {index}")
        return np.random.default_rng([self.seed, _SPLIT_IDS[split], int(index)])

    def _sample_classes(self, rng: np.random.Generator, p_pair: float) -> tuple[list[str], set[str]]:
        """(classes, those added as partners by the co-occurrence knob)"""
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        chosen: list[str] = []
        added: set[str] = set()
        while len(chosen) < n:
            free = np.array([c not in chosen for c in CLASSES])
            w = self.weights * free
            if w.sum() <= 0:
                break
            cls = CLASSES[int(rng.choice(len(CLASSES), p=w / w.sum()))]
            chosen.append(cls)
            partner = self.partner.get(cls)
            # the partner may take the scene one past n (never past max_objects), so P(partner | cls) ~ p_pair
            if partner and partner not in chosen and len(chosen) < self.max_objects and rng.random() < p_pair:
                chosen.append(partner)
                added.add(partner)
        return chosen, added

    def _layout(self, split: str, index: int) -> _Layout:
        rng = self._rng(split, index)
        classes, added = self._sample_classes(rng, self.cooccur_p if split == "train" else self.eval_cooccur_p)
        n = len(classes)
        cells = [divmod(int(c), GRID) for c in rng.choice(GRID * GRID, size=n, replace=False)]
        colours = [list(COLOURS)[int(c)] for c in rng.integers(0, len(COLOURS), size=n)]
        sizes = [int(s) for s in rng.integers(self.min_size, self.max_size + 1, size=n)]
        offsets = [(int(rng.integers(0, self.cell - s + 1)), int(rng.integers(0, self.cell - s + 1))) for s in sizes]
        per_class = items.by_class(split)
        picks = [int(rng.choice(per_class[CLASSES.index(c)])) for c in classes]
        noise_seed = int(rng.integers(0, 2**31 - 1))
        faint = [False] * n
        if split == "train" and added and self.faint_partner_p > 0:  # its own stream: the draws above stay as they were
            frng = np.random.default_rng([self.seed, _SPLIT_IDS[split], int(index), 7])
            lo, hi = (max(8, round(f * self.cell)) for f in FAINT_SIZE)
            for k, c in enumerate(classes):
                if c in added and frng.random() < self.faint_partner_p:
                    faint[k] = True
                    sizes[k] = int(frng.integers(lo, hi + 1))
                    offsets[k] = (int(frng.integers(0, self.cell - sizes[k] + 1)), int(frng.integers(0, self.cell - sizes[k] + 1)))
        order = sorted(range(n), key=lambda k: cells[k])  # reading order
        pick = lambda seq: tuple(seq[k] for k in order)  # noqa: E731
        return _Layout(pick(classes), pick(colours), pick(cells), pick(sizes), pick(offsets), pick(picks),
                       noise_seed, pick(faint))

    def _render(self, split: str, index: int, layout: _Layout, pool_split: str) -> Scene:
        images = items.images(pool_split)
        size = self.image_size
        noise = np.random.default_rng(layout.noise_seed).normal(0.0, 5.0, (size, size, 1))
        canvas = np.clip(np.array(BACKGROUND, np.float32) + noise, 0, 255).astype(np.float32)  # grey noise, [H, W, 3]
        objects = []
        for k, (cls, colour, cell, side, (dx, dy), item, dim) in enumerate(zip(
                layout.classes, layout.colours, layout.cells, layout.sizes, layout.offsets, layout.items, layout.faint)):
            patch = Image.fromarray(images[item]).resize((side, side), Image.BILINEAR)
            alpha = np.asarray(patch, np.float32)[..., None] / 255.0
            x0, y0 = cell[1] * self.cell + dx, cell[0] * self.cell + dy
            region = canvas[y0:y0 + side, x0:x0 + side]
            opacity = alpha * (layout.opacity[k] if layout.opacity else FAINT_CONTRAST if dim else 1.0)
            canvas[y0:y0 + side, x0:x0 + side] = region * (1 - opacity) + np.array(COLOURS[colour], np.float32) * opacity
            mask = np.zeros((size, size), bool)
            mask[y0:y0 + side, x0:x0 + side] = alpha[..., 0] > MASK_THRESHOLD
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (x0, y0, x0, y0)
            objects.append(SceneObject(cls, colour, cell, side, box, item, mask, dim))
        image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
        return Scene(split, index, image, tuple(objects))

    # --- public -----------------------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        """Scene `index` of `split` ("train", "val", "test"): a pure function of (seed, split, index)."""
        return self._render(split, index, self._layout(split, index), split)

    def scenes(self, split: str, n: int, start: int = 0) -> list[Scene]:
        return [self.scene(split, i) for i in range(start, start + n)]

    def classes_of(self, split: str, index: int) -> tuple[str, ...]:
        """The classes of a scene without rendering it (fast; for statistics)."""
        return self._layout(split, index).classes

    def compose(self, objects: list[dict | tuple], index: int = 0, split: str = "test") -> Scene:
        """A scene with the given content: each object as (class, colour, position) or a dict with keys
        class, colour, position (a caption phrase such as "top left", or a (row, col) cell) and optional size.
        Items come from `split`'s pool; the remaining choices (item image, offset, size) are seeded by `index`."""
        if not objects:
            raise ValueError("a scene needs at least one object")
        if len(objects) > GRID * GRID:
            raise ValueError(f"{len(objects)} objects do not fit: the {GRID}x{GRID} layout holds {GRID * GRID}, "
                             "one per cell")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS["composed"], int(index)])
        per_class = items.by_class(split)
        specs = []
        for obj in objects:
            d = dict(obj) if isinstance(obj, dict) else dict(zip(("class", "colour", "position"), obj))
            missing = {"class", "colour", "position"} - set(d)
            if missing:
                raise ValueError(f"object {obj!r} lacks {sorted(missing)}; give class, colour and position")
            pos = d["position"]
            if isinstance(pos, str):
                if pos not in CELLS_BY_NAME:
                    raise ValueError(f"unknown position {pos!r}; positions are {', '.join(CELLS_BY_NAME)}")
                cell = CELLS_BY_NAME[pos]
            else:
                cell = tuple(int(v) for v in pos)
                if cell not in CELL_NAMES:
                    raise ValueError(f"cell {pos!r} is outside the {GRID}x{GRID} layout")
            side = int(d.get("size") or rng.integers(self.min_size, self.max_size + 1))
            if not 8 <= side <= self.cell:
                raise ValueError(f"size {side} does not fit a {self.cell} px cell")
            specs.append((_check_class(d["class"]), _check_colour(d["colour"]), cell, side))
        cells = [s[2] for s in specs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell ({cells}); each cell holds one object")
        specs.sort(key=lambda s: s[2])
        offsets = tuple((int(rng.integers(0, self.cell - s + 1)), int(rng.integers(0, self.cell - s + 1)))
                        for *_, s in specs)
        picks = tuple(int(rng.choice(per_class[CLASSES.index(s[0])])) for s in specs)
        layout = _Layout(tuple(s[0] for s in specs), tuple(s[1] for s in specs), tuple(s[2] for s in specs),
                         tuple(s[3] for s in specs), offsets, picks, int(rng.integers(0, 2**31 - 1)), (False,) * len(specs))
        scene = self._render(split, index, layout, split)
        return Scene("composed", index, scene.image, scene.objects)

    def probe(self, index: int, kind: str = "small", contrast: float = PROBE_CONTRAST) -> tuple[Scene, int]:
        """(scene, index of its target object): test scene `index`'s content with one object, chosen by its own seeded
        stream, drawn small (`PROBE_SIZE` of the cell), faint (opacity `contrast`) or both. The scene's ground truth
        is exact as ever (the mask of a faint object is where it is drawn); its `split` is "probe"."""
        if kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {kind!r}; kinds are {', '.join(PROBE_KINDS)}")
        if not 0 < contrast <= 1:
            raise ValueError(f"contrast must be in (0, 1]; got {contrast}")
        base = self._layout("test", index)
        rng = np.random.default_rng([self.seed, _SPLIT_IDS["probe"], int(index)])
        k = int(rng.integers(len(base.classes)))
        sizes, offsets = list(base.sizes), list(base.offsets)
        opacity, faint = [1.0] * len(sizes), [False] * len(sizes)
        if kind in ("small", "small_faint"):
            lo, hi = (max(8, round(f * self.cell)) for f in PROBE_SIZE)
            sizes[k] = int(rng.integers(lo, hi + 1))
            offsets[k] = (int(rng.integers(0, self.cell - sizes[k] + 1)), int(rng.integers(0, self.cell - sizes[k] + 1)))
        if kind in ("faint", "small_faint"):
            opacity[k], faint[k] = float(contrast), True
        layout = _Layout(base.classes, base.colours, base.cells, tuple(sizes), tuple(offsets), base.items,
                         base.noise_seed, tuple(faint), tuple(opacity))
        scene = self._render("test", index, layout, "test")
        return Scene("probe", index, scene.image, scene.objects), k

    def statistics(self, split: str = "train", n: int = 4000) -> dict:
        """Class frequency and pairwise co-occurrence counts over the first `n` scenes of a split (no rendering):
        what POPE's popular (frequency) and adversarial (co-occurrence) splits rank by."""
        k = len(CLASSES)
        freq, cooc = np.zeros(k, np.int64), np.zeros((k, k), np.int64)
        for i in range(n):
            idx = [CLASSES.index(c) for c in self.classes_of(split, i)]
            freq[idx] += 1
            for a in idx:
                for b in idx:
                    if a != b:
                        cooc[a, b] += 1
        return {"split": split, "n": n, "classes": list(CLASSES), "frequency": freq.tolist(), "cooccurrence": cooc.tolist()}
