"""Loss curves drawn with PIL (matplotlib is not needed)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _smooth(values: list[float], k: int = 9) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def draw_loss_curves(history: dict[str, list[tuple[int, float]]], path, width: int = 900, panel_h: int = 220) -> None:
    """One panel per loss (log-scale y), x = step within its phase; `history[name]` is a list of (step, value)."""
    history = {n: [(s, v) for s, v in pts if math.isfinite(v)] for n, pts in history.items()}
    names = [n for n, pts in history.items() if len(pts) >= 2]
    height = max(1, len(names)) * panel_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        pts = history[name]
        steps = [s for s, _ in pts]
        vals = _smooth([max(v, 1e-6) for _, v in pts])
        top, left, right, bottom = i * panel_h + 24, 70, width - 20, (i + 1) * panel_h - 24
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        hi = hi if hi > lo else lo + 1e-3
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
        draw.text((left, top - 18), f"{name}  (last {vals[-1]:.4f}, step {steps[-1]})", fill=(0, 0, 0))
        for frac, label in ((0.0, hi), (1.0, lo)):
            draw.text((5, top + frac * (bottom - top) - 6), f"{10 ** label:.3g}", fill=(80, 80, 80))
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top))
              for s, v in zip(steps, vals)]
        draw.line(xy, fill=COLORS[i % len(COLORS)], width=2)
    img.save(path)
