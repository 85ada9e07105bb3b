"""`python -m dalle_app.training --out weights/shapes-dalle [--quick] [--resume DIR] [--minutes M]`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .config import RECIPES
from .train import Trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training", description=__doc__)
    parser.add_argument("--out", required=True, help="project-format folder written when training is done")
    parser.add_argument("--quick", action="store_true", help="tiny recipe, under a minute on a CPU (= --recipe quick)")
    parser.add_argument("--recipe", default="v8", choices=sorted(RECIPES),
                        help="v8: the shipped weights' recipe (default); v5: the weights shipped before; v1-v4, v6, v7: tried "
                             "and not shipped (see the model card); a resumed run keeps its own")
    parser.add_argument("--resume", default=None, help="checkpoint folder to continue from and save to "
                        "(default: runs/<name of --out>)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget for this call")
    parser.add_argument("--shard-mib", type=float, default=None, help="save the checkpoint in shards of this size")
    parser.add_argument("--device", default=None)
    parser.add_argument("--restart-clip", action="store_true", help="train CLIP again from scratch")
    parser.add_argument("--weights-copy", default=None, help="also save models only (no optimizers) here")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="override recipe fields (JSON values), e.g. --set dalle_steps=20000 num_workers=14")
    parser.add_argument("--stop-at-phase", default=None, choices=["dalle", "clip"],
                        help="stop (and save) when this phase would begin, e.g. after the VAE")
    parser.add_argument("--export-anyway", action="store_true", help="export even if training is not finished")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
    cfg = RECIPES["quick" if args.quick else args.recipe]()
    state_dir = Path(args.resume or Path("runs") / Path(args.out).name)
    trainer = Trainer(cfg, state_dir, device, shard_mib=args.shard_mib, overrides=args.set)
    if args.restart_clip:
        trainer.restart_clip()
    t = time.time()
    done = trainer.run(args.minutes * 60 if args.minutes else float("inf"), stop_at_phase=args.stop_at_phase)
    print(f"this call trained {time.time() - t:.0f} s; total {trainer.seconds / 60:.1f} min; "
          f"phase {trainer.phase} step {trainer.step}")
    trainer.plot(state_dir / "loss_curves.png")
    summary = {"done": done, "throughput": trainer.throughput, "phase": trainer.phase, "step": trainer.step, "train_seconds": trainer.seconds,
               "last": {k: v[-1][1] for k, v in trainer.history.items() if v}}
    if trainer.phase != "vae":
        summary["vae_psnr_fresh"] = trainer.vae_psnr(256 if not args.quick else 32)
    (state_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    if args.weights_copy:
        trainer.save_weights(args.weights_copy)
    if done or args.export_anyway:
        folder = trainer.export(args.out)
        (Path(folder) / "loss_curves.png").write_bytes((state_dir / "loss_curves.png").read_bytes())
        print(f"exported to {folder}")


if __name__ == "__main__":
    main()
