"""Captions of world scenes, and parsing a caption back into what it asks for.

A caption is lowercase, made of a small fixed vocabulary (``caption_vocabulary()``, 41 words) plus commas, and
always mentions every object of its scene, each by its shape. Anything else may be left out at random (an object's
size or colour, the positions, the background); the scene then simply has some value there, so every caption is
TRUE of its scene. A two-object scene with a relation is described either by the relation (in either direction:
"a red circle to the left of a blue star" or "a blue star to the right of a red circle") or by the two positions.

Examples::

    a small red circle in the top left on a blue background
    on a yellow background, a large green star
    a purple heart to the left of a white square
    a blue ring at the bottom right
    in the center, a medium pink diamond
    a gray background with a cross on the left and an orange triangle at the bottom

Public API::

    caption(scene, rng) -> str                  # a random true caption of scene
    parse_caption(text) -> CaptionSpec          # which attributes a caption asks for (None = not specified)
    CaptionSpec(background, objects, relation)  # objects: tuple of ObjSpec(shape, color, size, position)
    CaptionSpec.from_scene(scene)               # everything about a scene, as if a caption said it all
    caption_vocabulary() -> list[str]           # every word a caption may use
    contradicting_captions(scene, text, rng)    # {kind: a caption false of scene by one change}: hard negatives
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Obj, Scene, inverse_relation

# probability of mentioning each optional part
P_SIZE = 0.6
P_COLOR = 0.85
P_POSITION = 0.6
P_BACKGROUND = 0.6
P_USE_RELATION = 0.85  # a scene with a relation is described by it, otherwise by positions

_SIDE_WORDS = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
               "center": "in the center"}


@dataclass(frozen=True)
class ObjSpec:
    """What a caption says about one object; ``None`` marks an attribute the caption leaves open."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: background colour, objects in caption order, relation of objects[0] to objects[1]."""

    background: str | None = None
    objects: tuple[ObjSpec, ...] = field(default_factory=tuple)
    relation: str | None = None

    @classmethod
    def from_scene(cls, scene: Scene) -> "CaptionSpec":
        """The spec of a caption that mentions everything about ``scene`` (relation included, if any)."""
        objects = tuple(ObjSpec(o.shape, o.color, o.size, o.position) for o in scene.objects)
        return cls(background=scene.background, objects=objects, relation=scene.relation)

    def matches(self, scene: Scene) -> bool:
        """True when ``scene`` has everything this spec asks for (objects matched in some order)."""
        if self.background is not None and self.background != scene.background:
            return False
        if len(self.objects) != len(scene.objects):
            return False
        orders = [scene.objects] if len(scene.objects) == 1 else [scene.objects, scene.objects[::-1]]
        for order in orders:
            if all(_obj_matches(spec, obj) for spec, obj in zip(self.objects, order)):
                if self.relation is None or _relation_of(order, scene) == self.relation:
                    return True
        return False


def _obj_matches(spec: ObjSpec, obj: Obj) -> bool:
    return all(getattr(spec, name) in (None, getattr(obj, name)) for name in ("shape", "color", "size", "position"))


def _relation_of(order: tuple[Obj, ...], scene: Scene) -> str | None:
    if scene.relation is None:
        return None
    return scene.relation if order[0] is scene.objects[0] else inverse_relation(scene.relation)


# ----------------------------------------------------------------------------------------------------------------
# writing captions


def _position_phrase(position: str, rng: random.Random) -> str:
    if " " in position:  # a corner: "in the top left" or "at the top left"
        return f"{rng.choice(('in', 'at'))} the {position}"
    return _SIDE_WORDS[position]


