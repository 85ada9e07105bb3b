"""Train, export, evaluate and pack a candidate built-in model in one wall-clock budget, unattended.

    python -m dalle_app.training.candidate --recipe v8 --minutes 30 --folder runs/v8 [--set NAME=VALUE ...]

Made for a rented GPU whose calls last at most ten minutes: start it in the background (`setsid nohup ... &`) and
collect the files in later calls. Everything lands under --folder:

    state/      the resumable checkpoint (run the same command again to continue after an interruption)
    weights/    the models alone in float16, in shards of at most --shard-mib MiB, refreshed at every checkpoint:
                small enough to carry away if the machine is lost; `--folder` with `--resume-weights` continues
                from such a copy (fresh optimizers)
    model/      the exported project-format model (once training is done)
    eval_*.json   `python -m dalle_app.evaluate` on 500 held-out captions: default sampling, best of 8, guidance 1/2/3
    summary.json  speed, steps, PSNR, the fidelity tables, and the seconds each part took
    pack/       model/ and the JSON files as one tar in parts of at most --shard-mib MiB

Unpack elsewhere with `cat pack/candidate.tar.* | tar x`. The DALLE phase gets the budget left after the VAE, less
--reserve-minutes for exporting and evaluating: its step count is fitted to that time (see
TrainConfig.dalle_budget_minutes), never above the recipe's.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import torch

from .config import RECIPES
from .train import Trainer

# at the model's recommended sampling, then guidance 1 / 2 / 3 to check that recommendation
EVALUATIONS = {"eval_default.json": ["--rerank", "1", "--vae-judge", "200"], "eval_rerank8.json": ["--rerank", "8"],
               **{f"eval_g{g}.json": ["--rerank", "1", "--cond-scale", g] for g in ("1", "2", "3")}}


def pack(files: list[Path], base: Path, out_dir: Path, part_mib: float) -> list[Path]:
    """Write `files` (paths relative to `base` in the archive) as one tar split into parts of at most `part_mib`
    MiB: out_dir/candidate.tar.000, .001, ..."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(base)))
    data, size = buffer.getvalue(), int(part_mib * 2 ** 20)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    parts = []
    for i in range(0, len(data), size):
        parts.append(out_dir / f"candidate.tar.{i // size:03d}")
        parts[-1].write_bytes(data[i:i + size])
    return parts


def seed_from_model(model_dir: Path, folder: Path, recipe: str, at_step: int, overrides: list[str] = ()) -> None:
    """Write `folder`/weights as a DALLE-phase checkpoint at step `at_step` that holds the networks of the exported
    project-format model in `model_dir`, so that `--resume-weights` trains that model further (fresh optimizers,
    the learning rate warmed up again). CLIP counts as trained: it is carried over as it is."""
    from ..manager.pretrained import read_pretrained

    config, checkpoint, clip_weights = read_pretrained(model_dir)
    scratch = folder / "seed_scratch"  # an empty state folder: the Trainer must not resume from anything
    shutil.rmtree(scratch, ignore_errors=True)
    trainer = Trainer(RECIPES[recipe](), scratch, torch.device("cpu"), overrides=list(overrides))
    if at_step >= trainer.cfg.dalle_steps:
        raise ValueError(f"--at-step {at_step} is not below the recipe's {trainer.cfg.dalle_steps} DALLE steps; "
                         f"pick a recipe (or --set dalle_steps=N) that trains further.")
    trainer.dalle.load_state_dict(checkpoint.state_dict)  # the DALLE's keys and the VAE's (vae.*)
    if clip_weights is not None and trainer.clip is not None:
        trainer.clip.load_state_dict(clip_weights)
    trainer.phase, trainer.step, trainer.clip_step = "dalle", at_step, trainer.cfg.clip_steps
    trainer.seconds = float((config.get("source") or {}).get("train_seconds", 0))
    trainer.save_weights(folder / "weights")
    shutil.rmtree(scratch, ignore_errors=True)


