"""Look at and measure the shapes world.

    python -m dalle_app.world grid --out world_grid.png   # 16 samples with their captions (the default command)
    python -m dalle_app.world bench                        # renders per second on one core
    python -m dalle_app.world judge --n 2000               # judge accuracy on fresh renders
"""

from __future__ import annotations

import argparse
import random
import textwrap
import time

from PIL import Image, ImageDraw, ImageFont

from .captions import caption
from .dataset import sample_pair, training_stream
from .judge import measure_judge_accuracy, read_image
from .render import render
from .scene import IMAGE_SIZE, sample_scene


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def sample_grid(n: int = 16, seed: int = 0, columns: int = 4, zoom: int = 2, judge: bool = True) -> Image.Image:
    """A grid of ``n`` training samples, each shown ``zoom`` times larger above its caption (and the judge's reading)."""
    rng = training_stream(seed)
    side, text_height, pad = IMAGE_SIZE * zoom, 95, 8
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_height + pad) + pad), "white")
    draw, font = ImageDraw.Draw(sheet), _font(14)
    for i in range(n):
        image, text, _ = sample_pair(rng)
        x, y = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + text_height + pad)
        sheet.paste(image.resize((side, side), Image.NEAREST), (x, y))
        lines = textwrap.wrap(text, 34)
        if judge:
            lines += textwrap.wrap("judge: " + read_image(image).describe(), 38)
        for j, line in enumerate(lines[:6]):
            draw.text((x, y + side + 3 + 15 * j), line, fill="black" if j < len(textwrap.wrap(text, 34)) else "gray",
                      font=font)
    return sheet


def renders_per_second(n: int = 5000, seed: int = 0) -> dict[str, float]:
    """Scenes sampled, rendered and captioned per second on the calling thread (one core)."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene, rng)
    render_rate = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        scene = sample_scene(rng)
        render(scene, rng)
        caption(scene, rng)
    return {"render": render_rate, "sample+render+caption": n / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.world", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    grid = sub.add_parser("grid", help="save a grid of 16 samples with captions")
    grid.add_argument("--out", default="world_grid.png")
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--n", type=int, default=16)
    sub.add_parser("bench", help="measure renders per second on one core")
    judge = sub.add_parser("judge", help="measure the judge's accuracy on fresh renders")
    judge.add_argument("--n", type=int, default=2000)
    judge.add_argument("--noise", type=float, default=0.0, help="std of Gaussian pixel noise added (0..255)")
    judge.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius in pixels (soft images)")
    args = parser.parse_args()

    if args.command in (None, "grid"):
        out, seed, n = (getattr(args, "out", "world_grid.png"), getattr(args, "seed", 0), getattr(args, "n", 16))
        sample_grid(n, seed).save(out)
        print(f"saved {n} samples to {out}")
    elif args.command == "bench":
        for name, rate in renders_per_second().items():
            print(f"{name}: {rate:,.0f} per second (one core)")
    elif args.command == "judge":
        start = time.perf_counter()
        accuracy = measure_judge_accuracy(args.n, noise=args.noise, blur=args.blur)
        print(f"judge accuracy on {args.n} fresh scenes (noise std {args.noise:g}, blur {args.blur:g} px), "
              f"{args.n / (time.perf_counter() - start):.0f} scenes/s:")
        for name, value in accuracy.items():
            print(f"  {name:10s} {value * 100:6.2f}%")


if __name__ == "__main__":
    main()
