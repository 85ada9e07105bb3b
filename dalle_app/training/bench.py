"""Training speed of the recipe on this machine, to size its step counts to a time budget.

    python -m dalle_app.training.bench [--recipe v2] [--seconds 15] [--json bench.json] [--set NAME=VALUE ...]

Measures, each for about --seconds: the data loader alone (rendered images per second with the recipe's
workers), VAE training steps per second, and DALLE training steps per second on real batches, with CLIP (as in its
first clip_steps steps) and without (`--profile N` prints the kernels of N steps), with a
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


def _rate(steps, seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Steps per second of the generator `steps` over about `seconds`, after `warmup` untimed steps (which include
    any compilation); the device is synchronised at both ends, since steps return before their kernels finish."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = iter(steps)
    for _ in range(warmup):
        next(it)
    sync()
    n, t = 0, time.time()
    while time.time() - t < seconds:
        next(it)
        n += 1
    sync()
    return n / (time.time() - t)


def measure(cfg: TrainConfig, device: torch.device, seconds: float = 15.0, profile_steps: int = 0) -> dict:
    """{"loader_images_per_s", "vae_steps_per_s", "dalle_steps_per_s" (with CLIP training on the same batches, as
    in the first clip_steps steps), "dalle_only_steps_per_s"} for recipe `cfg` on `device`; with profile_steps,
    also prints the profiler's table of the kernels of that many DALLE + CLIP steps."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, device)
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "num_workers": cfg.num_workers, "dalle_compile": cfg.dalle_compile}
        batches = trainer._loader(cfg.dalle_batch)
        out["loader_images_per_s"] = _rate(batches, seconds, device) * cfg.dalle_batch
        vae_batches = trainer._loader(cfg.vae_batch)
        trainer.vae.requires_grad_(True)
        out["vae_steps_per_s"] = _rate((trainer._vae_step(x) for x, _ in vae_batches), seconds, device)
        trainer.phase = "dalle"
        trainer.vae.requires_grad_(False)
        dalle_steps = (trainer._dalle_step(x, t) for x, t in batches)
        out["dalle_with_clip"] = trainer.clip is not None
        out["dalle_steps_per_s"] = _rate(dalle_steps, seconds, device)
        if profile_steps:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(profile_steps):
                    next(dalle_steps)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=30))
        trainer.clip_step = cfg.clip_steps  # CLIP done: the DALLE alone
        out["dalle_only_steps_per_s"] = _rate(dalle_steps, seconds, device)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--recipe", default="v8", choices=sorted(RECIPES))
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="print a profile of STEPS DALLE steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = RECIPES[args.recipe]()
    cfg.override(args.set)
    result = measure(cfg, device, args.seconds, args.profile)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
