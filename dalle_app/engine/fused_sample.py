"""One GPU kernel for `sampling.sample` with top-k: threshold, noise, Gumbel-max and argmax per row.

The plain path costs ~90 us per token on an H100 for 16 rows over 16,384 codes (a top-k, a masked fill, the noise
and an argmax: several launches, the top-k alone most of it). Here one program per row keeps its logits in
registers, finds the k-th largest value by bisection over the float bits (32 block-wide counts, no sort), and
draws the same counter-based noise as `sampling.uniform_noise`, so it picks the token the plain path picks.

`sampling.sample` uses it on CUDA when Triton is importable and top-p is off, unless DALLE_APP_FUSED_SAMPLE=0
(ENABLED below). On an H200 it takes 36 us a step for 16 rows of 16,384 codes against 150-184 us for the plain
path, and picks the same token in all but ~0.1% of float32 rows (exact near-ties that ulp-level differences flip).
Ties at the k-th value are all kept, as in `sampling.filter_logits`.
"""

from __future__ import annotations

import os

import torch

from .sampling import _C1, _C2, _C3, _MASK62

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

_MAX_VOCAB = 1 << 15  # one row is one program's registers
NUM_WARPS: int | None = None  # per program; None: 4 to 16 by vocabulary size (benchmarks/check_fused_sample.py)


# Opt-in (DALLE_APP_FUSED_SAMPLE=1) until it has been compiled and timed on a GPU: so far it has only run under
# Triton's interpreter. `benchmarks/check_fused_sample.py` is the check to run on one.
ENABLED = triton is not None and os.environ.get("DALLE_APP_FUSED_SAMPLE", "1") != "0"


def available(logits: torch.Tensor) -> bool:
    """Whether `sampling.sample` should use `sample_top_k` for these logits: CUDA, Triton, a vocabulary that fits.
    (`sample_top_k` itself also runs on CPU tensors under Triton's interpreter, TRITON_INTERPRET=1, for tests.)"""
    return ENABLED and logits.is_cuda and logits.shape[-1] <= _MAX_VOCAB


if triton is not None:
    C1, C2, C3, MASK62 = (tl.constexpr(c) for c in (_C1, _C2, _C3, _MASK62))

    @triton.jit
    def _mix(x):
        x = (x ^ (x >> 31)) * C2 & MASK62
        x = (x ^ (x >> 29)) * C3 & MASK62
        return x ^ (x >> 32)

    @triton.jit
    def _top_k_gumbel_kernel(logits_ptr, row_stride, seeds_ptr, position_ptr, out_ptr, vocab, k, temperature,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        inside = ids < vocab
        x = tl.load(logits_ptr + row * row_stride + ids, mask=inside, other=float("-inf")).to(tl.float32)
        x = x + 0.0  # -0.0 -> +0.0, so equal floats get equal keys

        # keys ordered like the floats: flip the magnitude bits of negatives
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(inside, key, -2147483648)  # padding: below every real key, never counted
        # the largest t with count(key >= t) >= k is the k-th largest key (bounds in int64: no overflow)
        lo = tl.min(tl.where(inside, key, 2147483647), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        keep = inside & (key >= lo)

        # sampling.uniform_noise, in the same 62-bit integer arithmetic
        seed = tl.load(seeds_ptr + row).to(tl.int64)
        position = tl.load(position_ptr).to(tl.int64)
        h = (seed * C1 + _mix(position * C2 + ids.to(tl.int64) + 1)) & MASK62
        h = _mix(h)
        u = (((h >> 38) & 0xFFFFFF).to(tl.float32) + 0.5) / 16777216.0
        score = tl.where(keep, x / temperature - tl.log(-tl.log(u)), float("-inf"))
        tl.store(out_ptr + row, tl.argmax(score, axis=0).to(tl.int64))


def sample_top_k(logits: torch.Tensor, seeds: torch.Tensor, position, temperature: float, top_k: int) -> torch.Tensor:
    """`sampling.sample(logits, seeds, position, temperature, top_k)` in one kernel: (rows,) token ids.

    position may be an int or a one-element tensor on the logits' device (as inside a captured CUDA graph)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if not torch.is_tensor(position):
        position = torch.full((1,), int(position), dtype=torch.long, device=logits.device)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    block = triton.next_power_of_2(vocab)
    _top_k_gumbel_kernel[(rows,)](logits, logits.stride(0), seeds, position, out, vocab, min(top_k, vocab),
                                  float(temperature), BLOCK=block, num_warps=NUM_WARPS or min(16, max(4, block // 1024)))
    return out
