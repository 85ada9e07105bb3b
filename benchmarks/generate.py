"""Generation speed: the engine against the project's uncached path (and DALLE-pytorch 1.6.6 when importable).

    python benchmarks/generate.py --shape community --images 8 --cond-scale 3
    python benchmarks/generate.py --shape all            # every shape, guided and not
    python benchmarks/generate.py --shape builtin --device cpu --images 4 --cond-scale 3

Random weights (torch.manual_seed(0)), a 20-token prompt, one warm-up run, then the median of --repeats timed runs.
Prints a markdown table: seconds, images/s, ms per token, speed-up over the uncached path and over the reference,
and the fraction of the memory-bandwidth floor (weights + KV cache read once per token / measured bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dalle_app.engine import SamplingOptions, generate_image_tokens  # noqa: E402
from dalle_app.models import DALLE, DiscreteVAE  # noqa: E402

SHAPES = {
    "community": (dict(image_size=256, num_layers=4, num_tokens=16384, codebook_dim=256, hidden_dim=64,
                       num_resnet_blocks=1),
                  dict(dim=512, num_text_tokens=10000, text_seq_len=128, depth=16, heads=8, dim_head=64)),
    "readme": (dict(image_size=256, num_layers=3, num_tokens=8192, codebook_dim=1024, hidden_dim=64,
                    num_resnet_blocks=1),
               dict(dim=1024, num_text_tokens=10000, text_seq_len=256, depth=12, heads=16, dim_head=64)),
    "small": (dict(image_size=128, num_layers=3, num_tokens=1024, codebook_dim=256, hidden_dim=64,
                   num_resnet_blocks=1),
              dict(dim=256, num_text_tokens=1000, text_seq_len=64, depth=6, heads=8, dim_head=32)),
}
# DALLE-pytorch 1.6.6 seconds for these settings, from reference_timings.md (H100, fp32; 2-core CPU for "small")
REFERENCE_SECONDS = {("community", 8, 1.0): 8.76, ("community", 8, 3.0): 12.57, ("community", 1, 1.0): 8.41,
                     ("community", 1, 3.0): 12.83, ("readme", 8, 1.0): 94.42, ("readme", 8, 3.0): 35.09,
                     ("small", 4, 3.0): 5.84, ("small", 1, 3.0): 5.08}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, device, dtype):
    if shape == "builtin":
        from dalle_app.manager import ModelManager
        loaded = ModelManager(device=str(device), dtype=str(dtype).replace("torch.", "")).load("weights/shapes-dalle")
        return loaded.dalle
    torch.manual_seed(0)
    vae_kw, dalle_kw = SHAPES[shape]
    return DALLE(vae=DiscreteVAE(**vae_kw), **dalle_kw).to(device=device, dtype=dtype).eval()


def measure_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = 256 * 2 ** 20 if device.type == "cuda" else 64 * 2 ** 20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    reps = 20 if device.type == "cuda" else 5
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t)


def prompt(dalle, rows):
    text = torch.zeros(rows, dalle.text_seq_len, dtype=torch.long)
    text[:, :20] = torch.arange(1, 21)
    return text


def time_engine(dalle, rows, cond_scale, repeats, device, graph=None, compile_step=False):
    options = SamplingOptions(top_k=None, filter_thres=0.9, cond_scale=cond_scale)
    text = prompt(dalle, rows)
    generate_image_tokens(dalle, text, options, seeds=list(range(rows)), use_cuda_graph=graph,
                          compile_step=compile_step)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        generate_image_tokens(dalle, text, options, seeds=list(range(rows)), use_cuda_graph=graph,
                              compile_step=compile_step)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def time_uncached(dalle, rows, cond_scale, device, tokens=16):
    """Seconds per token of full recomputation (what DALLE-pytorch does without a working cache), measured over
    `tokens` steps in the middle of the image and extrapolated to the whole image."""
    text = prompt(dalle, rows).to(device)
    batch = torch.cat([text, torch.zeros_like(text)]) if cond_scale != 1 else text
    mid = dalle.image_seq_len // 2
    ids = torch.zeros(batch.shape[0], mid, dtype=torch.long, device=device)
    dalle(batch, ids)
    sync(device)
    t = time.perf_counter()
    for _ in range(tokens):
        dalle(batch, ids)
    sync(device)
    return (time.perf_counter() - t) / tokens * dalle.image_seq_len


def reference_dalle(dalle):
    """DALLE-pytorch 1.6.6's DALLE with the same hparams and weights, or None when the package is not importable.

    Where taming / deepspeed / youtokentome are missing, the stand-ins of tests/fixtures/reference_stubs.py are
    installed first (none of them is used by a DiscreteVAE model)."""
    try:
        import dalle_pytorch  # noqa: F401
    except ImportError:
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
            import reference_stubs

            reference_stubs.install()
            import dalle_pytorch  # noqa: F401
        except ImportError:
            return None
    import dalle_pytorch

    vae = dalle_pytorch.DiscreteVAE(**dalle.vae.config())
    hparams = {k: v for k, v in dalle.hparams.items() if k != "conv_like_window"}
    reference = dalle_pytorch.DALLE(vae=vae, **hparams)
    reference.load_state_dict(dalle.state_dict())
    return reference.to(next(dalle.parameters()).device).eval()


@torch.no_grad()
def time_reference(reference, dalle, rows, cond_scale, device, repeats: int = 3):
    """Median seconds of DALLE-pytorch's own `generate_images` (its KV cache on, as its generate.py does), after one
    warm-up run, like the engine's timing."""
    text = prompt(dalle, rows).to(device)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        reference.generate_images(text, filter_thres=0.9, cond_scale=cond_scale, use_cache=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bytes_per_step(dalle, rows, cond_scale):
    weights = sum(p.numel() * p.element_size() for n, p in dalle.named_parameters() if not n.startswith("vae."))
    t = dalle.transformer
    seqs = rows * (2 if cond_scale != 1 else 1)
    avg_len = dalle.text_seq_len + 1 + dalle.image_seq_len / 2
    kv = 2 * t.depth * seqs * t.heads * avg_len * t.dim_head * next(dalle.parameters()).element_size()
    return weights + kv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="community", choices=[*SHAPES, "builtin", "all"])
    ap.add_argument("--images", type=int, nargs="*", default=None)
    ap.add_argument("--cond-scale", type=float, nargs="*", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-uncached", action="store_true")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                    help="fuse the decode step with torch.compile (optionally in this mode, e.g. "
                    "max-autotune-no-cudagraphs)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--reference", action="store_true", help="also time DALLE-pytorch 1.6.6 on the same weights "
                    "(when importable; otherwise its times from reference_timings.md are shown)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = ["community", "readme"] if args.shape == "all" else [args.shape]
    bandwidth = measure_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, {dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| shape | images | cond_scale | seconds | images/s | ms/token | vs uncached | vs DALLE-pytorch 1.6.6 | of bandwidth floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows_out = []
    for shape in shapes:
        dalle = build(shape, device, dtype)
        reference = reference_dalle(dalle) if args.reference else None
        for images in args.images or [8, 1]:
            for cs in args.cond_scale or [3.0, 1.0]:
                sec = time_engine(dalle, images, cs, args.repeats, device, compile_step=args.compile)
                per_token = sec / dalle.image_seq_len
                unc = None if args.no_uncached else time_uncached(dalle, images, cs, device)
                ref = REFERENCE_SECONDS.get((shape, images, cs))
                if reference is not None:
                    ref = round(time_reference(reference, dalle, images, cs, device, args.repeats), 2)
                floor = bytes_per_step(dalle, images, cs) / bandwidth
                row = dict(shape=shape, images=images, cond_scale=cs, seconds=sec, ms_per_token=per_token * 1e3,
                           uncached_seconds=unc, reference_seconds=ref, floor_fraction=floor / per_token,
                           device=name, dtype=str(dtype))
                rows_out.append(row)
                print(f"| {shape} | {images} | {cs:g} | {sec:.3f} | {images / sec:.1f} | {per_token * 1e3:.2f} | "
                      f"{f'{unc / sec:.0f}x (uncached {unc:.1f} s)' if unc else '-'} | "
                      f"{f'{ref / sec:.1f}x ({ref} s)' if ref else '-'} | {floor / per_token:.0%} |", flush=True)
        del dalle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