def _object_phrase(obj: Obj, rng: random.Random, with_position: bool) -> str:
    words = []
    if rng.random() < P_SIZE:
        words.append(obj.size)
    if rng.random() < P_COLOR:
        words.append(obj.color)
    words.append(obj.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    phrase = " ".join([article] + words)
    if with_position:
        phrase += " " + _position_phrase(obj.position, rng)
    return phrase


def _with_background(body: str, background: str | None, rng: random.Random) -> str:
    """Attach "on a X background" to a caption body, at the end, at the start, or as "a X background with ..."."""
    if background is None:
        return body
    article = "an" if background[0] in "aeiou" else "a"
    style = rng.randrange(3)
    if style == 0:
        return f"{body} on {article} {background} background"
    if style == 1:
        return f"on {article} {background} background, {body}"
    if body.startswith("in ") or body.startswith("at ") or body.startswith("on "):
        return f"{body} on {article} {background} background"  # "a X background with in the top left, ..." reads badly
    return f"{article} {background} background with {body}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A random caption that is true of ``scene``; optional parts are left out at random."""
    background = scene.background if rng.random() < P_BACKGROUND else None
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        with_position = rng.random() < P_POSITION
        if with_position and rng.random() < 0.25:  # lead with the position: "in the top left, a red circle"
            body = f"{_position_phrase(obj.position, rng)}, {_object_phrase(obj, rng, with_position=False)}"
        else:
            body = _object_phrase(obj, rng, with_position)
        return _with_background(body, background, rng)

    first, second = scene.objects
    if scene.relation is not None and rng.random() < P_USE_RELATION:
        relation = scene.relation
        if rng.random() < 0.5:  # describe it from the other object's side
            first, second, relation = second, first, inverse_relation(relation)
        body = f"{_object_phrase(first, rng, False)} {relation} {_object_phrase(second, rng, False)}"
    else:
        if rng.random() < 0.5:
            first, second = second, first
        with_position = rng.random() < P_POSITION
        body = f"{_object_phrase(first, rng, with_position)} and {_object_phrase(second, rng, with_position)}"
    return _with_background(body, background, rng)


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above"}
CONTRADICTIONS = ("shape", "color", "size", "position", "dropped object")


def _swap_word(text: str, choices: tuple[str, ...], rng: random.Random) -> str | None:
    """Replace one word of `text` that is in `choices` by one that `text` does not use (None: nothing to swap)."""
    used = [w for w in choices if re.search(rf"\b{w}\b", text)]
    unused = [w for w in choices if w not in used]
    if not used or not unused:
        return None
    return re.sub(rf"\b{rng.choice(used)}\b", rng.choice(unused), text, count=1)


def _fix_articles(text: str) -> str:
    text = re.sub(r"\ban ([^aeiou\W])", r"a \1", text)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def contradicting_captions(scene: Scene, text: str, rng: random.Random) -> dict[str, str]:
    """Captions that differ from `text` (a caption of `scene`) in one thing and are false of `scene`.

    Keys are CONTRADICTIONS: one shape, colour or size word replaced by another, one side word flipped (left /
    right, top / bottom, above / below), or, for two objects, a caption of one of them alone (captions always
    name every object). A kind the caption gives no hold for (no size mentioned, say) is left out. These are the
    hard negatives that teach a CLIP what in-batch negatives rarely show it: which shape, not just which colour.
    """
    out = {}
    for kind, words in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
        changed = _swap_word(text, words, rng)
        if changed is not None:
            out[kind] = _fix_articles(changed)
    flips = [w for w in _OPPOSITE if re.search(rf"\b{w}\b", text)]
    if flips:
        out["position"] = re.sub(rf"\b{rng.choice(flips)}\b", lambda m: _OPPOSITE[m.group(0)], text, count=1)
    if len(scene.objects) == 2:
        alone = Scene(scene.background, (rng.choice(scene.objects),))
        out["dropped object"] = caption(alone, rng)
    # a swap can land on what the scene really has (the other object's colour, say): keep only false captions
    return {kind: t for kind, t in out.items() if not parse_caption(t).matches(scene)}


def caption_vocabulary() -> list[str]:
    """Every word a caption can use (commas are the only other token), sorted."""
    words = {"a", "an", "on", "in", "at", "the", "of", "to", "with", "and", "background"}
    words.update(SHAPES, COLORS, SIZES)
    for phrase in POSITIONS + RELATIONS:
        words.update(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------------
# parsing captions

_SYNONYMS = {"grey": "gray", "middle": "center", "centre": "center", "big": "large", "tiny": "small"}
_COLOR_RE = "|".join(COLORS)
_BACKGROUND_RE = re.compile(rf"\b(?:on )?(?:an? )?({_COLOR_RE}) background\b(?: with\b)?")
_RELATION_RE = re.compile(r"\b(to the left of|to the right of|left of|right of|above|below)\b")
# longest first, so "top left" wins over "top"
_POSITION_RE = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b")


def _parse_object(segment: str) -> ObjSpec | None:
    words = segment.split()
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None:
        return None
    before_shape = words[: words.index(shape)]  # "a red star" -> size/colour words come before the shape
    color = next((w for w in before_shape if w in COLORS), None)
    size = next((w for w in before_shape if w in SIZES), None)
    match = _POSITION_RE.search(segment)
    return ObjSpec(shape=shape, color=color, size=size, position=match.group(1) if match else None)


def parse_caption(text: str) -> CaptionSpec:
    """Read which background, objects and relation a caption asks for; unknown words are ignored.

    Works on every caption that ``caption`` writes and on similar free text ("a big grey star in the middle").
    Objects are found by their shape words; a caption with no shape word gives a spec with no objects.
    """
    text = " ".join(_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+|,", text.lower()))
    background = None
    match = _BACKGROUND_RE.search(text)
    if match:
        background = match.group(1)
        text = text[: match.start()] + " , " + text[match.end():]

    relation = None
    match = _RELATION_RE.search(text)
    if match:
        relation = match.group(1)
        if not relation.startswith("to "):
            relation = relation if relation in ("above", "below") else "to the " + relation
        segments = [text[: match.start()], text[match.end():]]
    else:
        segments = re.split(r"\band\b", text)

    objects = []
    for segment in segments:
        # a leading position belongs to the object after its comma ("in the top left, a red circle")
        spec = _parse_object(segment.replace(",", " "))
        if spec is not None:
            objects.append(spec)
    if relation is not None and len(objects) != 2:
        relation = None  # "a star above" names no second object: nothing to check
    return CaptionSpec(background=background, objects=tuple(objects), relation=relation)
