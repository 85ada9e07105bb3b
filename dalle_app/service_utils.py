"""Request pieces shared by the service: validation, seeds, PNG metadata, scheduling, streaming a worker thread.

Pictures (reading uploads, drawing results) are in `dalle_app.images`, re-exported here."""

from __future__ import annotations

import contextvars
import json
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, PngImagePlugin

from .engine import SamplingOptions
from .errors import RequestError
from .images import eight_bit, load_image, psnr, to_pil, to_rgb, token_grid_picture  # noqa: F401 - re-exported

MAX_IMAGES = 16
MAX_SEED = 2 ** 31 - 1
PARAMETERS_KEY = "parameters"


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


# ----------------------------------------------------------------------------------------------- validation

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


# ----------------------------------------------------------------------------------------------- PNG metadata

def save_png(image: Image.Image, path: Path, parameters: dict) -> str:
    """Write `image` as PNG with `parameters` (JSON) in a text chunk named "parameters"."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    image.save(path, format="PNG", pnginfo=meta)
    return str(path)


def png_parameters(m, kind: str, prompt: str, seed, settings: dict) -> dict:
    """The "parameters" chunk of a PNG made by `m` (a LoadedModel): app, kind, model, revision, prompt, seed."""
    commit = next((f.commit or f.revision for f in m.files if getattr(f, "commit", None) or
                   getattr(f, "revision", None)), None)
    return {"app": "dalle_app", "kind": kind, "model": m.reference, "revision": commit, "prompt": prompt,
            "seed": seed, "settings": settings}


def read_parameters(png) -> dict:
    """The generation parameters stored in a PNG written by this app; RequestError when there are none."""
    try:
        image = png if isinstance(png, Image.Image) else Image.open(png)
        text = (getattr(image, "text", None) or image.info).get(PARAMETERS_KEY)
    except Exception:  # noqa: BLE001
        raise RequestError("The file could not be read as an image; choose a PNG written by this app.") from None
    if not text:
        raise RequestError("This image carries no generation parameters; choose a PNG written by this app.")
    try:
        return json.loads(text)
    except ValueError:
        raise RequestError("The image's parameters are not valid JSON; choose a PNG written by this app.") from None


def _eta_text(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    return f"{done}/{total} tokens · {rate:.0f} tokens/s · {left:.1f} s left" if rate > 0 else f"{done}/{total} tokens"


# ----------------------------------------------------------------------------------------------- scheduling

class Cancelled(Exception):
    """The request was cancelled (its client went away) while it waited for a turn."""


class Scheduler:
    """Fair turns on the model for concurrent requests.

    `workers` requests compute at once (1 = one GPU worker). A request that has used its turn for `slice_s`
    seconds hands over, between two tokens, to the next waiting request and queues again behind it: a large
    request cannot starve a small one that arrives after it. At most `max_active` requests are started at
    once (each started request keeps its cache in memory while it waits); later ones wait for a free place.
    Pausing between tokens changes no result: the computation of each request is the same as when run alone.
    """

    def __init__(self, workers: int = 1, max_active: int | None = None, slice_s: float = 0.1):
        if int(workers) < 1:
            raise ValueError(f"concurrency must be at least 1, got {workers}.")
        self.workers = int(workers)
        self.max_active = max(self.workers, int(max_active or 4 * self.workers))
        self.slice_s = float(slice_s)
        self._cond = threading.Condition()
        self._free = self.workers
        self._active = 0  # started and not finished
        self._waiting: list[Ticket] = []

    def ticket(self) -> "Ticket":
        """A new request's place; use as `with ticket:` around its model work."""
        return Ticket(self)

    def _next(self) -> "Ticket | None":
        """The first waiting request allowed to run (started ones always are; new ones while places are free)."""
        for ticket in self._waiting:
            if ticket.started or self._active < self.max_active:
                return ticket
        return None

    def stats(self) -> dict:
        """Requests computing, started, waiting (for tests and the UI)."""
        with self._cond:
            return {"running": self.workers - self._free, "started": self._active, "waiting": len(self._waiting)}


class Ticket:
    """One request's turns in a Scheduler. `with ticket:` waits for the first turn; `pause_point()` is polled
    between tokens; `cancel()` (from any thread) makes the request stop at its next pause point."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.started = False
        self.holding = False
        self.since = 0.0
        self.cancelled = threading.Event()

    def __enter__(self) -> "Ticket":
        self._acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._release(finished=True)

    def position(self) -> int | None:
        """How many requests are ahead of this one: those computing now and those waiting before it (None when
        this one is computing or finished)."""
        s = self.scheduler
        with s._cond:
            return s._waiting.index(self) + s.workers - s._free if self in s._waiting else None

    def cancel(self) -> None:
        """Stop this request at its next pause point (or while it waits for a turn)."""
        self.cancelled.set()
        with self.scheduler._cond:
            self.scheduler._cond.notify_all()

    def _acquire(self) -> None:
        s = self.scheduler
        with s._cond:
            s._waiting.append(self)
            try:
                while not (s._free > 0 and s._next() is self):
                    if self.cancelled.is_set():
                        raise Cancelled("the request was cancelled")
                    s._cond.wait()
            finally:
                s._waiting.remove(self)
                s._cond.notify_all()
            s._free -= 1
            if not self.started:
                self.started = True
                s._active += 1
            self.holding, self.since = True, time.monotonic()

    def _release(self, finished: bool) -> None:
        s = self.scheduler
        with s._cond:
            if self.holding:
                self.holding = False
                s._free += 1
            if finished and self.started:
                self.started = False
                s._active -= 1
            s._cond.notify_all()

    def pause_point(self) -> bool:
        """Between two tokens: hand the turn over when the slice is used and another request waits.

        Returns True when the request was cancelled (the caller then stops)."""
        if self.cancelled.is_set():
            return True
        if time.monotonic() - self.since < self.scheduler.slice_s:
            return False
        with self.scheduler._cond:
            other = self.scheduler._next()
        if other is not None and other is not self:
            self._release(finished=False)
            self._acquire()
        else:
            self.since = time.monotonic()
        return self.cancelled.is_set()


def in_fresh_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) run on a new, short-lived thread; its result returned, its exception re-raised here.

    PyTorch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that ran a parallel op, and
    once the pools hold more threads than there are cores, all of them stop spinning between ops: a generation on a
    2-core CPU then runs 2.3x slower. So model work (loading, encoding, sampling) runs on short-lived threads, whose
    pools end with them, never on the app's long-lived threads (the main thread, Gradio's workers)."""
    box: dict = {}
    context = contextvars.copy_context()  # e.g. Gradio's progress tracker follows the work into the thread

    def run():
        try:
            box["result"] = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_in_thread(fn: Callable, heartbeat_s: float = 0.25) -> Iterator:
    """Run fn(emit) in a thread; yield what it emits, None after each `heartbeat_s` without news, and finally
    ("result", value). An exception in fn is re-raised here."""
    items: queue.Queue = queue.Queue()

    def run():
        try:
            items.put(("result", fn(items.put)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            items.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()
    while True:
        try:
            item = items.get(timeout=heartbeat_s)
        except queue.Empty:
            yield None
            continue
        if isinstance(item, tuple) and item[0] == "error":
            raise item[1]
        yield item
        if isinstance(item, tuple) and item[0] == "result":
            return
