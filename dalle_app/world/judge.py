"""The judge: read a (generated) world image back into words, and score it against its caption.

Reading is exact image analysis, no learned weights:

1. background = the palette colour that most pixels of the 2-pixel border snap to (nearest named colour in RGB);
2. objects = 8-connected components of pixels farther than ``FG_THRESHOLD`` from the measured background colour,
   ignoring specks under ``MIN_AREA`` pixels;
3. an object's colour = the palette colour nearest to the median of its most saturated half of pixels;
4. its coverage (alpha) per pixel is the projection of ``pixel - background`` onto ``colour - background``; the
   pixels with alpha >= 0.5 give its bounding box, so size = the longer bbox side (small < 27 <= medium < 37 <=
   large) and position = the 3x3 cell holding the bbox centre (cell borders at 44 and 84 px);
5. shape = the template (each shape rendered to fill a 32x32 box) with the best soft IoU against the object's
   alpha crop resized to 32x32.

Anything it cannot read with confidence comes back as ``"unknown"`` (a colour far from every palette colour, a
best shape IoU under ``MIN_SHAPE_IOU``, a blob too small or too big for a size); an image with nothing on it gives
``Reading.objects == []``. Accuracy on fresh renders: see ``measure_judge_accuracy`` (100% on 2000 scenes).

Public API::

    read_image(image) -> Reading           # image: PIL image, HxWx3 uint8/float array, or (3,H,W) tensor in [0,1]
    score(spec, reading) -> dict[str, bool] # only the attributes the caption specified (see ATTRIBUTES)
    fidelity_table(captions, images) -> dict[str, dict]   # {attribute: {"accuracy", "correct", "n"}}
    format_fidelity_table(table) -> str    # markdown table
    measure_judge_accuracy(n_scenes, seed) -> dict[str, float]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from .captions import CaptionSpec, ObjSpec, parse_caption
from .render import render_with_boxes, shape_mask
from .scene import COLORS, IMAGE_SIZE, POSITIONS, RGB, SHAPES, sample_scene

FG_THRESHOLD = 45.0  # RGB distance from the background above which a pixel belongs to an object
NOISE_LIMIT = 6.0  # estimated pixel noise std above which the image is median-filtered first
MIN_AREA = 60  # smaller components are noise or debris (the smallest real object, a small star, covers ~195 px)
MAX_OBJECTS = 6  # keep only the largest components of a very noisy image
MAX_SNAP_DISTANCE = 90.0  # farther than this from every palette colour -> "unknown" colour
MIN_SHAPE_IOU = 0.55
SIZE_LIMITS = (12, 27, 37, 64)  # unknown below 12, small < 27, medium < 37, large < 64, unknown above
CELL_BORDERS = (44, 84)
RELATION_MARGIN = 8  # pixels between centres for "left of" / "above" to hold
TEMPLATE_PAD = 3
TEMPLATE_BLURS = (0.0, 1.0, 1.75)  # generated images are often softer than renders
TEMPLATE_GROWTH = (0, 2, 4)  # template side = bbox side + growth

ATTRIBUTES = ("background", "color", "shape", "size", "position", "relation", "count", "both")
_PALETTE = np.array([RGB[c] for c in COLORS], dtype=np.float32)


@dataclass
class ObjReading:
    """One object as read from an image; ``confidence`` holds the shape IoU and the colour snap distance."""

    shape: str
    color: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    center: tuple[float, float]  # x, y in pixels
    area: int
    confidence: dict = field(default_factory=dict)


@dataclass
class Reading:
    """Everything the judge saw in one image; ``objects`` is sorted by area, largest first, and empty for a blank image."""

    background: str
    background_confidence: float
    objects: list[ObjReading] = field(default_factory=list)

    @property
    def is_blank(self) -> bool:
        """True when no object was found."""
        return not self.objects

    def describe(self) -> str:
        """A one-line human summary, e.g. "blue background: small red circle (top left)"."""
        parts = [f"{o.size} {o.color} {o.shape} ({o.position})" for o in self.objects]
        return f"{self.background} background: " + (", ".join(parts) if parts else "no object")


# ----------------------------------------------------------------------------------------------------------------
# reading an image


def _to_array(image) -> np.ndarray:
    """Any supported image -> float32 array (IMAGE_SIZE, IMAGE_SIZE, 3) in 0..255."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # (C,H,W) tensor layout
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Expected an RGB image, got an array of shape {arr.shape}; pass HxWx3 or 3xHxW.")
        arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            arr = np.nan_to_num(arr.astype(np.float32))
            arr = arr * 255.0 if arr.max() <= 1.0 else arr  # floats in [0,1] (tensors) or [0,255]
            arr = np.clip(arr, 0, 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(pil, dtype=np.float32)


def _snap(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index and distance for each row of an (N, 3) array."""
    d = np.linalg.norm(rgb[:, None, :] - _PALETTE[None, :, :], axis=-1)
    idx = d.argmin(axis=1)
    return idx, d[np.arange(len(rgb)), idx]


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a boolean mask (0 = background), by union-find over horizontal runs."""
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs = []  # (row, start, end, run id)
    previous: list[tuple[int, int, int]] = []
    for y in range(mask.shape[0]):
        row = np.concatenate(([0], mask[y].view(np.int8), [0]))
        edges = np.flatnonzero(np.diff(row))
        current = []
        for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
            rid = len(parent)
            parent.append(rid)
            for p_start, p_end, p_id in previous:
                if p_start <= end and p_end >= start:  # touching, diagonals included
                    ra, rb = find(rid), find(p_id)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
            current.append((start, end, rid))
            runs.append((y, start, end, rid))
        previous = current
    labels = np.zeros(mask.shape, dtype=np.int32)
    roots: dict[int, int] = {}
    for y, start, end, rid in runs:
        labels[y, start:end] = roots.setdefault(find(rid), len(roots) + 1)
    return labels, len(roots)


@lru_cache(maxsize=4096)
def _template(shape: str, width: int, height: int, blur: float) -> np.ndarray:
    """Coverage of ``shape`` filling a width x height box, with TEMPLATE_PAD empty pixels around, optionally blurred."""
    side = max(width, height)
    mask = shape_mask(shape, side)
    if (width, height) != (side, side):
        mask = mask.resize((width, height), Image.BILINEAR)
    canvas = Image.new("L", (width + 2 * TEMPLATE_PAD, height + 2 * TEMPLATE_PAD), 0)
    canvas.paste(mask, (TEMPLATE_PAD, TEMPLATE_PAD))
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _shape_ious(alpha: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Best soft IoU of each shape with the object's coverage, over template blur levels and slight enlargements.

    Blur eats thin tips (a soft star's alpha >= 0.5 box is smaller than the star), hence the enlarged templates.
    """
    x0, y0, x1, y1 = bbox
    margin = TEMPLATE_PAD + max(TEMPLATE_GROWTH)
    padded = np.pad(alpha, margin)  # so windows around boxes at the image edge stay inside the array
    ious = np.zeros(len(SHAPES), dtype=np.float32)
    for grow in TEMPLATE_GROWTH:
        left, top = x0 - grow // 2 - TEMPLATE_PAD + margin, y0 - grow // 2 - TEMPLATE_PAD + margin
        for i, shape in enumerate(SHAPES):
            for blur in TEMPLATE_BLURS:
                t = _template(shape, x1 - x0 + grow, y1 - y0 + grow, blur)
                crop = padded[top:top + t.shape[0], left:left + t.shape[1]]
                union = np.maximum(t, crop).sum()
                ious[i] = max(ious[i], np.minimum(t, crop).sum() / max(union, 1e-6))
    return ious


def _size_word(side: int) -> str:
    lo, small, medium, hi = SIZE_LIMITS
    if side < lo or side >= hi:
        return "unknown"
    return "small" if side < small else "medium" if side < medium else "large"


def _position_word(cx: float, cy: float) -> str:
    col = int(cx >= CELL_BORDERS[0]) + int(cx >= CELL_BORDERS[1])
    row = int(cy >= CELL_BORDERS[0]) + int(cy >= CELL_BORDERS[1])
    return POSITIONS[3 * row + col]


def _read_object(arr: np.ndarray, dist: np.ndarray, component: np.ndarray, bg_rgb: np.ndarray) -> ObjReading | None:
    d = dist[component]
    pixels = arr[component]
    core = pixels[d >= np.percentile(d, 75)]  # the inner, fully covered pixels rather than the blended edge
    rgb = np.median(core, axis=0)
    idx, snap_distance = _snap(rgb[None])
    color = COLORS[idx[0]] if snap_distance[0] <= MAX_SNAP_DISTANCE else "unknown"

    direction = rgb - bg_rgb
    norm2 = float(direction @ direction)
    if norm2 < 1.0:
        return None
    alpha = np.clip(((arr - bg_rgb) @ direction) / norm2, 0.0, 1.0) * component
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    ious = _shape_ious(alpha, (x0, y0, x1, y1))
    best = int(ious.argmax())
    shape = SHAPES[best] if ious[best] >= MIN_SHAPE_IOU else "unknown"
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return ObjReading(
        shape=shape, color=color, size=_size_word(max(x1 - x0, y1 - y0)), position=_position_word(cx, cy),
        bbox=(x0, y0, x1, y1), center=(cx, cy), area=int(component.sum()),
        confidence={"shape_iou": float(ious[best]), "color_distance": float(snap_distance[0])},
    )


def _read_background(arr: np.ndarray) -> tuple[str, float, np.ndarray, float]:
    """Background word, vote fraction, measured RGB and robust noise level (std estimate) from the image border."""
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                             arr[2:-2, :2].reshape(-1, 3), arr[2:-2, -2:].reshape(-1, 3)])
    idx, snap_distance = _snap(border)
    votes = np.bincount(idx, minlength=len(COLORS))
    bg_idx = int(votes.argmax())
    fraction = float(votes[bg_idx] / len(border))
    same = border[idx == bg_idx]
    bg_rgb = np.median(same, axis=0)  # the measured colour, robust to a slight tint
    noise = 1.4826 * float(np.median(np.abs(same - bg_rgb)))  # median absolute deviation -> std for Gaussian noise
    background = COLORS[bg_idx]
    if fraction < 0.5 or np.median(snap_distance[idx == bg_idx]) > MAX_SNAP_DISTANCE:
        background = "unknown"
    return background, fraction, bg_rgb, noise


def read_image(image) -> Reading:
    """Read the background colour and every object (colour, shape, size, position) of a world image."""
    arr = _to_array(image)
    background, fraction, bg_rgb, noise = _read_background(arr)
    for _ in range(2):  # grainy image: a 3x3 median filter or two removes the grain but keeps the shapes
        if noise <= NOISE_LIMIT:
            break
        pil = Image.fromarray(arr.astype(np.uint8)).filter(ImageFilter.MedianFilter(3))
        arr = np.asarray(pil, dtype=np.float32)
        background, fraction, bg_rgb, noise = _read_background(arr)

    dist = np.linalg.norm(arr - bg_rgb, axis=-1)
    labels, n = _label(dist > FG_THRESHOLD)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in np.argsort(-areas, kind="stable")[:MAX_OBJECTS] if areas[i] >= MIN_AREA]
    objects = []
    for label in keep:
        obj = _read_object(arr, dist, labels == label, bg_rgb)
        if obj is not None:
            objects.append(obj)
    return Reading(background=background, background_confidence=fraction, objects=objects)


# ----------------------------------------------------------------------------------------------------------------
# scoring against a caption

_OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")


def relation_holds_in_image(relation: str, a: ObjReading, b: ObjReading) -> bool:
    """True when object ``a`` is ``relation`` object ``b`` in the image (centres apart by RELATION_MARGIN px).

    Only the named axis counts: a circle at the top left is "to the left of" a star at the bottom right.
    """
    (ax, ay), (bx, by) = a.center, b.center
    if relation == "to the left of":
        return ax < bx - RELATION_MARGIN
    if relation == "to the right of":
        return ax > bx + RELATION_MARGIN
    if relation == "above":
        return ay < by - RELATION_MARGIN
    if relation == "below":
        return ay > by + RELATION_MARGIN
    raise ValueError(f"Unknown relation {relation!r}.")


def _matches(spec: ObjSpec, obj: ObjReading | None) -> dict[str, bool]:
    """Per mentioned attribute, whether ``obj`` has it (all False when the object is missing)."""
    return {name: obj is not None and getattr(obj, name) == getattr(spec, name)
            for name in _OBJECT_ATTRIBUTES if getattr(spec, name) is not None}


def _best_assignment(spec: CaptionSpec, found: list[ObjReading]) -> list[ObjReading | None]:
    """The detected object for each caption object that agrees with the caption the most (None when missing)."""
    k = len(spec.objects)
    options = [[None] * k]
    if k == 1:
        options += [[o] for o in found]
    elif k == 2:
        options += [[a, b] for a in found for b in found if a is not b]
        options += [[o, None] for o in found] + [[None, o] for o in found]
    else:
        options += [list(found[:k]) + [None] * (k - len(found[:k]))]

    def agreement(option):
        hits = sum(sum(_matches(s, o).values()) + (o is not None) for s, o in zip(spec.objects, option))
        if spec.relation is not None and k == 2 and None not in option:
            hits += relation_holds_in_image(spec.relation, option[0], option[1])
        return hits

    return max(options, key=agreement)  # max keeps the first best: larger objects win ties


def score(spec: CaptionSpec | str, reading: Reading) -> dict[str, bool]:
    """Check an image reading against what a caption specified; only specified attributes appear in the result.

    Keys: "background" (background colour), "color", "shape", "size", "position" (True when every caption object
    that mentions the attribute is found with it), "relation" (the relation holds between the two objects),
    "count" (as many objects found as the caption names), and for two-object captions "both" (both objects found
    with all their mentioned attributes, and the relation holds if one is given). The caption's objects are
    matched to the detected ones in whichever way agrees best with the caption.
    """
    if isinstance(spec, str):
        spec = parse_caption(spec)
    result: dict[str, bool] = {}
    if spec.background is not None:
        result["background"] = reading.background == spec.background
    if not spec.objects:
        return result
    assigned = _best_assignment(spec, reading.objects)
    per_object = [_matches(s, o) for s, o in zip(spec.objects, assigned)]
    for name in _OBJECT_ATTRIBUTES:
        mentioned = [m[name] for m in per_object if name in m]
        if mentioned:
            result[name] = all(mentioned)
    relation_ok = True
    if spec.relation is not None and len(spec.objects) == 2:
        relation_ok = None not in assigned and relation_holds_in_image(spec.relation, assigned[0], assigned[1])
        result["relation"] = relation_ok
    result["count"] = len(reading.objects) == len(spec.objects)
    if len(spec.objects) == 2:
        result["both"] = None not in assigned and all(all(m.values()) for m in per_object) and relation_ok
    return result


def fidelity_table(captions, images) -> dict[str, dict]:
    """Per-attribute accuracy of generated ``images`` against their ``captions`` (strings or CaptionSpecs).

    Returns ``{attribute: {"accuracy": float, "correct": int, "n": int}}`` in ATTRIBUTES order, where n counts
    the captions that specified the attribute; attributes no caption specified are left out.
    """
    if len(captions) != len(images):
        raise ValueError(f"Got {len(captions)} captions but {len(images)} images; pass one image per caption.")
    correct = {name: 0 for name in ATTRIBUTES}
    total = {name: 0 for name in ATTRIBUTES}
    for text, image in zip(captions, images):
        for name, ok in score(text, read_image(image)).items():
            total[name] += 1
            correct[name] += int(ok)
    return {name: {"accuracy": correct[name] / total[name], "correct": correct[name], "n": total[name]}
            for name in ATTRIBUTES if total[name]}


def format_fidelity_table(table: dict[str, dict]) -> str:
    """Markdown table of a ``fidelity_table`` result."""
    lines = ["| attribute | accuracy | n |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['accuracy'] * 100:.1f}% | {row['n']} |" for name, row in table.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# how good is the judge itself


def measure_judge_accuracy(n_scenes: int = 2000, seed: int = 1234, noise: float = 0.0,
                           blur: float = 0.0) -> dict[str, float]:
    """Judge accuracy on fresh jittered renders, optionally softened by a Gaussian blur of radius ``blur`` pixels
    and then given Gaussian pixel noise of std ``noise`` (0..255).

    Per scene: "background" and "count" (exactly the scene's objects found). Per object: "color", "shape",
    "size", "position", read from the detected object whose centre lies inside the object's true box (a missing
    object counts as wrong on all four).
    """
    rng = random.Random(f"judge-accuracy-{seed}")
    noise_rng = np.random.default_rng(seed)
    hits = {name: 0 for name in ("background", "count", *_OBJECT_ATTRIBUTES)}
    totals = dict.fromkeys(hits, 0)
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        image, boxes = render_with_boxes(scene, rng)
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        if noise > 0:
            arr = np.asarray(image, dtype=np.float32) + noise_rng.normal(0.0, noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
            image = np.clip(arr, 0, 255).astype(np.uint8)
        reading = read_image(image)
        hits["background"] += reading.background == scene.background
        hits["count"] += len(reading.objects) == len(scene.objects)
        totals["background"] += 1
        totals["count"] += 1
        for obj, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            found = next((o for o in reading.objects
                          if x0 <= o.center[0] <= x1 and y0 <= o.center[1] <= y1), None)
            for name in _OBJECT_ATTRIBUTES:
                totals[name] += 1
                hits[name] += found is not None and getattr(found, name) == getattr(obj, name)
    return {name: hits[name] / totals[name] for name in hits}
