"""Train several DiscreteVAE variants side by side in one time budget, judge each, and name the best.

    python -m dalle_app.training.vae_sweep --folder runs/sweep --minutes 7 --recipe v4 \\
        --variant base='{}' --variant wide='{"vae": {"hidden_dim": 192}}'

Each variant is a recipe (``--recipe``) with overrides given as a JSON object of TrainConfig fields; it trains in
its own process (`python -m dalle_app.training ... --stop-at-phase dalle`) for ``--minutes``, its step count fitted
to that time. Then the judge reads VAE reconstructions of 200 held-out renders (the upper bound that the VAE sets
for the whole model, see `python -m dalle_app.evaluate --vae-judge`). Under --folder:

    <name>/state/     the variant's checkpoint, now at the start of the DALLE phase
    <name>/weights/   its models alone: `python -m dalle_app.training.candidate --resume-weights` continues from
                      a copy of this folder (as <candidate folder>/weights)
    summary.json      per variant: overrides, steps, PSNR, the judge's table; and "best"

The best variant has the highest mean of the shape and both-objects bounds among those that keep the count of
objects right on at least 95% of scenes (a VAE that paints extra blobs would otherwise win on shape alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .config import RECIPES

MIN_COUNT_BOUND = 0.95


def overrides_of(variant: dict) -> list[str]:
    """TrainConfig overrides ("name=JSON") for a variant given as {field: value}."""
    return [f"{name}={json.dumps(value)}" for name, value in variant.items()]


def pick_best(results: dict[str, dict]) -> str | None:
    """Name of the variant with the best mean shape/both bound whose count bound is at least MIN_COUNT_BOUND (the
    best PSNR if none is); None when no variant finished."""
    finished = {n: r for n, r in results.items() if "bound" in r}
    if not finished:
        return None
    clean = {n: r for n, r in finished.items() if r["bound"]["count"] >= MIN_COUNT_BOUND}
    if clean:
        return max(clean, key=lambda n: (clean[n]["bound"]["shape"] + clean[n]["bound"]["both"]) / 2)
    return max(finished, key=lambda n: finished[n]["psnr"])


def judge_variant(folder: Path, recipe: str, n: int) -> dict:
    """PSNR and the judge's table on VAE reconstructions of `n` held-out renders, from a variant's checkpoint."""
    from ..evaluate import judge, vae_psnr, vae_reconstructions_of_heldout
    from .train import Trainer

    trainer = Trainer(RECIPES[recipe](), folder / "state", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    vae = trainer.vae.eval()
    captions, renders, recon = vae_reconstructions_of_heldout(vae, n)
    table = judge(captions, recon, workers=4)
    param = next(vae.parameters())
    codes = int(vae.get_codebook_indices(torch.stack(renders).to(param.device, param.dtype)).unique().numel())
    return {"phase": trainer.phase, "vae_steps": trainer.cfg.vae_steps, "train_seconds": trainer.seconds,
            "psnr": vae_psnr(vae), "codes_used": codes,
            "bound": {k: round(v["accuracy"], 4) for k, v in table.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle_app.training.vae_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--minutes", type=float, required=True, help="training time of each variant (side by side)")
    parser.add_argument("--recipe", default="v4", choices=sorted(RECIPES))
    parser.add_argument("--variant", action="append", required=True, metavar='NAME=JSON',
                        help='a name and its overrides, e.g. wide=\'{"vae": {"hidden_dim": 192}}\'')
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes per variant")
    parser.add_argument("--judge-n", type=int, default=200)
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    variants = {}
    for item in args.variant:
        name, sep, raw = item.partition("=")
        if not sep or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"Cannot read --variant {item!r}: write NAME='{{json}}' with a plain name.")
        variants[name] = json.loads(raw or "{}")

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    procs = {}
    for name, variant in variants.items():
        sets = [*overrides_of(variant), f"vae_budget_minutes={args.minutes}", f"num_workers={args.workers}"]
        cmd = [sys.executable, "-m", "dalle_app.training", "--recipe", args.recipe, "--out", str(folder / name / "unused"),
               "--resume", str(folder / name / "state"), "--stop-at-phase", "dalle",
               "--minutes", str(args.minutes + 1.5), "--weights-copy", str(folder / name / "weights"), "--set", *sets]
        (folder / name).mkdir(parents=True, exist_ok=True)
        log = open(folder / name / "train.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    results = {}
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        results[name] = {"overrides": variants[name], "returncode": rc}
        if rc == 0:
            results[name].update(judge_variant(folder / name, args.recipe, args.judge_n))
    best = pick_best(results)
    summary = {"recipe": args.recipe, "minutes": args.minutes, "variants": results, "best": best}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, r in results.items():
        bound = r.get("bound", {})
        print(f"{name:>10}: rc {r['returncode']}, steps {r.get('vae_steps')}, PSNR {r.get('psnr', float('nan')):.2f} dB, "
              f"shape {bound.get('shape')}, both {bound.get('both')}, count {bound.get('count')}, "
              f"colour {bound.get('color')}")
    print(f"best: {best}")


if __name__ == "__main__":
    main()
