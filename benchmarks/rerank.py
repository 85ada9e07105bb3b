"""Reranking compared on the same candidates: one generation, several CLIPs (and the judge's own pick, as a bound).

    python benchmarks/rerank.py --model weights/shapes-dalle --clips weights/shapes-dalle runs/tuned --n 500 --of 8

Generates `--of` candidates per held-out caption once, at the model's recommended sampling, then judges:
- "first": the first candidate of each caption (what plain sampling gives, same settings);
- "best of N by <clip>": the candidate each CLIP scores highest;
- "oracle": the candidate with the most attributes right by the judge (what a perfect reranker could reach).
Prints one markdown table (rows: attributes; columns: the pickers) and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dalle_app.engine import SamplingOptions  # noqa: E402
from dalle_app.evaluate import candidate_batches, clip_scores, judge  # noqa: E402
from dalle_app.manager import ModelManager, recommended_sampling  # noqa: E402
from dalle_app.world import heldout_captions, read_image, score  # noqa: E402


@torch.no_grad()
def candidates(model, captions, of: int, options, batch: int = 256) -> torch.Tensor:
    """(len(captions), of, 3, S, S) decoded candidates in the VAE's output space (float32, CPU), the same ones
    `python -m dalle_app.evaluate --rerank` draws."""
    chunks = [d.float().clamp(-1, 1).cpu() for _, d in candidate_batches(model, captions, options, of=of, batch=batch)]
    return torch.cat(chunks).view(len(captions), of, *chunks[0].shape[1:])


@torch.no_grad()
def scores_of(clip, tokenizer, text_seq_len, captions, decoded, batch: int = 256) -> torch.Tensor:
    """(len(captions), of) CLIP scores of each candidate against its caption."""
    n, of = decoded.shape[:2]
    text = tokenizer.tokenize(captions, text_seq_len, truncate_text=True).repeat_interleave(of, dim=0)
    flat = decoded.flatten(0, 1)
    return torch.cat([clip_scores(clip, text[i:i + batch], flat[i:i + batch]).cpu()
                      for i in range(0, len(flat), batch)]).view(n, of)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/shapes-dalle", help="the model that generates")
    ap.add_argument("--clips", nargs="+", default=None, help="model folders whose CLIPs rerank (default: --model)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--of", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="held-out caption stream")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--candidates", default=None, metavar="FILE",
                    help="keep the candidates in FILE (float32, ~0.8 GB for 500 x 8): generated and written when it is missing, "
                         "read back otherwise, so that another CLIP can be compared without generating again")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = ModelManager(device=device)
    model = manager.load(args.model, device=device)
    rec = recommended_sampling(model.config)
    options = SamplingOptions(top_k=rec["top_k"], cond_scale=rec["cond_scale"],
                              temperature=rec["temperature"])
    captions = heldout_captions(args.n, seed=args.seed)
    start = time.time()
    if args.candidates and Path(args.candidates).exists():
        decoded = torch.load(args.candidates, weights_only=True)  # our own file, tensors only
        if decoded.shape[:2] != (args.n, args.of):
            raise SystemExit(f"{args.candidates} holds {tuple(decoded.shape[:2])} candidates, not ({args.n}, {args.of}).")
    else:
        decoded = candidates(model, captions, args.of, options, batch=args.batch)
        if args.candidates:
            torch.save(decoded, args.candidates)
    gen_s = time.time() - start
    images = model.vae.to_unit_range(decoded)  # (n, of, 3, S, S) in [0, 1]
    columns = {"first": torch.zeros(args.n, dtype=torch.long)}
    for folder in args.clips or [args.model]:
        other = manager.load(folder, device=device)
        columns[f"best of {args.of} by {folder}"] = scores_of(other.clip, other.tokenizer, model.dalle.text_seq_len,
                                                              captions, decoded).argmax(dim=1)
    arrays = (images.numpy() * 255).round().clip(0, 255).astype("uint8").transpose(0, 1, 3, 4, 2)
    right = torch.tensor([[sum(score(c, read_image(img)).values()) for img in group]
                          for c, group in zip(captions, arrays)])
    columns["oracle (judge's pick)"] = right.argmax(dim=1)
    tables = {name: judge(captions, list(images[torch.arange(args.n), pick])) for name, pick in columns.items()}
    attributes = list(tables["first"])
    print(f"{args.n} held-out captions (seed {args.seed}), {args.of} candidates each at cond_scale "
          f"{options.cond_scale}, top-k {options.top_k}, on {device}: generation {gen_s:.0f} s")
    print("| attribute | " + " | ".join(tables) + " |")
    print("|---|" + "---:|" * len(tables))
    for a in attributes:
        print(f"| {a} | " + " | ".join(f"{t[a]['accuracy'] * 100:.1f}%" for t in tables.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "device": device, "generation_s": gen_s,
                                               "tables": tables}, indent=2))


if __name__ == "__main__":
    main()
