"""Request pieces shared by the service: validation, seeds, PNG metadata, pictures, streaming a worker thread."""

from __future__ import annotations

import json
import math
import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .engine import SamplingOptions

MAX_IMAGES = 16
MAX_SEED = 2 ** 31 - 1
PARAMETERS_KEY = "parameters"


class RequestError(ValueError):
    """A request the user can fix; the message is one sentence."""


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


def validate_sampling(num_images, temperature, top_k, cond_scale, seed, *, max_images: int = MAX_IMAGES,
                      name: str = "Number of images") -> tuple[int, SamplingOptions, int]:
    """Check the common settings; return (count, SamplingOptions, seed) or raise RequestError (one sentence)."""
    count = _number(name, num_images, 1, max_images, integer=True)
    temperature = _number("Temperature", temperature, 0.01, 10.0)
    top_k = _number("Top-k", 0 if top_k in (None, "") else top_k, 0, 1e7, integer=True)
    cond_scale = _number("Guidance scale", cond_scale, 0.0, 100.0)
    seed = _number("Seed", -1 if seed in (None, "") else seed, -1, MAX_SEED, integer=True)
    return count, SamplingOptions(temperature=temperature, top_k=top_k or None, cond_scale=cond_scale), seed


def resolve_seeds(seed: int, count: int) -> list[int]:
    """seed, seed+1, ... for each image; seed -1 picks a random starting seed."""
    if seed < 0:
        seed = random.SystemRandom().randrange(0, MAX_SEED - MAX_IMAGES)
    return [(seed + i) % MAX_SEED for i in range(count)]


def load_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, numpy array or file path; RequestError when it is missing or unreadable."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise RequestError("No image was given; upload an image first.")
    try:
        if isinstance(image, (str, Path)):
            image = Image.open(image)
            _check_pixels(image)
            image.load()
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image.astype(np.uint8))
        elif isinstance(image, dict) and image.get("path"):
            return load_image(image["path"])
        if not isinstance(image, Image.Image):
            raise TypeError
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError("The image is too large; upload a picture under "
                           f"{Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels.") from None
    except Exception:  # noqa: BLE001 - any unreadable input is the same user error
        raise RequestError("The image could not be read; upload a PNG, JPEG or WebP picture.") from None
    if min(image.size) < 1:
        raise RequestError("The image is empty; upload a picture with at least one pixel.")
    return image.convert("RGB")


def _check_pixels(image: Image.Image) -> None:
    """Refuse pictures above PIL's MAX_IMAGE_PIXELS before decoding them (PIL only warns up to twice that)."""
    w, h = image.size
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise RequestError(f"The image is too large ({w}x{h} pixels); upload a picture under "
                           f"{Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels.")


# ----------------------------------------------------------------------------------------------- PNG metadata

def save_png(image: Image.Image, path: Path, parameters: dict) -> str:
    """Write `image` as PNG with `parameters` (JSON) in a text chunk named "parameters"."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    image.save(path, format="PNG", pnginfo=meta)
    return str(path)


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


# ----------------------------------------------------------------------------------------------- pictures

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(b, c, h, w) floats in [0, 1] -> RGB PIL images."""
    array = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a if a.shape[2] == 3 else a[..., :1].repeat(3, 2)) for a in array]


def token_grid_picture(ids: torch.Tensor, size: int) -> Image.Image:
    """A picture of a token grid: each codebook id gets a fixed pseudo-random colour, blown up to `size`."""
    side = int(math.isqrt(ids.numel()))
    palette = np.random.default_rng(1234).integers(0, 256, size=(int(ids.max()) + 1, 3), dtype=np.uint8)
    grid = palette[ids.reshape(side, side).cpu().numpy()]
    return Image.fromarray(grid).resize((size, size), Image.NEAREST)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _eta_text(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    return f"{done}/{total} tokens · {rate:.0f} tokens/s · {left:.1f} s left" if rate > 0 else f"{done}/{total} tokens"


def _stream(fn: Callable, **kwargs) -> Iterator:
    """Run fn(progress=callback, **kwargs) in a thread; yield each Progress, then ("result", value)."""
    items: queue.Queue = queue.Queue()

    def run():
        try:
            items.put(("result", fn(progress=items.put, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            items.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()
    while True:
        item = items.get()
        if isinstance(item, tuple) and item[0] == "error":
            raise item[1]
        yield item
        if isinstance(item, tuple) and item[0] == "result":
            return
