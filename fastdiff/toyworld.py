"""A small world fastdiff can learn on a CPU: procedural 128x128 scenes of one or two flat shapes,
their captions, edit triplets, and a judge that reads an image back from what the generator knows.

    scene     one or two shapes (kind, color, size, cell of a 3x3 grid) on a plain or two-tone
              (left/right) background; every color in a scene differs from the others
    caption   "a small red circle at the top left and a big blue star on the right on a white background"
    edit      (source scene, instruction, target scene): recolor a shape, recolor the background,
              change a shape into another, move it, remove it, add one; instructions phrased
              several ways
    split     a caption (generate) or a (caption, instruction) pair (edit) is held out when its
              CRC32 is 0 mod 10: training never draws one (`sample_scene(..., split="train")`),
              the quality bar draws only those (split="test")
    judge     per shape: color (nearest palette color of the pixels where the shape should be),
              kind (template match of the blob of its color), position (cell of that blob's
              centroid); background color per half; for an edit, whether the target scene is
              read back and the PSNR to the source outside the edited region

Everything is seeded: `random.Random(seed)` in, the same scenes out.
"""
from __future__ import annotations

import dataclasses
import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SIZE", "SHAPE_COLORS", "BACKGROUND_COLORS", "KINDS", "SIZES", "ROWS", "COLS", "EDIT_KINDS",
           "Shape", "Scene", "Edit", "draw_scene", "sample_scene", "sample_edit", "split_of", "vocabulary",
           "ShapeReading", "Reading", "EditReading", "judge", "judge_edit"]

SIZE = 128  # image side in pixels
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
                "yellow": (245, 210, 40), "purple": (140, 60, 180), "orange": (245, 135, 30)}
BACKGROUND_COLORS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20),
                     "pink": (250, 175, 205)}
