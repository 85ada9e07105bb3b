"""A request's pieces: the Update a request streams, validation of its settings (one sentence per mistake), its
seeds, and the token mask of image priming."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from ..engine import SamplingOptions
from ..errors import RequestError

MAX_IMAGES = 16
MAX_SEED = 2 ** 31 - 1


@dataclass
class Update:
    """One step of a request: preview images (PIL) or, when `done`, the written PNG files and the info dict."""

    images: list = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    progress_text: str = ""
    fraction: float = 0.0
    done: bool = False
    texts: list[str] = field(default_factory=list)
    tokens_per_s: float = 0.0  # image tokens per second (per image), counting time spent waiting for a turn
    eta_s: float | None = None  # seconds left (None = unknown, e.g. still waiting for the model)
    waiting: bool = False  # a keep-alive without new images (waiting for a turn): keep showing what you have


def _number(name: str, value, low: float, high: float, integer: bool = False):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}, got {value}.")
    if integer:
        if number != int(number):
            raise RequestError(f"{name} must be a whole number, got {value}.")
        return int(number)
    return number


def validate_sampling(num_images, temperature, top_k, cond_scale, seed, *, top_p=None, max_images: int = MAX_IMAGES,
                      name: str = "Number of images") -> tuple[int, SamplingOptions, int]:
    """Check the common settings; return (count, SamplingOptions, seed) or raise RequestError (one sentence).

    top_k 0/None = all codes; top_p None or 1 = no nucleus filter, else 0 < top_p <= 1; seed -1 = random."""
    count = _number(name, num_images, 1, max_images, integer=True)
    temperature = _number("Temperature", temperature, 0.01, 10.0)
    top_k = _number("Top-k", 0 if top_k in (None, "") else top_k, 0, 1e7, integer=True)
    if top_p in (None, ""):
        top_p = None
    else:
        top_p = _number("Top-p", top_p, 0.0, 1.0)
        if top_p <= 0:
            raise RequestError(f"Top-p must be above 0 and at most 1 (1 = off), got {top_p:g}.")
        top_p = None if top_p >= 1 else top_p
    cond_scale = _number("Guidance scale", cond_scale, 0.0, 100.0)
    seed = _number("Seed", -1 if seed in (None, "") else seed, -1, MAX_SEED, integer=True)
    options = SamplingOptions(temperature=temperature, top_k=top_k or None, top_p=top_p, cond_scale=cond_scale)
    return count, options, seed


def resolve_seeds(seed: int, count: int) -> list[int]:
    """seed, seed+1, ... for each image; seed -1 picks a random starting seed."""
    if seed < 0:
        seed = random.SystemRandom().randrange(0, MAX_SEED - MAX_IMAGES)
    return [(seed + i) % MAX_SEED for i in range(count)]


def keep_mask(side: int, keep_rows, box=None) -> torch.Tensor:
    """(side*side,) bool for a side x side token grid: the first `keep_rows` rows, plus the cells inside `box` =
    (left, top, right, bottom) given as fractions of the image in [0, 1]."""
    try:
        rows = float(keep_rows)
    except (TypeError, ValueError):
        raise RequestError(f"Rows to keep must be a number, got {keep_rows!r}.") from None
    if not math.isfinite(rows) or rows != int(rows) or not 0 <= rows <= side:
        raise RequestError(f"Rows to keep must be a whole number between 0 and {side}, got {keep_rows}.")
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[:int(rows)] = True
    if box is not None and any(v is not None for v in box):
        try:
            left, top, right, bottom = (float(v) for v in box)
        except (TypeError, ValueError):
            raise RequestError("The keep box needs four numbers: left, top, right, bottom.") from None
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise RequestError("The keep box must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1.")
        mask[math.floor(top * side):math.ceil(bottom * side), math.floor(left * side):math.ceil(right * side)] = True
    return mask.flatten()


def eta_text(done: int, total: int, elapsed: float) -> str:
    """"done/total tokens · rate · time left", the progress line of a request."""
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    return f"{done}/{total} tokens · {rate:.0f} tokens/s · {left:.1f} s left" if rate > 0 else f"{done}/{total} tokens"