def _train(args, folder: Path, device: torch.device, deadline: float) -> Trainer:
    overrides = list(args.set)
    state = folder / "state"
    if args.from_model and not (folder / "weights").exists():
        seed_from_model(Path(args.from_model), folder, args.recipe, args.at_step, overrides)
    if args.resume_weights and not state.exists():
        shutil.copytree(folder / "weights", state)  # models only: training continues with fresh optimizers
    trainer = Trainer(RECIPES[args.recipe](), state, device, shard_mib=args.shard_mib, overrides=overrides)

    def keep_a_copy():
        trainer.save_weights(folder / "weights")

    if trainer.phase == "vae":
        trainer.run(deadline - time.time(), stop_at_phase="dalle", on_save=keep_a_copy)
    if trainer.phase == "dalle" and trainer.step == 0:
        left = (deadline - time.time()) / 60 - args.reserve_minutes
        trainer.cfg.dalle_budget_minutes = max(1.0, left)
    trainer.run(deadline - time.time() - args.reserve_minutes * 60 * 0.5, on_save=keep_a_copy)
    return trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.candidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="v8", choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget for everything")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--reserve-minutes", type=float, default=3.0, help="kept for export and evaluation")
    parser.add_argument("--shard-mib", type=float, default=15.0)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--resume-weights", action="store_true", help="continue from weights/ (fresh optimizers)")
    parser.add_argument("--from-model", default=None, metavar="DIR",
                        help="train an exported model further: its networks seed weights/ (implies --resume-weights)")
    parser.add_argument("--at-step", type=int, default=None, help="with --from-model: the DALLE step it stopped at")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="recipe overrides")
    args = parser.parse_args(argv)
    if args.from_model:
        if args.at_step is None:
            parser.error("--from-model needs --at-step, the DALLE step at which that model's training stopped.")
        args.resume_weights = True

    # what the export and the evaluation import, imported now: a missing package (say, on a rented GPU) then stops
    # the run in its first second rather than after the whole training budget
    from ..evaluate import main as evaluate
    from ..manager import pretrained  # noqa: F401

    start = time.time()
    deadline = start + args.minutes * 60
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    trainer = _train(args, folder, device, deadline)
    summary = {"recipe": args.recipe, "config": trainer.cfg.to_dict(), "phase": trainer.phase,
               "train_seconds": trainer.seconds, "throughput": trainer.throughput,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    trainer.plot(folder / "state" / "loss_curves.png")
    if trainer.phase != "done":
        summary["note"] = "training did not finish within the budget: nothing exported; run again to continue"
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
        return

    model = trainer.export(folder / "model")
    shutil.copy(folder / "state" / "loss_curves.png", model / "loss_curves.png")
    summary["export_seconds_after_start"] = time.time() - start

    for name, extra in EVALUATIONS.items():
        t = time.time()
        evaluate(["--model", str(model), "--n", str(args.eval_n), "--device", str(device), "--json",
                  str(folder / name), *extra])
        result = json.loads((folder / name).read_text())
        summary[name] = {"seconds": time.time() - t, "vae_psnr": result["vae_psnr"],
                         "accuracy": {k: round(v["accuracy"], 4) for k, v in result["table"].items()}}
        if "vae_upper_bound" in result:
            summary[name]["vae_upper_bound"] = {k: round(v["accuracy"], 4)
                                                for k, v in result["vae_upper_bound"].items()}
    summary["seconds"] = time.time() - start
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    files = sorted(p for p in model.rglob("*") if p.is_file())
    files += [folder / n for n in (*EVALUATIONS, "summary.json")]
    parts = pack(files, folder, folder / "pack", args.shard_mib)
    print(json.dumps(summary))
    print(f"packed {len(parts)} parts into {folder / 'pack'}; unpack with: cat candidate.tar.* | tar x")


if __name__ == "__main__":
    main()