PALETTE = {**SHAPE_COLORS, **BACKGROUND_COLORS}
KINDS = ("circle", "square", "triangle", "star")
SIZES = {"small": 13, "big": 18}  # circumradius in pixels
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
JITTER = 3  # a shape's center moves up to this many pixels from its cell's center
EDIT_KINDS = ("recolor", "background", "reshape", "move", "remove", "add")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered: smooth edges


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    row: int  # 0..2: top, middle, bottom
    col: int  # 0..2: left, center, right
    dx: int = 0  # jitter in pixels
    dy: int = 0

    @property
    def center(self) -> tuple[float, float]:
        cell = SIZE / 3
        return (self.col + 0.5) * cell + self.dx, (self.row + 0.5) * cell + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def place(self) -> str:
        """"at the top left", "on the right", "in the center", ..."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"at the {row} {col}"

    @property
    def destination(self) -> str:
        """"to the top left", "to the right", "to the center", ..."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle":
            return f"to the {col}"
        return f"to the {row}" if col == "center" else f"to the {row} {col}"

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.kind} {self.place}"

    def polygon(self, scale: float = 1.0) -> list[tuple[float, float]] | None:
        """Vertices of the outline (None for a circle), in pixels times `scale`."""
        cx, cy = self.center
        r = self.radius
        if self.kind == "circle":
            return None
        if self.kind == "square":  # same area as the circle
            h = r * math.sqrt(math.pi) / 2
            points = [(-h, -h), (h, -h), (h, h), (-h, h)]
        elif self.kind == "triangle":  # equilateral, pointing up, in the circumcircle
            points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        else:  # five-pointed star, inner radius 0.45 r
            points = [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                       (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        return [((cx + x) * scale, (cy + y) * scale) for x, y in points]

    def mask(self) -> np.ndarray:
        """(SIZE, SIZE) bool: the pixels at least half covered by the shape."""
        return _coverage(self) >= 0.5


def _coverage(shape: Shape) -> np.ndarray:
    """(SIZE, SIZE) float in [0, 1]: the fraction of each pixel the shape covers."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = shape.polygon(s)
    if polygon is None:
        cx, cy = shape.center
        r = shape.radius
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, ...]  # one color, or two: left half, right half

    def caption(self) -> str:
        shapes = " and ".join(s.describe() for s in self.shapes)
        return f"{shapes} on a {' and '.join(self.background)} background" if shapes else \
            f"a {' and '.join(self.background)} background"

    def background_array(self) -> np.ndarray:
        """(SIZE, SIZE, 3) float32 background colors."""
        image = np.empty((SIZE, SIZE, 3), np.float32)
        left, right = self.background[0], self.background[-1]
        image[:, : SIZE // 2] = PALETTE[left]
        image[:, SIZE // 2:] = PALETTE[right]
        return image

    def render(self) -> Image.Image:
        """The scene as a SIZE x SIZE RGB image."""
        image = self.background_array()
        for shape in self.shapes:
            alpha = _coverage(shape)[..., None]
            image = image * (1 - alpha) + np.asarray(PALETTE[shape.color], np.float32) * alpha
        return Image.fromarray(np.round(image).astype(np.uint8))

    def find(self, color: str) -> Shape | None:
        return next((s for s in self.shapes if s.color == color), None)

    def colors(self) -> set[str]:
        return {s.color for s in self.shapes} | set(self.background)


def split_of(text: str) -> str:
    """"test" for the held-out tenth (by CRC32 of the text), else "train"."""
    return "test" if zlib.crc32(text.encode()) % 10 == 0 else "train"


def _random_shape(rng: random.Random, *, colors_taken: set[str], cells_taken: set[tuple[int, int]]) -> Shape:
    color = rng.choice([c for c in SHAPE_COLORS if c not in colors_taken])
    row, col = rng.choice([(r, c) for r in range(3) for c in range(3) if (r, c) not in cells_taken])
    return Shape(kind=rng.choice(KINDS), color=color, size=rng.choice(list(SIZES)), row=row, col=col,
                 dx=rng.randint(-JITTER, JITTER), dy=rng.randint(-JITTER, JITTER))


def _random_background(rng: random.Random) -> tuple[str, ...]:
    if rng.random() < 0.7:
        return (rng.choice(list(BACKGROUND_COLORS)),)
    return tuple(rng.sample(list(BACKGROUND_COLORS), 2))


def draw_scene(rng: random.Random, max_shapes: int = 2, background: tuple[str, ...] | None = None) -> Scene:
    """A random scene of 1..max_shapes shapes on `background` (None: a random one), of either
    split (sample_scene keeps to one)."""
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes: expected 1 or 2, got {max_shapes!r}")
    if background is not None and (not 1 <= len(background) <= 2 or not set(background) <= set(BACKGROUND_COLORS)):
        raise ValueError(f"background: expected one or two of {sorted(BACKGROUND_COLORS)}, got {background!r}")
    shapes: list[Shape] = []
    for _ in range(rng.randint(1, max_shapes)):
        shapes.append(_random_shape(rng, colors_taken={s.color for s in shapes}, cells_taken={(s.row, s.col) for s in shapes}))
    return Scene(tuple(shapes), background if background is not None else _random_background(rng))


def sample_scene(rng: random.Random, split: str = "train", *, max_shapes: int = 2,
                 background: tuple[str, ...] | None = None) -> Scene:
    """A random scene (as draw_scene's) whose caption belongs to `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    while True:
        scene = draw_scene(rng, max_shapes, background)
        if split_of(scene.caption()) == split:
            return scene


# -- edits ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    source: Scene
    instruction: str
    target: Scene
    kind: str  # one of EDIT_KINDS
    changed: tuple[Shape, ...]  # shapes drawn in one scene and not identically in the other

    def region(self) -> np.ndarray:
        """(SIZE, SIZE) bool: the pixels the edit may change (the changed shapes, 3 px around
        them; for a background edit, everything but the shapes)."""
        if self.kind == "background":
            keep = np.zeros((SIZE, SIZE), bool)
            for shape in self.source.shapes:
                keep |= _erode(shape.mask(), 3)
            return ~keep
        region = np.zeros((SIZE, SIZE), bool)
        for shape in self.changed:
            region |= _dilate(_coverage(shape) > 0, 3)
        return region


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_dilate(~mask, pixels)


def _name(rng: random.Random, shape: Shape, scene: Scene) -> str:
    """"the red circle", or "the circle" (half the time) when its kind is unique in the scene."""
    unique = sum(s.kind == shape.kind for s in scene.shapes) == 1
    return f"the {shape.kind}" if unique and rng.random() < 0.5 else f"the {shape.color} {shape.kind}"


_PHRASES = {
    "recolor": ("make {shape} {color}", "turn {shape} {color}", "change the color of {shape} to {color}",
                "paint {shape} {color}"),
    "background": ("make the background {color}", "change the background to {color}", "turn the background {color}",
                   "paint the background {color}"),
    "reshape": ("turn {shape} into a {kind}", "make {shape} a {kind}", "replace {shape} with a {kind}",
                "change {shape} to a {kind}"),
    "move": ("move {shape} {destination}", "put {shape} {place}", "shift {shape} {destination}", "place {shape} {place}"),
    "remove": ("remove {shape}", "delete {shape}", "take away {shape}", "get rid of {shape}"),
    "add": ("add {new}", "put {new}", "draw {new}", "place {new}"),
}


def _draw_edit(rng: random.Random) -> Edit:
    kind = rng.choice(EDIT_KINDS)
    source = draw_scene(rng, max_shapes=1 if kind == "add" else 2)
    shapes = list(source.shapes)
    phrase = rng.choice(_PHRASES[kind])
    if kind == "background":
        color = rng.choice([c for c in BACKGROUND_COLORS if (c,) != source.background])
        return Edit(source, phrase.format(color=color), Scene(source.shapes, (color,)), kind, ())
    if kind == "add":
        new = _random_shape(rng, colors_taken=source.colors(), cells_taken={(s.row, s.col) for s in shapes})
        new = dataclasses.replace(new, dx=0, dy=0)
        return Edit(source, phrase.format(new=new.describe()), Scene((*shapes, new), source.background), kind, (new,))
    index = rng.randrange(len(shapes))
    old = shapes[index]
    name = _name(rng, old, source)
    if kind == "remove":
        del shapes[index]
        return Edit(source, phrase.format(shape=name), Scene(tuple(shapes), source.background), kind, (old,))
    if kind == "recolor":
        color = rng.choice([c for c in SHAPE_COLORS if c not in source.colors()])
        new = dataclasses.replace(old, color=color)
        text = phrase.format(shape=name, color=color)
    elif kind == "reshape":
        new = dataclasses.replace(old, kind=rng.choice([k for k in KINDS if k != old.kind]))
        text = phrase.format(shape=name, kind=new.kind)
    else:  # move
        taken = {(s.row, s.col) for s in shapes}
        row, col = rng.choice([(r, c) for r in range(3) for c in range(3) if (r, c) not in taken])
        new = dataclasses.replace(old, row=row, col=col, dx=0, dy=0)
        text = phrase.format(shape=name, place=new.place, destination=new.destination)
    shapes[index] = new
    return Edit(source, text, Scene(tuple(shapes), source.background), kind, (old, new))


def sample_edit(rng: random.Random, split: str = "train") -> Edit:
    """A random edit triplet whose (source caption, instruction) pair belongs to `split`."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    while True:
        edit = _draw_edit(rng)
        if split_of(f"{edit.source.caption()} | {edit.instruction}") == split:
            return edit


def vocabulary() -> list[str]:
    """Every word a caption or an instruction uses (the tokenizer's word list)."""
    words = {"a", "and", "on", "at", "in", "the", "background", "of", "to", "into", "with", "rid", "away", "color"}
    words |= set(SHAPE_COLORS) | set(BACKGROUND_COLORS) | set(KINDS) | set(SIZES) | set(ROWS) | set(COLS)
    for phrases in _PHRASES.values():
        for phrase in phrases:
            words |= {w for w in phrase.split() if not w.startswith("{")}
    return sorted(words)


# -- the judge --------------------------------------------------------------------------------------

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[n] for n in _PALETTE_NAMES], np.float32)  # (P, 3)
MIN_BLOB = 0.3  # a color counts as drawn where it covers at least this share of the shape's area
PURE = 60.0  # a blob's pixels lie within this RGB distance of its color (not edges blended with the background)


def _labels(image) -> tuple[np.ndarray, np.ndarray]:
    """(SIZE, SIZE) index into _PALETTE_NAMES of each pixel's nearest palette color, and whether the
    pixel is within PURE of it."""
    pixels = _as_array(image).astype(np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE_RGB) ** 2).sum(-1)
    labels = distances.argmin(-1)
    return labels, np.take_along_axis(distances, labels[..., None], -1)[..., 0] < PURE ** 2


def _as_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.shape != (SIZE, SIZE, 3):
        raise ValueError(f"image: expected a {SIZE}x{SIZE} RGB image, got an array of shape {array.shape}")
    return array


def _majority(labels: np.ndarray) -> str | None:
    if labels.size == 0:
        return None
    return _PALETTE_NAMES[np.bincount(labels.ravel(), minlength=len(_PALETTE_NAMES)).argmax()]


def _unit_areas() -> dict[str, float]:
    """Area of each kind at circumradius 1 (from the outline; the circle's is pi)."""
    areas = {}
    for kind in KINDS:
        polygon = Shape(kind, "red", "big", 1, 1).polygon()
        if polygon is None:
            areas[kind] = math.pi
            continue
        x, y = np.asarray(polygon).T
        areas[kind] = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / SIZES["big"] ** 2
    return areas


_UNIT_AREAS = _unit_areas()


def _template(kind: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """(SIZE, SIZE) bool mask of `kind` centered at (cx, cy) with circumradius `radius`."""
    shape = Shape(kind, "red", "big", 1, 1)
    base_x, base_y = shape.center
    probe = dataclasses.replace(shape, dx=0, dy=0)
    s = _SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=255)
    else:
        k = radius / probe.radius
        draw.polygon([((cx + (x - base_x) * k) * s, (cy + (y - base_y) * k) * s) for x, y in probe.polygon()], fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX)) >= 128


