"""The Triton decoding step (`dalle_app/engine/gpu_step.py`) on a GPU: same tokens as the PyTorch step, and its time.

    python benchmarks/check_gpu_step.py                      # community shape, 1 and 8 guided images
    python benchmarks/check_gpu_step.py --shape readme --images 8

Random weights (`build` of benchmarks/generate.py). For each way of running a step (`pytorch`: the PyTorch step
captured in a CUDA graph; `triton`: the GpuStep captured in a CUDA graph, the engine's default; `compile`: the PyTorch
step through torch.compile, then captured): the kernels launched by one step, the time of one replayed step at the
first, middle and last image token, the whole generation's time per token, and its tokens against the PyTorch
step's. bfloat16 tokens part ways after an ulp-level flip, as with any change of kernels; the float32 rows (the
PyTorch step against the GpuStep, whose products then run in IEEE float32) show whether the two compute the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_decode_kernels import agreement, generation, load_build, step_times_us  # noqa: E402
from dalle_app.engine import SamplingOptions, gpu_step  # noqa: E402

MODES = {"pytorch": (False, False), "triton": (True, False), "compile": (False, True)}  # (GpuStep on, compile)


def triton_step_ran(label: str) -> bool:
    """False (and why, printed) when the engine fell back to the PyTorch step because a Triton kernel failed to
    build: the row just timed is then not the Triton step's. Re-enables the step for the next row."""
    if gpu_step.disabled_reason is None:
        return True
    print(f"| {label} | Triton step failed, PyTorch step timed instead: {gpu_step.disabled_reason} |", flush=True)
    gpu_step.disabled_reason = None
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="community")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cond-scale", type=float, default=3.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 token comparison")
    parser.add_argument("--sweep", action="store_true", help="only time one step for a few launch configurations")
    parser.add_argument("--phases", action="store_true", help="only split a request's time into its parts")
    args = parser.parse_args()
    if not torch.cuda.is_available() or gpu_step.triton is None:
        print("this check needs a CUDA device and Triton (tests/test_gpu_step.py covers Triton's CPU interpreter)")
        return
    import triton

    dev = torch.device("cuda")
    build, prompt = load_build()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.shape} shape, cond_scale {args.cond_scale}", flush=True)
    dalle = build(args.shape, dev, torch.bfloat16)
    options = SamplingOptions(top_k=None, filter_thres=0.9, cond_scale=args.cond_scale)
    if args.sweep:
        sweep(dalle, args.images, options, args.replays)
        return
    if args.phases:
        for images in args.images:
            phases(dalle, prompt(dalle, images).to(dev), options)
        return
    print("\n| images | step | kernels/step | us/step first, middle, last image token | ms/token (generation) "
          "| seconds per request | tokens vs pytorch |")
    print("|---:|---|---:|---|---:|---:|---|")
    for images in args.images:
        text = prompt(dalle, images).to(dev)
        reference = None
        for mode in args.modes:
            on, compile_step = MODES[mode]
            gpu_step.ENABLED = on
            t0 = time.perf_counter()
            tokens, per_token = generation(dalle, text, options, compile_step)
            times, kernels = step_times_us(dalle, images, options, compile_step, args.replays)
            if on and not triton_step_ran(f"{images} images"):
                continue
            print(f"| {images} | {mode} | {kernels} | {', '.join(f'{t:.0f}' for t in times)} | {per_token * 1000:.3f} "
                  f"| {per_token * dalle.image_seq_len:.3f} | {agreement(tokens, reference)} |"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if mode == "pytorch":
                reference = tokens
    if not args.no_float32:
        dalle32 = build(args.shape, dev, torch.float32)
        text = prompt(dalle32, args.images[0]).to(dev)
        runs = {}
        for on in (False, True):
            gpu_step.ENABLED = on
            runs[on] = generation(dalle32, text, options, False, repeats=1)[0]
        if triton_step_ran("float32"):
            print(f"\nfloat32, {args.images[0]} image(s): GpuStep tokens {agreement(runs[True], runs[False])} "
                  "to the PyTorch step's")
    gpu_step.ENABLED = True


def time_settings(dalle, images, options, replays, **settings) -> None:
    """One table row: us per replayed GpuStep step with the given module settings (BLOCK_K=..., NUM_WARPS=...,
    ATTENTION_SPLITS=...), restored afterwards."""
    defaults = {name: getattr(gpu_step, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(gpu_step, name, value)
        gpu_step.ENABLED = True
        times, _ = step_times_us(dalle, images, options, False, replays)
        cells = " | ".join(str(v) for v in settings.values())
        if triton_step_ran(f"{images} images, {cells}"):
            print(f"| {images} | {cells} | {', '.join(f'{t:.0f}' for t in times)} |", flush=True)
    finally:
        for name, value in defaults.items():
            setattr(gpu_step, name, value)
        gpu_step.ENABLED = True


def sweep(dalle, image_counts, options, replays) -> None:
    """us per replayed GpuStep step for reduction blocks and warps per program, and for attention split over 1-8
    programs per row and head, then the GPU time of each kernel of one step (profiled outside the graph)."""
    print("\n| images | reduction block | warps | us/step first, middle, last |\n|---:|---:|---:|---|")
    for images in image_counts:
        for block_k in (256, 1024):
            for warps in (4, 8):
                time_settings(dalle, images, options, replays, BLOCK_K=block_k, NUM_WARPS=warps)
    print("\n| images | attention splits | programmatic dependent launch | us/step first, middle, last |\n"
          "|---:|---:|---|---|")
    for images in image_counts:
        for splits in (1, 2, 4, 8):
            for pdl in (False, True):
                time_settings(dalle, images, options, replays, ATTENTION_SPLITS=splits, PDL=pdl)
    from torch.profiler import ProfilerActivity, profile

    from dalle_app.engine.stepper import Stepper

    guided = options.cond_scale != 1
    rows = image_counts[0] * (2 if guided else 1)
    stepper = Stepper(dalle, dalle.new_cache(rows), torch.arange(image_counts[0], device="cuda"), options,
                                guided, use_graph=True)
    ids = torch.zeros(rows // (2 if guided else 1), 1, dtype=torch.long, device="cuda")
    stepper.static_pos.fill_(dalle.text_seq_len + 1 + dalle.image_seq_len // 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            stepper._run_step(ids, stepper.static_pos)
        torch.cuda.synchronize()
    print(f"\n{image_counts[0]} image(s), 10 steps outside the graph:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))

def phases(dalle, text, options, repeats: int = 3) -> None:
    """Where one request's time goes: the cache allocation, building the stepper (for a CUDA graph: two warm-up
    steps and the capture), the prefill (run, then captured for the next request), and the rest (the token loop),
    each ended by a device synchronisation, so the parts add up to slightly more than a request. Medians of
    `repeats` after a warm-up, for a request that builds its stepper (the pool emptied first) and one that takes the
    last request's from the pool."""
    from dalle_app.engine import generate_image_tokens, stepper

    parts: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
            return result
        return wrapper

    stepper_init, prefill = stepper.Stepper.__init__, stepper.Stepper.prefill
    runs: dict[str, list[dict]] = {"fresh": [], "pooled": []}
    tokens = {}
    try:
        dalle.new_cache = timed("cache", dalle.new_cache)
        stepper.Stepper.__init__ = timed("stepper (capture)", stepper_init)
        stepper.Stepper.prefill = timed("prefill (captured once the stepper is kept)", prefill)
        for _ in range(repeats + 1):
            for kind in runs:
                if kind == "fresh":
                    stepper.POOL.clear()
                parts.clear()
                torch.cuda.synchronize()
                t = time.perf_counter()
                tokens[kind] = generate_image_tokens(dalle, text, options, seeds=list(range(text.shape[0]))).image_ids
                torch.cuda.synchronize()
                total = time.perf_counter() - t
                run = dict(parts)
                run["token loop and the rest"] = total - sum(parts.values())
                run["request"] = total
                runs[kind].append(run)
    finally:
        del dalle.new_cache
        stepper.Stepper.__init__, stepper.Stepper.prefill = stepper_init, prefill
    names = list(runs["fresh"][-1])
    print(f"\n{text.shape[0]} image(s), ms (median of {repeats} after a warm-up)\n\n| part | stepper built | "
          "stepper from the pool |\n|---|---:|---:|")
    for name in names:
        cells = [statistics.median(r.get(name, 0.0) for r in runs[kind][1:]) * 1000 for kind in runs]
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} |")
    # the same tokens from a kept stepper (and its captured prefill) as from a new one, also with priming
    same = [torch.equal(tokens["fresh"], tokens["pooled"])]
    prime = torch.randint(0, dalle.num_image_tokens, (text.shape[0], 40), device=text.device)
    primed = []
    for _ in range(3):  # built, then kept: prefill run then captured, then replayed
        primed.append(generate_image_tokens(dalle, text, options, seeds=list(range(text.shape[0])),
                                            prime_ids=prime).image_ids)
    stepper.POOL.clear()
    unprimed_fresh = generate_image_tokens(dalle, text, options, seeds=list(range(text.shape[0]))).image_ids
    same += [torch.equal(primed[0], p) for p in primed[1:]] + [torch.equal(unprimed_fresh, tokens["fresh"])]
    print(f"tokens of kept steppers equal a new one's (plain, primed x2, new again): {same}; primed tokens kept: "
          f"{torch.equal(primed[-1][:, :40], prime)}")


if __name__ == "__main__":
    main()
