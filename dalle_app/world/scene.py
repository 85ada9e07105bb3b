"""Scenes of the synthetic shapes world: what is in a picture, before it is drawn.

A scene is a plain background colour with one or two objects. Each object has a shape, a colour, a size and a
cell of a 3x3 grid. Two objects may be related ("the first object is to the left of / to the right of / above /
below the second one"); a related pair always shares a row (left/right) or a column (above/below).

Geometry, in pixels of the 128x128 image:

* every shape fills a square box of side ``SIZE_PIXELS[size]``: small 22, medium 32, large 42;
* the box is centred on its grid cell (cell centres at 24, 64 and 104 on each axis), then jittered by at most
  ``JITTER`` pixels when rendered; boxes always stay ``MARGIN`` pixels inside the image;
* two objects never overlap: their boxes are at least ``MIN_GAP`` pixels apart, before and after jitter (the
  renderer drops the jitter of a pair that it would bring closer). So two medium objects fit in neighbouring
  cells, while a large object needs a small neighbour or a free cell in between.

An object colour always differs from the background by at least ``MIN_CONTRAST`` (Euclidean RGB distance), which
rules out the four illegible pairs pink/white, orange/yellow, purple/brown and red/brown. Two objects may share a
colour.

Public API::

    Obj(shape, color, size, position)            # one object, all fields are words of the vocabulary below
    Scene(background, objects, relation=None)    # relation describes objects[0] relative to objects[1]
    sample_scene(rng: random.Random) -> Scene    # a random legal scene
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import ImageColor

IMAGE_SIZE = 128

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "gray", "brown", "cyan")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major order: POSITIONS[3 * row + col]
RELATIONS = ("to the left of", "to the right of", "above", "below")

RGB = {name: ImageColor.getrgb(name) for name in COLORS}
SIZE_PIXELS = {"small": 22, "medium": 32, "large": 42}
CELL_CENTERS = (24, 64, 104)  # centre of grid column/row 0, 1, 2 in pixels
JITTER = 3
MARGIN = 2
MIN_GAP = 4
MIN_CONTRAST = 120.0

# probabilities used by sample_scene
P_TWO_OBJECTS = 0.5
P_RELATION = 0.6  # among two-object scenes


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``color`` in COLORS, ``size`` in SIZES, ``position`` in POSITIONS."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background colour, one or two objects, and an optional relation of ``objects[0]`` to ``objects[1]``."""

    background: str
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    relation: str | None = None

    def __post_init__(self):
        # accept a list for convenience but store a tuple so scenes are hashable
        object.__setattr__(self, "objects", tuple(self.objects))
        check_scene(self)


def cell(position: str) -> tuple[int, int]:
    """Return the (row, col) grid cell of a position word."""
    index = POSITIONS.index(position)
    return divmod(index, 3)


def position_of(row: int, col: int) -> str:
    """Return the position word of grid cell (row, col)."""
    return POSITIONS[3 * row + col]


def contrast(color_a: str, color_b: str) -> float:
    """Euclidean RGB distance between two named colours."""
    return math.dist(RGB[color_a], RGB[color_b])


def box_gap(pos_a: str, size_a: str, pos_b: str, size_b: str) -> float:
    """Gap in pixels between two unjittered object boxes (negative when they overlap)."""
    (ra, ca), (rb, cb) = cell(pos_a), cell(pos_b)
    half = (SIZE_PIXELS[size_a] + SIZE_PIXELS[size_b]) / 2
    gap_x = abs(CELL_CENTERS[ca] - CELL_CENTERS[cb]) - half
    gap_y = abs(CELL_CENTERS[ra] - CELL_CENTERS[rb]) - half
    return max(gap_x, gap_y)  # boxes are disjoint when separated along at least one axis


def relation_holds(relation: str, pos_a: str, pos_b: str) -> bool:
    """True when grid cells ``pos_a`` and ``pos_b`` satisfy ``relation`` in the world's strict sense (shared row/column)."""
    (ra, ca), (rb, cb) = cell(pos_a), cell(pos_b)
    if relation == "to the left of":
        return ra == rb and ca < cb
    if relation == "to the right of":
        return ra == rb and ca > cb
    if relation == "above":
        return ca == cb and ra < rb
    if relation == "below":
        return ca == cb and ra > rb
    raise ValueError(f"Unknown relation {relation!r}; use one of {RELATIONS}.")


def inverse_relation(relation: str) -> str:
    """The relation of the second object to the first ("above" <-> "below", "left of" <-> "right of")."""
    return {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}[relation]


def check_scene(scene: Scene) -> None:
    """Raise ValueError when a scene breaks a rule of the world (vocabulary, contrast, overlap, relation)."""
    if scene.background not in COLORS:
        raise ValueError(f"Background {scene.background!r} is not a world colour; use one of {COLORS}.")
    if not 1 <= len(scene.objects) <= 2:
        raise ValueError(f"A scene has one or two objects, got {len(scene.objects)}; pass one or two Obj.")
    for obj in scene.objects:
        for value, allowed in ((obj.shape, SHAPES), (obj.color, COLORS), (obj.size, SIZES), (obj.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not a valid object attribute; use one of {allowed}.")
        if contrast(obj.color, scene.background) < MIN_CONTRAST:
            raise ValueError(f"A {obj.color} object on a {scene.background} background is illegible; pick other colours.")
    if len(scene.objects) == 2:
        a, b = scene.objects
        if box_gap(a.position, a.size, b.position, b.size) < MIN_GAP:
            raise ValueError(f"Objects at {a.position!r} and {b.position!r} would overlap; move them apart or shrink them.")
    if scene.relation is not None:
        if len(scene.objects) != 2:
            raise ValueError("A relation needs exactly two objects; drop the relation or add an object.")
        if not relation_holds(scene.relation, scene.objects[0].position, scene.objects[1].position):
            raise ValueError(f"Positions {scene.objects[0].position!r}, {scene.objects[1].position!r} "
                             f"do not satisfy {scene.relation!r}; place the objects consistently.")


def _sample_object_colors(rng: random.Random, background: str) -> str:
    return rng.choice([c for c in COLORS if contrast(c, background) >= MIN_CONTRAST])


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random legal scene: uniform background, one or two objects, sometimes a relation between them."""
    background = rng.choice(COLORS)
    if rng.random() >= P_TWO_OBJECTS:
        obj = Obj(rng.choice(SHAPES), _sample_object_colors(rng, background), rng.choice(SIZES), rng.choice(POSITIONS))
        return Scene(background, (obj,))

    sizes = (rng.choice(SIZES), rng.choice(SIZES))
    relation = rng.choice(RELATIONS) if rng.random() < P_RELATION else None
    pairs = [
        (pa, pb) for pa in POSITIONS for pb in POSITIONS
        if pa != pb and box_gap(pa, sizes[0], pb, sizes[1]) >= MIN_GAP
        and (relation is None or relation_holds(relation, pa, pb))
    ]
    # every size pair fits in opposite cells of a row or column, so `pairs` is never empty
    pos_a, pos_b = rng.choice(pairs)
    objects = tuple(
        Obj(rng.choice(SHAPES), _sample_object_colors(rng, background), size, pos)
        for size, pos in zip(sizes, (pos_a, pos_b))
    )
    return Scene(background, objects, relation)
