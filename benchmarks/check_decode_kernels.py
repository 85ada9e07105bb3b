"""The fused decoding-attention kernel on a GPU: same tokens as the PyTorch path, and the time of a decoding step.

    python benchmarks/check_decode_kernels.py                      # community shape, 1 image, guided (2 rows)
    python benchmarks/check_decode_kernels.py --modes graph --images 8
    DALLE_APP_DECODE_KERNELS=1 python benchmarks/generate.py ...   # any other benchmark with the kernel (opt-in)

Random weights (`build` of benchmarks/generate.py). For each step mode (`graph`: the eager step captured in a CUDA
graph, as `generate_image_tokens` runs it by default; `compile`: torch.compile'd first, as with compile_step=True)
and the kernel off and on (`decode_kernels.ENABLED`): the tokens of one generation compared with the kernel-off
tokens, the kernels launched by one step (profiled outside the graph), the time of one replayed step at three
positions (first, middle and last image token) and the whole generation's time per token. Then the attention of
one layer alone, kernel against the PyTorch ops it replaces, each captured in a CUDA graph. bfloat16 tokens may
part ways after an ulp-level flip; the float32 row shows whether the paths agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dalle_app.engine import SamplingOptions, generate_image_tokens, stepper  # noqa: E402
from dalle_app.models import decode_kernels  # noqa: E402
from dalle_app.models.attention import Rotary, attend_static_cache, write_kv  # noqa: E402
from check_fused_sample import graph_time_us  # noqa: E402  (the same timing of a captured call)


def load_build():
    spec = importlib.util.spec_from_file_location("benchmark_generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build, module.prompt


def set_kernel(on: bool) -> None:
    """Flip the switch; compiled steps are dropped so that the next one is traced with the new setting."""
    decode_kernels.ENABLED = on
    stepper._COMPILED.clear()
    torch._dynamo.reset()


def count_kernels(stepper) -> int:
    """CUDA kernels launched by one step run outside the graph (memcpy/memset included)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.zeros(len(stepper.seeds), 1, dtype=torch.long, device=stepper.seeds.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stepper._run_step(ids, stepper.static_pos)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


@torch.no_grad()
def step_times_us(dalle, rows, options, compile_step, replays) -> tuple[list[float], int]:
    """Microseconds per replayed step at the first, middle and last image position, and the kernels of a step."""
    dev = next(dalle.parameters()).device
    guided = options.cond_scale != 1
    cache = dalle.new_cache(rows * (2 if guided else 1))
    seeds = torch.arange(rows, device=dev)
    step = stepper.Stepper(dalle, cache, seeds, options, guided, use_graph=True, compile=compile_step)
    text_len = dalle.text_seq_len + 1
    times = []
    for pos in (text_len, text_len + dalle.image_seq_len // 2, text_len + dalle.image_seq_len - 2):
        step.static_pos.fill_(pos)
        step.graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            step.graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return times, count_kernels(step)


@torch.no_grad()
def generation(dalle, text, options, compile_step, repeats=2):
    """(tokens, seconds per token) of generate_image_tokens, after one warm-up run."""
    kw = dict(seeds=list(range(text.shape[0])), compile_step=compile_step)
    tokens = generate_image_tokens(dalle, text, options, **kw).image_ids
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate_image_tokens(dalle, text, options, **kw)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return tokens.cpu(), statistics.median(seconds) / dalle.image_seq_len


def agreement(tokens, reference) -> str:
    if reference is None:
        return "(reference)"
    same = (tokens == reference).float().mean().item()
    differ = (tokens != reference).any(0).nonzero()
    first = f", first differs at {differ[0].item()}" if len(differ) else ""
    return f"{same:.1%} equal{first}"


@torch.no_grad()
def layer_attention(dalle, rows, pos, dtype) -> tuple[float, float, float]:
    """One layer's attention step alone: (max |kernel - PyTorch|, PyTorch us, kernel us) at position pos."""
    t = dalle.transformer
    dev = next(dalle.parameters()).device
    heads, dim_head, max_len = t.heads, t.dim_head, t.seq_len
    torch.manual_seed(1)
    qkv = torch.randn(rows, 1, 3 * heads * dim_head, device=dev, dtype=dtype)
    cache = torch.randn(2, rows, heads, max_len, dim_head, device=dev, dtype=dtype)
    start = torch.full((1,), pos, dtype=torch.long, device=dev)
    rotary = Rotary(*t.rotary_cos_sin[:, start])
    mask = t.layer_mask(0)[start].unsqueeze(0)

    def plain():
        x = rotary.apply(qkv.unflatten(-1, (3, heads, dim_head))).permute(2, 0, 3, 1, 4)
        k, v = write_kv(cache, x[1:], start)
        return attend_static_cache(x[0], k, v, mask).transpose(1, 2).flatten(2)

    def fused():
        return decode_kernels.decode_attention(qkv, cache, start, mask, rotary.cos, rotary.sin, heads, dim_head)

    error = (fused().float() - plain().float()).abs().max().item()
    return error, graph_time_us(plain), graph_time_us(fused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="community")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--cond-scale", type=float, default=3.0, help="!= 1: guided, two batch rows per image")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", nargs="+", default=["graph", "compile"], choices=["graph", "compile"])
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one (tests/test_decode_kernels.py covers the CPU interpreter)")
        return
    if decode_kernels.triton is None:
        print("Triton is not importable: the kernel cannot run")
        return
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    build, prompt = load_build()
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.shape} shape, {args.images} image(s), cond_scale {args.cond_scale}, {dtype}", flush=True)
    dalle = build(args.shape, dev, dtype)
    options = SamplingOptions(top_k=None, filter_thres=0.9, cond_scale=args.cond_scale)
    text = prompt(dalle, args.images).to(dev)
    rows = args.images * (2 if args.cond_scale != 1 else 1)

    print("\n| mode | kernel | kernels/step | us/step first, middle, last image token | ms/token (generation) "
          "| tokens vs kernel off |")
    print("|---|---|---:|---|---:|---|")
    for mode in args.modes:
        compile_step = mode == "compile"
        reference = None
        for on in (False, True):
            set_kernel(on)
            t0 = time.perf_counter()
            tokens, per_token = generation(dalle, text, options, compile_step)
            times, kernels = step_times_us(dalle, args.images, options, compile_step, args.replays)
            print(f"| {mode} | {'on' if on else 'off'} | {kernels} | {', '.join(f'{t:.0f}' for t in times)} "
                  f"| {per_token * 1000:.3f} | {agreement(tokens, reference)} |  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            reference = tokens if reference is None else reference
    if dtype != torch.float32:  # exactness: float32 weights, eager graph only
        dalle32 = build(args.shape, dev, torch.float32)
        runs = []
        for on in (False, True):
            set_kernel(on)
            runs.append(generation(dalle32, text, options, False, repeats=1)[0])
        print(f"| graph, float32 | on vs off | | | | {agreement(runs[1], runs[0])} |", flush=True)
        del dalle32
    set_kernel(True)

    print("\n| one layer's attention, rows | position | max abs diff | PyTorch us | kernel us | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    text_len = dalle.text_seq_len + 1
    for pos in (text_len, text_len + dalle.image_seq_len // 2, dalle.transformer.seq_len - 1):
        error, plain_us, fused_us = layer_attention(dalle, rows, pos, dtype)
        print(f"| {rows} | {pos} | {error:.2e} | {plain_us:.1f} | {fused_us:.1f} | {plain_us / fused_us:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