def _cell(x: float, y: float) -> tuple[int, int]:
    cell = SIZE / 3
    return min(2, max(0, int(y // cell))), min(2, max(0, int(x // cell)))


@dataclass(frozen=True)
class ShapeReading:
    """What the judge read for one expected shape."""

    expected: Shape
    color: str | None  # majority palette color of the pixels where the shape should be
    kind: str | None  # best template for the blob of the expected color (None: no such blob)
    cell: tuple[int, int] | None  # (row, col) of that blob's centroid

    @property
    def color_ok(self) -> bool:
        return self.color == self.expected.color

    @property
    def kind_ok(self) -> bool:
        return self.kind == self.expected.kind

    @property
    def position_ok(self) -> bool:
        return self.cell == (self.expected.row, self.expected.col)

    @property
    def ok(self) -> bool:
        return self.color_ok and self.kind_ok and self.position_ok


@dataclass(frozen=True)
class Reading:
    """An image read against the scene it should show."""

    scene: Scene
    shapes: tuple[ShapeReading, ...]
    background: tuple[str, ...]  # one color, or (left, right) when the halves differ

    @property
    def background_ok(self) -> bool:
        return self.background == self.scene.background

    @property
    def ok(self) -> bool:
        return self.background_ok and all(s.ok for s in self.shapes)

    def summary(self) -> str:
        """One line: each shape's attributes read back, marked where wrong."""
        mark = lambda ok: "" if ok else "(x)"  # noqa: E731
        parts = []
        for s in self.shapes:
            row_col = f"{ROWS[s.cell[0]]}-{COLS[s.cell[1]]}" if s.cell else "nowhere"
            parts.append(f"{s.color}{mark(s.color_ok)} {s.kind or 'no shape'}{mark(s.kind_ok)} {row_col}{mark(s.position_ok)}")
        parts.append(f"background {'/'.join(self.background)}{mark(self.background_ok)}")
        return ("OK: " if self.ok else "WRONG: ") + "; ".join(parts)


def _blob(labels: np.ndarray, pure: np.ndarray, color: str) -> np.ndarray:
    return (labels == _PALETTE_NAMES.index(color)) & pure


def judge(image, scene: Scene) -> Reading:
    """Read `image` (PIL or (SIZE, SIZE, 3) uint8) against `scene`: per shape its color, kind and
    cell, and the background's color per half."""
    labels, pure = _labels(image)
    shapes = []
    covered = np.zeros((SIZE, SIZE), bool)
    for shape in scene.shapes:
        mask = shape.mask()
        covered |= _dilate(mask, 3)
        inner = _erode(mask, 1)
        color = _majority(labels[inner if inner.any() else mask])
        blob = _blob(labels, pure, shape.color)
        kind = cell = None
        if blob.sum() >= MIN_BLOB * mask.sum():
            ys, xs = np.nonzero(blob)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            cell = _cell(cx, cy)
            scores = {}
            for k in KINDS:
                template = _template(k, cx, cy, math.sqrt(blob.sum() / _UNIT_AREAS[k]))
                scores[k] = (template & blob).sum() / max(1, (template | blob).sum())
            kind = max(scores, key=scores.get)
        shapes.append(ShapeReading(shape, color, kind, cell))
    halves = [_majority(labels[:, half][~covered[:, half]]) for half in (slice(0, SIZE // 2), slice(SIZE // 2, SIZE))]
    background = (halves[0],) if halves[0] == halves[1] else tuple(halves)
    return Reading(scene, tuple(shapes), background)


def psnr(a, b, where: np.ndarray | None = None) -> float:
    """PSNR in dB between two images over the pixels `where` (all by default); inf when equal."""
    diff = _as_array(a).astype(np.float64) - _as_array(b).astype(np.float64)
    if where is not None:
        diff = diff[where]
    mse = float((diff ** 2).mean()) if diff.size else 0.0
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@dataclass(frozen=True)
class EditReading:
    """An edited image read against the edit's target scene."""

    edit: Edit
    reading: Reading  # against edit.target
    leftovers: tuple[str, ...]  # shape colors drawn that the target does not have there: a removed or
    # recolored shape's color anywhere, or any shape color outside the target's shapes
    preservation: float  # PSNR (dB) to the source image outside the edited region

    @property
    def success(self) -> bool:
        return self.reading.ok and not self.leftovers


def judge_edit(edited, edit: Edit, source_image=None) -> EditReading:
    """Read `edited` against `edit`: success when the target scene is read back and nothing else is
    drawn (no shape color the edit removed, no shape outside the target's); preservation = PSNR
    to `source_image` (default: the rendered source) outside edit.region()."""
    source_image = edit.source.render() if source_image is None else source_image
    reading = judge(edited, edit.target)
    labels, pure = _labels(edited)
    gone = {s.color for s in edit.source.shapes if edit.target.find(s.color) is None}
    drawn = np.zeros((SIZE, SIZE), bool)
    for shape in edit.target.shapes:
        drawn |= _dilate(shape.mask(), 3)
    smallest = MIN_BLOB * math.pi * SIZES["small"] ** 2
    leftovers = tuple(color for color in SHAPE_COLORS
                      if (color in gone and _blob(labels, pure, color).sum() >= MIN_BLOB * edit.source.find(color).mask().sum())
                      or (_blob(labels, pure, color) & ~drawn).sum() >= smallest)
    return EditReading(edit, reading, leftovers, psnr(edited, source_image, ~edit.region()))
