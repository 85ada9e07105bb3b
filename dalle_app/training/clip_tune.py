"""Fine-tune a model's CLIP reranker with hard negatives, so that reranking picks the right shape, not just colour.

    python -m dalle_app.training.clip_tune --model weights/shapes-dalle --minutes 15     # tunes that folder's CLIP
    python -m dalle_app.training.clip_tune --model weights/shapes-dalle --probe-only     # measure, change nothing

A CLIP trained with in-batch negatives only learns what tells random captions apart, which is mostly colour: the
built-in v8 CLIP preferred a true caption over the same caption with one shape word changed only 62% of the time
(97% for a changed colour), so best-of-8 reranking could not raise shape accuracy. Here every image in a batch also
meets its `contradicting_captions` (the caption with one shape, colour, size or side word changed, or one of two
objects left out) as extra negatives. The images are fresh renders in the VAE's input space (reconstructions at
~39 dB PSNR look the same to a CLIP, and rendering costs nothing on a CPU while decoding costs 70 ms an image);
`probe` measures on VAE reconstructions, which is what reranking sees.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..world import CONTRADICTIONS, caption, contradicting_captions, heldout_scenes, image_to_tensor, render, sample_scene


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding columns at the end of a (b, T) batch of token ids (0 = padding): same encoding, less work."""
    used = int((ids != 0).any(0).nonzero().max()) + 1 if (ids != 0).any() else 1
    return ids[:, :used]


def encode_texts(clip, tokenizer, texts: list[str], text_seq_len: int) -> torch.Tensor:
    """CLIP text latents (len(texts), d) of captions."""
    device = clip.temperature.device
    ids = trim_padding(tokenizer.tokenize(texts, text_seq_len, truncate_text=True)).to(device)
    return clip.encode_text(ids, ids != 0)


def render_images(scenes, rng: random.Random, size: int) -> torch.Tensor:
    """Renders of `scenes` as a (b, 3, size, size) batch in [0, 1] (area-resized from the world's 128 px)."""
    images = torch.stack([image_to_tensor(render(scene, rng)) for scene in scenes])
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="area")


def batch_of_scenes(rng: random.Random, size: int, image_size: int):
    """`size` fresh scenes: (images (size, 3, image_size, image_size) in [0, 1], captions, [{kind: contradicting
    caption}] per scene)."""
    scenes = [sample_scene(rng) for _ in range(size)]
    images = render_images(scenes, rng, image_size)
    texts = [caption(scene, rng) for scene in scenes]
    return images, texts, [contradicting_captions(s, t, rng) for s, t in zip(scenes, texts)]


def hard_negative_loss(clip, tokenizer, vae, batch, text_seq_len: int) -> torch.Tensor:
    """Symmetric contrastive loss where each image is also told apart from every contradicting caption.

    batch: what `batch_of_scenes` gives. image -> text: cross-entropy over the batch's true captions and all its
    contradicting ones; text -> image: over the images. Without contradicting captions this is CLIP's own loss.
    """
    images, texts, contradictions = batch
    device = clip.temperature.device
    visual = clip.encode_image(vae.norm(images.to(device)))
    true = encode_texts(clip, tokenizer, texts, text_seq_len)
    scale = clip.temperature.exp()
    sim_true = visual @ true.t() * scale  # (B, B)
    negatives = [t for wrong in contradictions for t in wrong.values()]
    if negatives:
        sim_negative = visual @ encode_texts(clip, tokenizer, negatives, text_seq_len).t() * scale  # (B, M)
        sim_images_to_texts = torch.cat([sim_true, sim_negative], dim=1)
    else:
        sim_images_to_texts = sim_true
    labels = torch.arange(len(texts), device=device)
    return (F.cross_entropy(sim_images_to_texts, labels) + F.cross_entropy(sim_true.t(), labels)) / 2


@torch.no_grad()
def probe(clip, tokenizer, vae, text_seq_len: int, n: int = 400, seed: int = 3, batch: int = 100,
          reconstruct: bool = True) -> dict:
    """How often the CLIP scores a held-out scene's true caption above each kind of contradicting caption, on VAE
    reconstructions of its render (or on the render itself, `reconstruct=False`): {kind: (fraction, count)} for
    kind in CONTRADICTIONS (0.5 = blind to it)."""
    was_training = clip.training
    clip.eval()
    device = clip.temperature.device
    rng = random.Random(f"clip-probe/{seed}")
    wins = {kind: [] for kind in CONTRADICTIONS}
    pairs = heldout_scenes(n, seed=seed)
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        vae_dtype = next(vae.parameters()).dtype
        images = render_images([scene for scene, _ in chunk], rng, vae.image_size).to(device, vae_dtype)
        decoded = vae.decode(vae.get_codebook_indices(images)).float().clamp(-1, 1) if reconstruct else vae.norm(images)
        if decoded.shape[-1] != clip.image_size:
            decoded = F.interpolate(decoded, size=(clip.image_size, clip.image_size), mode="area")
        visual = clip.encode_image(decoded.to(clip.temperature.dtype))
        true = (encode_texts(clip, tokenizer, [t for _, t in chunk], text_seq_len) * visual).sum(-1)
        # (image index, kind, contradicting caption) for the whole chunk, encoded in one call
        wrong = [(j, kind, t) for j, (scene, text) in enumerate(chunk)
                 for kind, t in contradicting_captions(scene, text, rng).items()]
        index = torch.tensor([j for j, _, _ in wrong], device=device)
        scores = (encode_texts(clip, tokenizer, [t for _, _, t in wrong], text_seq_len) * visual[index]).sum(-1)
        for (j, kind, _), score in zip(wrong, scores):
            wins[kind].append(bool(true[j] > score))
    clip.train(was_training)
    return {kind: (sum(w) / len(w), len(w)) for kind, w in wins.items() if w}


