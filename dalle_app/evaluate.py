"""Measure how well a model draws held-out captions, with the world's judge.

    python -m dalle_app.evaluate --model weights/shapes-dalle --n 500 [--cond-scale 1.5 --top-k 64 --rerank 8]

Prints the fidelity table (per attribute accuracy), the VAE's PSNR on fresh renders and, with --vae-judge N, the
upper bound the VAE sets: the judge's table for VAE reconstructions of N held-out scenes rendered with their captions.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from .engine import SamplingOptions, generate_image_tokens
from .world import (ShapesDataset, fidelity_table, format_fidelity_table, heldout_captions, heldout_scenes,
                    image_to_tensor, render)


def candidate_batches(model, captions: list[str], options: SamplingOptions, of: int = 1, batch: int = 256,
                      seed: int = 0):
    """Yield (text rows, decoded images) chunks of `of` samples per caption, in caption order: text (b, T) ids and
    images (b, 3, S, S) in the VAE's output space. Row r has seed `seed * 1_000_003 + r`, so a caption's
    candidates are the same whatever the batch."""
    text = model.tokenizer.tokenize(captions, model.dalle.text_seq_len, truncate_text=True)
    rows = text.repeat_interleave(of, dim=0)
    for i in range(0, rows.shape[0], batch):
        chunk = rows[i:i + batch]
        seeds = [seed * 1_000_003 + i + j for j in range(chunk.shape[0])]
        ids = generate_image_tokens(model.dalle, chunk, options, seeds=seeds).image_ids
        yield chunk, model.vae.decode(ids)


def clip_scores(clip, text: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """CLIP score (b,) of each decoded image (b, 3, S, S) against its text row (b, T)."""
    device = clip.temperature.device
    text = text.to(device)
    return clip(text, decoded.clamp(-1, 1).to(device, clip.temperature.dtype), text_mask=text != 0).float()


@torch.no_grad()
def generate(model, captions: list[str], options: SamplingOptions, rerank: int = 1, batch: int = 256,
             seed: int = 0) -> list[torch.Tensor]:
    """One image per caption ([0, 1], (3, S, S), CPU); with rerank > 1 the best of `rerank` by CLIP score."""
    if rerank > 1 and model.clip is None:
        raise ValueError("--rerank needs a model with a CLIP; this one has none.")
    batch -= batch % rerank  # whole groups of candidates per chunk
    out = []
    for text, decoded in candidate_batches(model, captions, options, of=rerank, batch=batch, seed=seed):
        if rerank > 1:
            groups = decoded.view(-1, rerank, *decoded.shape[1:])
            best = clip_scores(model.clip, text, decoded).view(-1, rerank).argmax(dim=1)
            decoded = groups[torch.arange(groups.shape[0]), best.to(groups.device)]
        out.extend(model.vae.to_unit_range(decoded.float()).cpu())
    return out


@torch.no_grad()
def vae_psnr(vae, n: int = 256, device=None) -> float:
    """Mean PSNR (dB, [0, 1] space) of VAE reconstructions of n fresh renders."""
    from .training import psnr

    device = device or next(vae.parameters()).device
    stream = iter(ShapesDataset(seed=424242, image_size=vae.image_size))
    images = torch.stack([next(stream)[0] for _ in range(n)]).to(device, next(vae.parameters()).dtype)
    recon = vae.to_unit_range(vae.decode(vae.get_codebook_indices(images)).float())
    return psnr(recon, images.float()).item()


@torch.no_grad()
def vae_reconstructions_of_heldout(vae, n: int = 200, seed: int = 1) -> tuple[list[str], list, list[torch.Tensor]]:
    """(captions, renders, VAE reconstructions in [0, 1] on the CPU) of n held-out scenes (stream `seed`)."""

    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    rng = random.Random(f"vae-judge/{seed}")
    pairs = heldout_scenes(n, seed=seed)
    renders = [image_to_tensor(render(scene, rng)) for scene, _ in pairs]
    recon = []
    for i in range(0, n, 64):
        images = torch.stack(renders[i:i + 64]).to(device, dtype)
        recon.extend(vae.to_unit_range(vae.decode(vae.get_codebook_indices(images)).float()).cpu())
    return [text for _, text in pairs], renders, recon


def _judge_chunk(args):
    captions, images = args
    table = fidelity_table(captions, images)
    return {k: (v["correct"], v["n"]) for k, v in table.items()}


def judge(captions, images, workers: int = 1) -> dict:
    """fidelity_table, spread over `workers` processes."""
    images = [(img.numpy() * 255).round().clip(0, 255).astype("uint8").transpose(1, 2, 0) for img in images]
    if workers <= 1:
        return fidelity_table(captions, images)
    step = (len(captions) + workers - 1) // workers
    parts = [(captions[i:i + step], images[i:i + step]) for i in range(0, len(captions), step)]
    totals: dict[str, list[int]] = {}
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_judge_chunk, parts):
            for k, (c, n) in part.items():
                t = totals.setdefault(k, [0, 0])
                t[0] += c
                t[1] += n
    from .world import ATTRIBUTES
    return {k: {"accuracy": totals[k][0] / totals[k][1], "correct": totals[k][0], "n": totals[k][1]}
            for k in ATTRIBUTES if k in totals}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model reference (default: the built-in model)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="held-out caption stream")
    parser.add_argument("--cond-scale", type=float, default=None,
                        help="guidance (default: the model's recommended_sampling, else 1 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="default: the model's recommended_sampling, else 64")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the model's recommended_sampling, else 1")
    parser.add_argument("--rerank", type=int, default=1, help="best of N by CLIP score (1 = off)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=1, help="processes for the judge")
    parser.add_argument("--vae-judge", type=int, default=0, metavar="N",
                        help="also judge VAE reconstructions of N held-out renders (the VAE's upper bound)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from .manager import BUILTIN_MODEL_DIR, ModelManager, recommended_sampling

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ModelManager(device=device).load(args.model or str(BUILTIN_MODEL_DIR), device=device)
    vars(args).update(recommended_sampling(model.config, cond_scale=args.cond_scale, top_k=args.top_k,
                                           temperature=args.temperature))
    captions = heldout_captions(args.n, seed=args.seed)
    options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, cond_scale=args.cond_scale)
    t = time.time()
    images = generate(model, captions, options, rerank=args.rerank, batch=args.batch)
    gen_s = time.time() - t
    table = judge(captions, images, args.workers)
    psnr_db = vae_psnr(model.vae)
    print(f"{args.n} held-out captions, cond_scale={args.cond_scale}, top_k={args.top_k}, "
          f"temperature={args.temperature}, rerank={args.rerank}; generation {gen_s:.1f} s on {device}")
    print(format_fidelity_table(table))
    print(f"VAE PSNR on 256 fresh renders: {psnr_db:.2f} dB")
    result = {"settings": vars(args), "device": str(device), "table": table, "vae_psnr": psnr_db,
              "gen_seconds": gen_s}
    if args.vae_judge:
        vae_captions, renders, recon = vae_reconstructions_of_heldout(model.vae, args.vae_judge)
        result["vae_upper_bound"] = judge(vae_captions, recon, args.workers)
        result["renders_judged"] = judge(vae_captions, renders, args.workers)
        print(f"Judge on VAE reconstructions of {args.vae_judge} held-out renders (the VAE's upper bound):")
        print(format_fidelity_table(result["vae_upper_bound"]))
        print("Judge on the renders themselves:")
        print(format_fidelity_table(result["renders_judged"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
