"""Anti-aliased rendering of world scenes.

Each shape is drawn once per size as a 4x supersampled white-on-black mask, box-filtered down to its final size and
cached; rendering a scene is then one background fill plus one masked paste per object (well over 1000 scenes per
second on one CPU core, so training data is generated on the fly).

Public API::

    shape_mask(shape, side) -> PIL.Image ("L")       # anti-aliased coverage mask of a shape filling a side x side box
    place(scene, rng=None) -> list[(x0, y0, x1, y1)]   # pixel box of each object, with jitter drawn from rng
    render(scene, rng=None) -> PIL.Image ("RGB", 128x128)
    render_with_boxes(scene, rng=None) -> (PIL.Image, boxes)

With ``rng=None`` objects sit exactly on their cell centres; with an ``rng`` they are shifted by up to
``scene.JITTER`` pixels. The same scene and the same rng state always give the same pixels.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from PIL import Image, ImageDraw

from .scene import CELL_CENTERS, IMAGE_SIZE, JITTER, MARGIN, MIN_GAP, RGB, SHAPES, SIZE_PIXELS, Scene, cell

SUPERSAMPLE = 4
STAR_INNER_RATIO = 0.45  # fatter than a geometric star (0.38) so small stars stay star-like at 22 px
RING_THICKNESS = 0.22  # fraction of the side
CROSS_THICKNESS = 0.36  # arm width as a fraction of the side


def _fit_to_unit_box(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Stretch a polygon so it spans exactly [0, 1] on both axes (every shape fills its box)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / w, (y - y0) / h) for x, y in points]


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Polygon of a shape in the unit box (y grows downwards), for the shapes that are polygons."""
    if shape == "triangle":
        return [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if shape == "diamond":
        return [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    if shape == "square":
        return [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if shape == "cross":
        a, b = 0.5 - CROSS_THICKNESS / 2, 0.5 + CROSS_THICKNESS / 2
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else STAR_INNER_RATIO
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return _fit_to_unit_box(points)
    if shape == "heart":
        points = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x, -y))
        return _fit_to_unit_box(points)
    raise ValueError(f"{shape!r} is not a polygon shape.")


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> Image.Image:
    """Anti-aliased coverage mask ("L", side x side) of ``shape`` filling its whole box; cached per (shape, side)."""
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; use one of {SHAPES}.")
    if side < 2:
        raise ValueError(f"A shape needs a side of at least 2 pixels, got {side}.")
    big = side * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
        if shape == "ring":
            inset = RING_THICKNESS * big
            draw.ellipse((inset, inset, big - 1 - inset, big - 1 - inset), fill=0)
    else:
        draw.polygon([(x * big, y * big) for x, y in _unit_polygon(shape)], fill=255)
    return canvas.reduce(SUPERSAMPLE)  # box filter: each output pixel is the mean coverage of 4x4 samples


def _box(center_x: int, center_y: int, side: int) -> tuple[int, int, int, int]:
    lo, hi = MARGIN, IMAGE_SIZE - MARGIN - side
    x0 = min(max(center_x - side // 2, lo), hi)
    y0 = min(max(center_y - side // 2, lo), hi)
    return (x0, y0, x0 + side, y0 + side)


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    gap_x = max(a[0], b[0]) - min(a[2], b[2])
    gap_y = max(a[1], b[1]) - min(a[3], b[3])
    return max(gap_x, gap_y)


def place(scene: Scene, rng: random.Random | None = None) -> list[tuple[int, int, int, int]]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of each object; jittered by up to JITTER px when rng is given."""
    boxes, still = [], []
    for obj in scene.objects:
        row, col = cell(obj.position)
        side = SIZE_PIXELS[obj.size]
        dx, dy = (rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) if rng is not None else (0, 0)
        boxes.append(_box(CELL_CENTERS[col] + dx, CELL_CENTERS[row] + dy, side))
        still.append(_box(CELL_CENTERS[col], CELL_CENTERS[row], side))
    if len(boxes) == 2 and _gap(*boxes) < MIN_GAP:
        boxes = still  # jitter would bring the pair too close: keep both on their cell centres
    return boxes


def render_with_boxes(scene: Scene, rng: random.Random | None = None):
    """Render ``scene`` and also return the pixel box of each object (see ``place``)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), RGB[scene.background])
    boxes = place(scene, rng)
    for obj, box in zip(scene.objects, boxes):
        image.paste(RGB[obj.color], box, shape_mask(obj.shape, box[2] - box[0]))
    return image, boxes


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Render ``scene`` as a 128x128 RGB PIL image (anti-aliased; jittered positions when rng is given)."""
    return render_with_boxes(scene, rng)[0]
