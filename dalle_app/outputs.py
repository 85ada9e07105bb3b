"""The service's output folder: the PNGs written for requests (with their generation parameters), and their
retention.

The app writes every image it shows as a PNG. Without a limit they would fill the disk of a long-running server,
so the folder keeps at most `max_bytes` and `max_files` of them and none older than `max_age_s`, deleting the
oldest first. A file is never deleted while the request that wrote it is still being served (its files are held
until its generator is finished or closed), nor within `grace_s` seconds of being written (the caller may still be
copying it, as Gradio does when it serves a result). Only files the service writes (named
`YYYYMMDD-HHMMSS-NNNNxxxx-kind-....png`) at the top of the folder are considered: example pictures in subfolders
and any other file stay.

Environment variables (read by `Retention.from_env`; 0 turns a limit off):
    DALLE_APP_OUTPUT_LIMIT_MB      total size of the PNGs, default 500
    DALLE_APP_OUTPUT_LIMIT_FILES   number of PNGs, default 10000
    DALLE_APP_OUTPUT_MAX_AGE_H     hours a PNG is kept, default 24
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, PngImagePlugin

from .errors import RequestError

PARAMETERS_KEY = "parameters"

LIMIT_MB_ENV = "DALLE_APP_OUTPUT_LIMIT_MB"
LIMIT_FILES_ENV = "DALLE_APP_OUTPUT_LIMIT_FILES"
MAX_AGE_ENV = "DALLE_APP_OUTPUT_MAX_AGE_H"
DEFAULT_LIMIT_MB = 500
DEFAULT_LIMIT_FILES = 10_000
DEFAULT_MAX_AGE_H = 24
OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d{4,}[0-9a-f]{4}-.+\.png")


def _env_number(name: str, default: float) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be a number of at least 0 (0 = no limit), got '{text}'.")
    return value or None


@dataclass(frozen=True)
class Retention:
    """Limits of an output folder (None = no limit); see the module docstring."""

    max_bytes: int | None = DEFAULT_LIMIT_MB * 1024 ** 2
    max_files: int | None = DEFAULT_LIMIT_FILES
    max_age_s: float | None = DEFAULT_MAX_AGE_H * 3600.0
    grace_s: float = 60.0

    @classmethod
    def from_env(cls) -> "Retention":
        """The limits set by DALLE_APP_OUTPUT_LIMIT_MB / _LIMIT_FILES / _MAX_AGE_H (defaults 500 MB, 10000, 24 h).

        Raises ValueError (one sentence) for a value that is not a number >= 0."""
        mb = _env_number(LIMIT_MB_ENV, DEFAULT_LIMIT_MB)
        files = _env_number(LIMIT_FILES_ENV, DEFAULT_LIMIT_FILES)
        hours = _env_number(MAX_AGE_ENV, DEFAULT_MAX_AGE_H)
        return cls(max_bytes=int(mb * 1024 ** 2) if mb else None, max_files=int(files) if files else None,
                   max_age_s=hours * 3600.0 if hours else None)


class OutputFolder:
    """Where a service writes its PNGs; `prune()` applies the retention (None = keep everything). Thread-safe.

    The folder's PNGs are indexed in memory, oldest first, so pruning after each request costs little however many
    files there are; the folder is scanned again every `rescan_s` seconds (files deleted or added by others)."""

    def __init__(self, path: str | Path, retention: Retention | None = None, rescan_s: float = 300.0):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self.rescan_s = rescan_s
        self._held: Counter[str] = Counter()  # file name -> requests still serving it
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._index: OrderedDict[str, tuple[float, int]] = OrderedDict()  # name -> (mtime, size), oldest first
        self._bytes = 0
        self._scanned = float("-inf")

    def write(self, images, kind: str, parameters: list[dict], names: list[str]) -> list[str]:
        """Save `images` as PNGs named time-request-kind-name (the request id keeps concurrent requests apart),
        each with its `parameters` text chunk; they are held (see `hold`) until the caller releases them. Then
        prune the folder."""
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._ids):04d}{uuid.uuid4().hex[:4]}-{kind}"
        files = [save_png(image, self.path / f"{stem}-{name}.png", params)
                 for image, params, name in zip(images, parameters, names)]
        self.hold(files)
        with self._lock:
            for file in files:
                stat = os.stat(file)
                self._add(Path(file).name, stat.st_mtime, stat.st_size)
        self.prune()
        return files

    def hold(self, files: Iterable[str | Path]) -> None:
        """Keep `files` whatever the limits until `release(files)` (a request is still serving them)."""
        with self._lock:
            self._held.update(Path(f).name for f in files)

    def release(self, files: Iterable[str | Path]) -> None:
        """End a `hold`: the files may be deleted from now on (after the grace period)."""
        with self._lock:
            self._held.subtract(Path(f).name for f in files)
            self._held += Counter()  # drops the names that reached zero

    def usage(self) -> tuple[int, int]:
        """(number, total bytes) of the service's PNGs in the folder (as of the last scan and the writes since)."""
        with self._lock:
            self._rescan_if_due(time.monotonic())
            return len(self._index), self._bytes

    def _add(self, name: str, mtime: float, size: int) -> None:
        if name in self._index:
            self._bytes -= self._index.pop(name)[1]
        self._index[name] = (mtime, size)
        self._bytes += size

    def _rescan_if_due(self, now_monotonic: float) -> None:
        """Rebuild the index from the folder (the service's PNGs at its top level), oldest first."""
        if now_monotonic - self._scanned < self.rescan_s:
            return
        found = []
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if not OUTPUT_NAME.fullmatch(entry.name):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=False):
                            stat = entry.stat(follow_symlinks=False)
                            found.append((stat.st_mtime, entry.name, stat.st_size))
                    except FileNotFoundError:  # deleted meanwhile
                        continue
        except FileNotFoundError:
            pass
        self._index.clear()
        self._bytes = 0
        for mtime, name, size in sorted(found):
            self._add(name, mtime, size)
        self._scanned = now_monotonic

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete the oldest PNGs until the folder is within its limits (held and recent files are kept, even
        if the folder stays over a limit because of them); returns the deleted paths."""
        limits = self.retention
        if limits is None:
            return []
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            self._rescan_if_due(time.monotonic())
            for name, (mtime, size) in list(self._index.items()):
                expired = limits.max_age_s is not None and now - mtime > limits.max_age_s
                over = ((limits.max_files is not None and len(self._index) > limits.max_files)
                        or (limits.max_bytes is not None and self._bytes > limits.max_bytes))
                if not (expired or over):
                    break  # the rest are newer
                if self._held[name] > 0 or now - mtime < limits.grace_s:
                    continue
                try:
                    (self.path / name).unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # e.g. no permission: leave it, try the next one
                del self._index[name]
                self._bytes -= size
                removed.append(self.path / name)
        return removed


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
