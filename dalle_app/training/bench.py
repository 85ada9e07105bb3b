"""Training speed of the recipe on this machine, to size its step counts to a time budget.

    python -m dalle_app.training.bench [--recipe v2] [--seconds 15] [--json bench.json] [--set NAME=VALUE ...]

Measures, each for about --seconds: the data loader alone (rendered images per second with the recipe's
workers), VAE training steps per second, and DALLE (+ CLIP) training steps per second on real batches, with a
throw-away model in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from .config import RECIPES, TrainConfig
from .train import Trainer


def _rate(steps, seconds: float, warmup: int = 3) -> float:
    """Steps per second of the generator `steps` over about `seconds`, after `warmup` untimed steps."""
    it = iter(steps)
    for _ in range(warmup):
        next(it)
    n, t = 0, time.time()
    while time.time() - t < seconds:
        next(it)
        n += 1
    return n / (time.time() - t)


def measure(cfg: TrainConfig, device: torch.device, seconds: float = 15.0) -> dict:
    """{"loader_images_per_s", "vae_steps_per_s", "dalle_steps_per_s"} for recipe `cfg` on `device`."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, device)
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "num_workers": cfg.num_workers}
        batches = trainer._loader(cfg.dalle_batch)
        out["loader_images_per_s"] = _rate(batches, seconds) * cfg.dalle_batch
        vae_batches = trainer._loader(cfg.vae_batch)
        trainer.vae.requires_grad_(True)
        out["vae_steps_per_s"] = _rate((trainer._vae_step(x) for x, _ in vae_batches), seconds)
        trainer.phase = "dalle"
        trainer.vae.requires_grad_(False)
        out["dalle_steps_per_s"] = _rate((trainer._dalle_step(x, t) for x, t in batches), seconds)
        out["dalle_with_clip"] = trainer.clip is not None
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--recipe", default="v5", choices=sorted(RECIPES))
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = RECIPES[args.recipe]()
    cfg.override(args.set)
    result = measure(cfg, device, args.seconds)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
