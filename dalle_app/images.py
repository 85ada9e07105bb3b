"""Pictures for the service: reading uploaded images (any PIL mode, 16-bit included) and drawing results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import RequestError


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
            image = Image.fromarray(eight_bit(image))
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
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, upright (EXIF orientation applied).

    PIL's own convert("RGB") clips 16-bit ('I;16', 'I;16B', ...), 32-bit integer ('I') and float ('F') pixels at
    255, which turns a 16-bit picture nearly white; these are scaled to 8 bits by `eight_bit` first."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation
        pass
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(eight_bit(np.asarray(image)))
    return image.convert("RGB")


def eight_bit(values: np.ndarray) -> np.ndarray:
    """uint8 pixels from a numeric pixel array, scaled by the range its type (or else its values) implies.

    uint8: as is; bool: 0 / 255; 16-bit unsigned (16-bit PNG / TIFF): by 65535; floats within [0, 1]: by 1; other
    numbers (PIL's 32-bit 'I', float 'F') within 0..255: as 8-bit values, within 0..65535: as 16-bit values (how
    16-bit files read as 'I'), else stretched from their own minimum to their maximum. NaN reads as the minimum."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    x = values.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    x = np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        low, top = 0.0, 65535.0
    elif values.dtype.kind == "f" and lo >= 0 and hi <= 1:
        low, top = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        low, top = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        low, top = 0.0, 65535.0
    else:
        low, top = lo, max(hi, lo + 1e-12)
    return np.clip(np.round((x - low) * (255.0 / (top - low))), 0, 255).astype(np.uint8)


def _check_pixels(image: Image.Image) -> None:
    """Refuse pictures above PIL's MAX_IMAGE_PIXELS before decoding them (PIL only warns up to twice that)."""
    w, h = image.size
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise RequestError(f"The image is too large ({w}x{h} pixels); upload a picture under "
                           f"{Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels.")


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


