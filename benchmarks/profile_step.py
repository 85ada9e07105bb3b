"""Look inside one decoding step on CUDA: kernels launched, GPU time per replayed step, and whether the compiled
step gives the same tokens as the eager one.

    python benchmarks/profile_step.py --shape community --images 1 8 [--compile]

Prints one line per setting: kernels per step (eager, and compiled with --compile), microseconds of GPU time per
graph-replayed step, and seconds per whole generation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import build, prompt  # noqa: E402

from dalle_app.engine import SamplingOptions, generate_image_tokens  # noqa: E402
from dalle_app.engine.stepper import Stepper  # noqa: E402


@torch.no_grad()
def kernels_per_step(stepper: Stepper, rows: int, pos: int, table: bool = False) -> int:
    """CUDA kernels launched by one un-captured step (with `table`, also print the kernels by GPU time)."""
    device = stepper.seeds.device
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    position = torch.tensor([pos], device=device)
    stepper._run_step(ids, position)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stepper._run_step(ids, position)
        torch.cuda.synchronize()
    if table:
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25), flush=True)
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def replay_microseconds(stepper: Stepper, repeats: int = 200) -> float:
    """GPU time of one replayed step, from CUDA events around `repeats` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stepper.graph.replay()
    start.record()
    for _ in range(repeats):
        stepper.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="community")
    ap.add_argument("--images", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--cond-scale", type=float, default=3.0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the step's kernels by GPU time")
    args = ap.parse_args()
    device = torch.device("cuda")
    dalle = build(args.shape, device, torch.bfloat16)
    options = SamplingOptions(top_k=None, filter_thres=0.9, cond_scale=args.cond_scale).validate()
    guided = args.cond_scale != 1
    modes = [False, True] if args.compile else [False]
    for images in args.images:
        text = prompt(dalle, images)
        seqs = images * (2 if guided else 1)
        tokens = {}
        for compile_step in modes:
            cache = dalle.new_cache(seqs)
            seeds = torch.arange(images, device=device)
            t = time.perf_counter()
            with torch.no_grad():
                stepper = Stepper(dalle, cache, seeds, options, guided, use_graph=True, compile=compile_step)
            setup = time.perf_counter() - t
            kernels = kernels_per_step(stepper, images, dalle.text_seq_len + 1 + dalle.image_seq_len // 2,
                                       table=args.table)
            micro = replay_microseconds(stepper)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                result = generate_image_tokens(dalle, text, options, seeds=list(range(images)),
                                               compile_step=compile_step)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            tokens[compile_step] = result.image_ids
            print(f"{args.shape} images={images} cs={args.cond_scale:g} compile={compile_step}: "
                  f"{kernels} kernels/step, {micro:.0f} us GPU per replayed step, "
                  f"generation {' '.join(f'{t:.3f}' for t in times)} s (capture{' and compile' if compile_step else ''} "
                  f"{setup:.1f} s)", flush=True)
        if len(tokens) == 2:
            same = (tokens[False] == tokens[True]).float().mean().item()
            print(f"  compiled tokens equal to eager: {same:.1%}", flush=True)


if __name__ == "__main__":
    main()
