"""The fused top-k sampling kernel on a GPU: same tokens as the plain path, and how long each takes.

    python benchmarks/check_fused_sample.py [--rows 16 2] [--vocab 16384] [--top-k 6579 64]
    DALLE_APP_FUSED_SAMPLE=1 python benchmarks/generate.py --shape community   # the engine with it, against =0

For each shape: the share of rows where the two paths pick different tokens over many random draws (ulp-level
differences in log/division can flip an exact near-tie; expect 0), then the time of one call of each, captured in a
CUDA graph and replayed, as the engine runs it.
"""

from __future__ import annotations

import argparse

import torch

from dalle_app.engine import fused_sample, sampling


def graph_time_us(fn, iters=200) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (iters // 20 * 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--vocab", type=int, nargs="+", default=[16384, 1024])
    parser.add_argument("--top-k", type=int, nargs="+", default=[6579, 64])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--warps", type=int, nargs="*", default=[], help="also time the fused kernel with these warps")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| rows | vocab | top-k | dtype | rows differing | plain us | fused us | speed-up |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for vocab in args.vocab:
        for top_k in args.top_k:
            if top_k >= vocab:
                continue
            for rows in args.rows:
                for dtype in (torch.float32, torch.bfloat16):
                    differ = 0
                    for draw in range(args.draws):
                        logits = (torch.randn(rows, vocab, device=dev) * 4).to(dtype)
                        seeds = torch.randint(0, 2 ** 31 - 1, (rows,), device=dev)
                        a = sampling.sample_plain(logits, seeds, draw, 1.0, top_k)
                        b = fused_sample.sample_top_k(logits, seeds, draw, 1.0, top_k)
                        differ += (a != b).sum().item()
                    pos = torch.full((1,), 40, dtype=torch.long, device=dev)
                    plain_us = graph_time_us(lambda: sampling.sample_plain(logits, seeds, pos, 1.0, top_k))
                    fused_us = graph_time_us(lambda: fused_sample.sample_top_k(logits, seeds, pos, 1.0, top_k))
                    print(f"| {rows} | {vocab} | {top_k} | {str(dtype)[6:]} | {differ} of {rows * args.draws} "
                          f"| {plain_us:.1f} | {fused_us:.1f} | {plain_us / fused_us:.1f}x |", flush=True)
    if args.warps:
        print("\n| rows | vocab | top-k | warps | fused us (bfloat16) |\n|---:|---:|---:|---:|---:|")
        for vocab in args.vocab:
            logits = (torch.randn(max(args.rows), vocab, device=dev) * 4).to(torch.bfloat16)
            seeds = torch.randint(0, 2 ** 31 - 1, (max(args.rows),), device=dev)
            for rows in args.rows:
                for warps in args.warps:
                    fused_sample.NUM_WARPS = warps
                    us = graph_time_us(lambda: fused_sample.sample_top_k(logits[:rows], seeds[:rows], pos, 1.0,
                                                                         args.top_k[0]))
                    print(f"| {rows} | {vocab} | {args.top_k[0]} | {warps} | {us:.1f} |", flush=True)
        fused_sample.NUM_WARPS = None


if __name__ == "__main__":
    main()