def format_probe(result: dict) -> str:
    """One line: the probe's fraction per kind."""
    return ", ".join(f"{kind} {frac:.1%} (n={count})" for kind, (frac, count) in result.items())


def tune_clip(clip, tokenizer, vae, text_seq_len: int, *, seconds: float | None = None, steps: int = 1000,
              batch_size: int = 128, lr: float = 5e-4, temperature_lr: float = 1e-2, warmup: int = 50,
              start_logit_scale: float | None = 1 / 0.07, seed: int = 0, progress: bool = True) -> dict:
    """Train `clip` in place with `hard_negative_loss` for `steps` (or until `seconds` have passed, whichever is
    first), AdamW with warm-up and cosine decay (the logit scale at `temperature_lr`, raised first to
    `start_logit_scale` where it is lower: OpenAI CLIP's initial 1/0.07); returns {"steps", "seconds", "losses",
    "logit_scale"}."""
    vae.eval()
    if start_logit_scale is not None:
        with torch.no_grad():  # reranking takes an argmax, so the scale changes no ranking, only how training learns
            clip.temperature.clamp_(min=math.log(start_logit_scale))
    clip.train()
    clip.requires_grad_(True)  # a loaded model comes frozen
    # the logit scale gets a learning rate of its own: at the network's rate it barely moves (the v8 CLIP ended at
    # e^1.24 = 3.4 after 1,600 steps), and with logits that flat in [-3.4, 3.4] the loss cannot reward a sharp margin
    rest = [p for p in clip.parameters() if p is not clip.temperature]
    optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.01, "peak": lr},
                                   {"params": [clip.temperature], "weight_decay": 0.0, "peak": temperature_lr}])
    rng = random.Random(f"clip-tune/{seed}")
    losses, start = [], time.time()
    bar = tqdm(range(steps), desc="clip", disable=not progress)
    for step in bar:
        if seconds is not None and time.time() - start > seconds:
            break
        for group in optimizer.param_groups:
            t = min(1.0, step / max(1, steps - warmup))
            group["lr"] = group["peak"] * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t))
        batch = batch_of_scenes(rng, batch_size, clip.image_size)
        loss = hard_negative_loss(clip, tokenizer, vae, batch, text_seq_len)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            continue  # skip a bad batch rather than poison the weights
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            clip.temperature.clamp_(max=math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    clip.eval()
    clip.requires_grad_(False)
    return {"steps": len(losses), "seconds": round(time.time() - start, 1), "losses": losses,
            "logit_scale": float(clip.temperature.exp())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.clip_tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a project-format model folder with a CLIP")
    parser.add_argument("--out", default=None, help="write the tuned CLIP here (default: into --model)")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=1000, help="the schedule's length (stops early at --minutes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=None,
                        help="the training scenes' stream (default: the number of earlier tuning runs recorded in "
                             "the model's config, so that another run sees new scenes)")
    parser.add_argument("--probe-n", type=int, default=400)
    parser.add_argument("--probe-only", action="store_true", help="measure the CLIP, train nothing")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from ..manager import ModelManager
    from ..manager.pretrained import replace_clip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ModelManager(device=device, dtype="float32").load(args.model, device=device)
    if model.clip is None:
        raise SystemExit(f"{args.model} has no CLIP to tune.")
    seq = model.dalle.text_seq_len
    before = probe(model.clip, model.tokenizer, model.vae, seq, n=args.probe_n)
    print("before:", format_probe(before))
    if args.probe_only:
        return
    stored = json.loads((Path(args.model) / "config.json").read_text()).get("source") or {}
    rounds = stored.get("clip_hard_negative_tuning") or []
    rounds = [rounds] if isinstance(rounds, dict) else list(rounds)  # one entry per tuning run, oldest first
    seed = len(rounds) if args.seed is None else args.seed
    with torch.enable_grad():
        run = tune_clip(model.clip, model.tokenizer, model.vae, seq, seconds=args.minutes * 60, steps=args.steps,
                        batch_size=args.batch, lr=args.lr, seed=seed)
    after = probe(model.clip, model.tokenizer, model.vae, seq, n=args.probe_n)
    print("after: ", format_probe(after))
    record = {"steps": run["steps"], "batch": args.batch, "lr": args.lr, "seed": seed, "seconds": run["seconds"],
              "device": str(device), "logit_scale": round(run["logit_scale"], 2), "probe_before": before,
              "probe_after": after,
              "final_loss": sum(run["losses"][-20:]) / max(1, len(run["losses"][-20:]))}
    folder = replace_clip(args.model, args.out or args.model, model.clip, {"clip_hard_negative_tuning": rounds + [record]})
    print(f"wrote {folder}: {run['steps']} steps in {run['seconds']} s")


if __name__ == "__main__":
    main()
