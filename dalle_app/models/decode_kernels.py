"""One GPU kernel for an attention layer's decoding step: rotary, KV-cache write and masked attention.

In a graph-captured decoding step (`start` a one-element tensor) each attention layer otherwise runs a rotary on
q, k and v, an `index_copy_` into the cache, a matmul against all `max_len` cached keys, a masked float32 softmax,
a second matmul and a few layout copies: 6-8 launches of a few microseconds each, for one query per row. With 16
layers that is most of the ~280 kernels of a community-shape step. Here one program per (batch row, head) rotates
the new token's q, k and v in registers, stores k and v at position `start` (read on the device, so one captured
launch serves every position), and runs an online softmax over the cached keys in blocks. Keys after `start` (the
unwritten tail of the cache) are never loaded, a masked load issuing no memory traffic; the loads do not wait for the
mask row either, so each block costs one memory round trip. The new token's own key and value come from registers,
not from the cache just written.

The engine's Triton step (`dalle_app/engine/gpu_step.py`) calls it for every layer, with the layer's whole mask and
rotary tables (`tables=True`: the rows of `start` are read in the kernel). `Attention.forward` also uses it inside the
general PyTorch step when `available()` says so: Triton importable, CUDA tensors (or CPU tensors under Triton's
interpreter, TRITON_INTERPRET=1, for tests), and DALLE_APP_DECODE_KERNELS=1 at import or ENABLED set True later
(`benchmarks/check_decode_kernels.py` flips it to time both paths); opt-in there, as it has not been timed inside
the compiled step.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

ENABLED = triton is not None and os.environ.get("DALLE_APP_DECODE_KERNELS", "0") == "1"
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_DIM_HEAD = 128


def available(x: torch.Tensor, kv_cache, start, mask) -> bool:
    """Whether `Attention.forward` should run `decode_attention` for this call: one token x (b, 1, dim) at a tensor
    position, a static cache and a mask over all of its keys, a head size that fits, no autograd (the kernel has no
    backward), and Triton able to run here."""
    if not ENABLED or kv_cache is None or mask is None or not torch.is_tensor(start) or torch.is_grad_enabled():
        return False
    if x.shape[1] != 1 or kv_cache.shape[-1] > _MAX_DIM_HEAD or kv_cache.stride(-1) != 1:
        return False
    if mask.shape[-1] != kv_cache.shape[3] or mask.dtype != torch.bool:
        return False
    return x.is_cuda or (_INTERPRETED and x.device.type == "cpu")


def split_plan(max_len: int, dim_head: int, splits: int) -> tuple[int, int, int]:
    """(splits, keys per split, keys per block) for spreading one query's keys over `splits` programs: blocks of a
    power of two that divide each split, and as many splits as those need (1: no split)."""
    block_n = _launch_config(dim_head)[1]
    if splits <= 1:
        return 1, triton.cdiv(max_len, block_n) * block_n, block_n
    share = triton.cdiv(max_len, splits)
    block_n = min(block_n, max(16, triton.next_power_of_2(share)))
    split_len = triton.cdiv(share, block_n) * block_n
    return triton.cdiv(max_len, split_len), split_len, block_n


def _launch_config(dim_head: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps): a key block of about 8K elements (64 keys of 128 channels, 128 of 64)."""
    block_d = max(16, triton.next_power_of_2(dim_head))
    block_n = max(16, min(128, 8192 // block_d))
    return block_d, block_n, 8 if block_n * block_d >= 8192 else 4


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, qkv_stride_b, kv_ptr, kv_stride_kv, kv_stride_b, kv_stride_h,
                                 kv_stride_n, start_ptr, mask_ptr, mask_stride_b, mask_stride_h, mask_stride_q,
                                 mask_stride_n, cos_ptr, sin_ptr, rot_stride, out_ptr, out_stride_b, heads, scale,
                                 MAX_LEN: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_N: tl.constexpr, ROTARY: tl.constexpr, SPLITS: tl.constexpr,
                                 SPLIT_LEN: tl.constexpr, USE_GDC: tl.constexpr):
        if USE_GDC:  # launched early (programmatic dependent launch): wait for the kernel that wrote qkv
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        in_d = d < DIM
        start = tl.load(start_ptr)

        # q, k, v of the new token: (3, heads, dim_head) in the qkv row
        q_ptr = qkv_ptr + b * qkv_stride_b + h * DIM
        k_ptr = q_ptr + heads * DIM
        v_ptr = k_ptr + heads * DIM
        q = tl.load(q_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        if ROTARY:  # x * cos + swap_pairs(x) * signed sin
            pair = d ^ 1
            in_pair = pair < DIM
            cos = tl.load(cos_ptr + start * rot_stride + d, mask=in_d, other=1.0).to(tl.float32)
            sin = tl.load(sin_ptr + start * rot_stride + d, mask=in_d, other=0.0).to(tl.float32)
            q = q * cos + tl.load(q_ptr + pair, mask=in_pair, other=0.0).to(tl.float32) * sin
            k = k * cos + tl.load(k_ptr + pair, mask=in_pair, other=0.0).to(tl.float32) * sin
            v = v * cos + tl.load(v_ptr + pair, mask=in_pair, other=0.0).to(tl.float32) * sin
        # rounded to the tensors' dtypes, as the unfused path stores and reads them
        # (inductor passes a float argument as float64: every loop-carried value is cast back to float32)
        q = (q.to(qkv_ptr.dtype.element_ty).to(tl.float32) * scale).to(tl.float32)
        k_new = k.to(kv_ptr.dtype.element_ty)
        v_new = v.to(kv_ptr.dtype.element_ty)

        k_cache = kv_ptr + b * kv_stride_b + h * kv_stride_h
        v_cache = k_cache + kv_stride_kv
        first_split = tl.program_id(2) == 0  # one program per row and head writes the new key and value
        tl.store(k_cache + start * kv_stride_n + d, k_new, mask=in_d & first_split)
        tl.store(v_cache + start * kv_stride_n + d, v_new, mask=in_d & first_split)
        k = k_new.to(tl.float32)
        v = v_new.to(tl.float32)

        mask_row = mask_ptr + b * mask_stride_b + h * mask_stride_h + start * mask_stride_q
        m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)  # finite: a fully masked block adds 0
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        if SPLITS == 1:
            for n0 in range(0, MAX_LEN, BLOCK_N):
                if n0 <= start:  # blocks after this token's hold no key it may attend
                    m_i, l_i, acc = _attend_block(n0, start, q, k, v, d, in_d, k_cache, v_cache, kv_stride_n,
                                                  mask_row, mask_stride_n, m_i, l_i, acc, MAX_LEN, BLOCK_N)
            out = acc / l_i
            tl.store(out_ptr + b * out_stride_b + h * DIM + d, out.to(out_ptr.dtype.element_ty), mask=in_d)
        else:  # this program's share of the keys; the partial result is combined later
            lo = tl.program_id(2) * SPLIT_LEN
            for n0 in range(0, SPLIT_LEN, BLOCK_N):
                m_i, l_i, acc = _attend_block(lo + n0, start, q, k, v, d, in_d, k_cache, v_cache, kv_stride_n, mask_row,
                                              mask_stride_n, m_i, l_i, acc, MAX_LEN, BLOCK_N)
            part = out_ptr + ((b * heads + h) * SPLITS + tl.program_id(2)) * (BLOCK_D + 2)
            tl.store(part + d, acc)
            tl.store(part + BLOCK_D, m_i)
            tl.store(part + BLOCK_D + 1, l_i)

    @triton.jit
    def _attend_block(n0, start, q, k, v, d, in_d, k_cache, v_cache, kv_stride_n, mask_row, mask_stride_n, m_i, l_i,
                      acc, MAX_LEN: tl.constexpr, BLOCK_N: tl.constexpr):
        """The online softmax over keys n0..n0+BLOCK_N-1: the running (max, sum, weighted values) updated."""
        n = n0 + tl.arange(0, BLOCK_N)
        allowed = tl.load(mask_row + n * mask_stride_n, mask=n < MAX_LEN, other=0) != 0
        allowed = allowed & (n <= start)
        fresh = n == start
        load = (n < start)[:, None] & in_d[None, :]  # not waiting for the mask: one memory round trip
        offsets = n[:, None] * kv_stride_n + d[None, :]
        keys = tl.load(k_cache + offsets, mask=load, other=0.0).to(tl.float32)
        values = tl.load(v_cache + offsets, mask=load, other=0.0).to(tl.float32)
        keys = tl.where(fresh[:, None], k[None, :], keys)
        values = tl.where(fresh[:, None], v[None, :], values)
        scores = tl.where(allowed, tl.sum(keys * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0)).to(tl.float32)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        acc = (acc * alpha + tl.sum(p[:, None] * values, axis=0)).to(tl.float32)
        l_i = (l_i * alpha + tl.sum(p, axis=0)).to(tl.float32)
        return m_new, l_i, acc


def decode_attention(qkv: torch.Tensor, kv_cache: torch.Tensor, start: torch.Tensor, mask: torch.Tensor,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, dim_head: int,
                     tables: bool = False, splits: int = 1, pdl: bool = False) -> torch.Tensor:
    """One decoding step of an attention layer in one kernel: (b, 1, heads * dim_head), heads outer, in qkv's dtype.

    qkv: the to_qkv output of the new token, (b, 1, 3 * heads * dim_head) laid out as (3, heads, dim_head).
    kv_cache: the layer's (2, b, heads, max_len, dim_head) keys and values; the rotated k and v are stored at
    position `start` (a one-element long tensor on the same device). mask: bool, broadcastable to
    (b, heads, 1, max_len), True = may attend. cos, sin: the rotary tables of this position, (1, dim_head) each,
    sin signed as in `rotary_tables` (None, None: no rotary). With `tables=True` mask is instead the layer's whole
    (max_len, max_len) or (heads, max_len, max_len) mask and cos, sin the (max_len, dim_head) tables of every
    position: the kernel reads the rows of `start` itself, so a captured step needs no gathers. Equals
    rotary.apply, write_kv and attend_static_cache for a causal mask: keys after `start` are not attended whatever
    the mask says (they are not written yet).

    splits > 1 (when `split_plan` keeps more than one): the keys are shared among that many programs per row and
    head, and the result is their partial softmax states, float32 (b, heads, splits, BLOCK_D + 2): the unnormalised
    weighted values, then the running max and sum, which the Triton step's output product merges
    (`gpu_step._merge_splits`). pdl: launch it with programmatic dependent launch (Hopper and later; the kernels
    around it must then wait likewise, as the Triton step's do).
    """
    b = qkv.shape[0]
    max_len = kv_cache.shape[3]
    qkv = qkv.reshape(b, 3 * heads * dim_head)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if tables:  # (heads|1, max_len, max_len): broadcast over the batch, the query row chosen in the kernel
        mask = mask.reshape(-1, max_len, max_len)
        mask_strides = (0, mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1), mask.stride(2))
    else:
        mask = mask.broadcast_to(b, heads, 1, max_len)
        mask_strides = (mask.stride(0), mask.stride(1), 0, mask.stride(3))
    rotary = cos is not None
    if rotary:
        cos, sin = cos.contiguous(), sin.contiguous()
        rot_stride = cos.stride(0) if tables else 0
    else:
        cos = sin = qkv  # unused pointers
        rot_stride = 0
    block_d, _, num_warps = _launch_config(dim_head)
    splits, split_len, block_n = split_plan(max_len, dim_head, splits)
    if splits == 1:
        out = torch.empty(b, 1, heads * dim_head, dtype=qkv.dtype, device=qkv.device)
    else:
        out = torch.empty(b, heads, splits, block_d + 2, dtype=torch.float32, device=qkv.device)
    kv_stride = kv_cache.stride()
    _decode_attention_kernel[(b, heads, splits)](
        qkv, qkv.stride(0), kv_cache, kv_stride[0], kv_stride[1], kv_stride[2], kv_stride[3], start,
        mask, *mask_strides, cos, sin, rot_stride, out, out.stride(0), heads, dim_head ** -0.5,
        MAX_LEN=max_len, DIM=dim_head, BLOCK_D=block_d, BLOCK_N=block_n, ROTARY=rotary, SPLITS=splits,
        SPLIT_LEN=split_len, USE_GDC=pdl, num_warps=num_warps, launch_pdl=pdl)
    return out

