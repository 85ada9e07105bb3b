"""Model card pieces: a sample grid for example prompts, VAE reconstructions, and the card text.

    python -m dalle_app.training.card --model weights/shapes-dalle [--eval-default e.json --eval-rerank r.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..engine import SamplingOptions
from ..world import ShapesDataset, format_fidelity_table

EXAMPLE_PROMPTS = [
    "a red circle", "a large blue star in the top left", "a small yellow heart at the bottom right",
    "a green triangle on a black background", "a white cross in the center on a purple background",
    "a pink diamond to the left of a cyan square", "an orange ring above a gray circle",
    "on a yellow background, a large brown star", "a black square in the top right on a white background",
    "a purple heart to the right of a green ring", "a small cyan cross at the bottom on a red background",
    "a blue diamond below an orange triangle",
]


def grid_settings(recommended_cond_scale: float) -> list[tuple[str, dict, int]]:
    """The sample grid's columns: (title, sampling options, rerank), from no guidance to strong guidance."""
    g = f"{recommended_cond_scale:g}"
    return [("no guidance", dict(cond_scale=1.0), 1), (f"guidance {g}", dict(cond_scale=recommended_cond_scale), 1),
            (f"CLIP best of 8 at {g}", dict(cond_scale=recommended_cond_scale), 8),
            ("guidance 3", dict(cond_scale=3.0), 1)]


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def sample_grid(model, path, prompts=EXAMPLE_PROMPTS, top_k: int | None = None, seed: int = 0) -> None:
    """Rows = prompts, columns = `grid_settings` at the model's recommended guidance and temperature (and top-k,
    unless given); the prompt is written at the left."""
    from ..evaluate import generate
    from ..manager import recommended_sampling

    recommended = recommended_sampling(model.config, top_k=top_k)
    settings = grid_settings(recommended["cond_scale"])
    cell, label_w = 128, 330
    grid = Image.new("RGB", (label_w + cell * len(settings), 20 + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, kw, rerank) in enumerate(settings):
        draw.text((label_w + c * cell + 4, 4), name[:22], fill=(0, 0, 0))
        options = SamplingOptions(top_k=recommended["top_k"], temperature=recommended["temperature"], **kw)
        images = generate(model, list(prompts), options, rerank=rerank, seed=seed)
        for r, img in enumerate(images):
            grid.paste(_to_pil(img), (label_w + c * cell, 20 + r * cell))
    for r, text in enumerate(prompts):
        draw.text((4, 20 + r * cell + cell // 2 - 6), text, fill=(0, 0, 0))
    grid.save(path)


@torch.no_grad()
def reconstructions(vae, path, n: int = 8) -> None:
    """Top row fresh renders, bottom row their VAE reconstructions."""
    stream = iter(ShapesDataset(seed=777, image_size=vae.image_size))
    images = torch.stack([next(stream)[0] for _ in range(n)])
    recon = vae.to_unit_range(vae.decode(vae.get_codebook_indices(images)).float())
    grid = Image.new("RGB", (vae.image_size * n, vae.image_size * 2), "white")
    for i in range(n):
        grid.paste(_to_pil(images[i]), (i * vae.image_size, 0))
        grid.paste(_to_pil(recon[i]), (i * vae.image_size, vae.image_size))
    grid.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.card", description=__doc__)
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    from ..manager import ModelManager

    model = ModelManager(device="cpu").load(args.model, device="cpu")
    folder = Path(args.model)
    reconstructions(model.vae, folder / "vae_reconstructions.png")
    sample_grid(model, folder / "samples.png")
    print("wrote", folder / "samples.png", folder / "vae_reconstructions.png")


def table_of(path) -> str:
    """Markdown fidelity table from an evaluate --json file."""
    return format_fidelity_table(json.loads(Path(path).read_text())["table"])


if __name__ == "__main__":
    main()
