"""The CUDA decoding step as five Triton kernels per layer, captured in a CUDA graph by the engine.

A decoding step multiplies a few rows (2 for one guided image) by every weight of the model. On an H100 each of
those products takes a few microseconds whatever its size, as does every norm, shift, copy and mask of a step, so a
step of the community shape is ~280 kernels (~440 without torch.compile) and its time is their number, not their
bytes. Here each residual branch is two kernels, each doing all the work that needs one pass over a weight:

    norm_linear:      layer norm -> token shift (writing the history) -> x @ W.T + b [-> GEGLU]
    decode_attention: rotary, KV-cache write and attention over the cache (`models/decode_kernels.py`)
    linear_residual:  x @ W.T + b, times the branch's LayerScale, added to the residual stream in place

so a layer is five launches (attention branch: norm_linear, decode_attention, linear_residual; feed-forward branch:
norm_linear with GEGLU, linear_residual) and the image head one more (final norm and the image rows of
`to_logits`). The position is read on the device, so one capture serves every token. Each program owns a block of
output columns for a block of rows and recomputes the row statistics it needs (a few KB, from cache): no kernel waits
on another inside a branch.

`GpuStep(dalle, cache)(x, pos)` computes what `Transformer.forward` + `DALLE.image_logits` compute for one token
(tests compare them under Triton's CPU interpreter); `supports` says when it applies. The engine uses it for every
CUDA-graph step it supports; `DALLE_APP_GPU_STEP=0` (or `ENABLED = False`) makes it capture the PyTorch step instead.
On an H100 a community-shape step takes ~0.53 ms against 1.4 ms for the PyTorch step and 0.83 ms for the compiled
one (`benchmarks/results/h100_2026-12-07_session18.md`). On Hopper and later the kernels are launched with
programmatic dependent launch (PDL below): a kernel starts while the previous one still runs, loads its first block
of weights (which no kernel writes), and only then waits for the previous kernel's results.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..models import decode_kernels
from ..models.token_step import plain_stack

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

ENABLED = triton is not None and os.environ.get("DALLE_APP_GPU_STEP", "1") != "0"
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch settings, from `benchmarks/check_gpu_step.py --sweep` on an H100 (community shape, us a step):
NUM_WARPS = 4  # per program; 2 and 8 were slower
BLOCK_K = 1024  # reduction channels per loop iteration: 128 -> 749, 256 -> 594, 512 -> 585, 1024 -> 575 us
# programs sharing one row and head's keys in the attention kernel (flash-decoding); more than 1, with
# DALLE_APP_ATTENTION_SPLITS, made a step 6-20x slower on an H100 (session 18)
_splits = os.environ.get("DALLE_APP_ATTENTION_SPLITS", "1")
if not _splits.isdigit() or int(_splits) < 1:
    raise ValueError(f"DALLE_APP_ATTENTION_SPLITS must be a whole number from 1 up, not {_splits!r}.")
ATTENTION_SPLITS = int(_splits)
# Programmatic dependent launch (Hopper and later): each kernel is started while the one before it runs, loads its
# first block of weights, and then waits for that kernel's results (gdc_wait), hiding launch and weight latency.
PDL = not _INTERPRETED and os.environ.get("DALLE_APP_PDL", "1") != "0"
disabled_reason: str | None = None  # why `disable` switched the step off in this process
MAX_ROWS = 64  # beyond this the weights are re-read too often; the PyTorch step's GEMMs are better


def supports(dalle, cache) -> bool:
    """Whether `GpuStep` computes this model's decoding step over this cache: CUDA tensors (or CPU ones under Triton's
    interpreter), one floating dtype, contiguous buffers, at most MAX_ROWS rows, heads of at most 128 channels, a
    cache covering the whole sequence, and a stack of the plain kind (`plain_stack`)."""
    if not ENABLED:
        return False
    t = dalle.transformer
    tensors = [*cache.kv, *(cache.shifted or []), *dalle.parameters()]
    dtype = tensors[0].dtype
    on_device = all(x.is_cuda for x in tensors) or (_INTERPRETED and all(x.device.type == "cpu" for x in tensors))
    if not on_device or any(x.dtype != dtype or not x.is_contiguous() for x in tensors):
        return False
    if dtype not in (torch.float32, torch.float16, torch.bfloat16) or cache.batch_size > MAX_ROWS:
        return False
    return cache.kv[0].shape[3] == t.seq_len and t.dim_head <= 128 and plain_stack(dalle, cache)


def launch_settings() -> tuple:
    """The module settings a captured step's kernels depend on (a stepper captured under others is not reused)."""
    return NUM_WARPS, BLOCK_K, ATTENTION_SPLITS, PDL


def disable(error: BaseException) -> None:
    """Stop using the Triton step in this process (its kernels failed to build or run here), keeping why: the
    error's type and first line (a Triton compile error runs to pages)."""
    global ENABLED, disabled_reason
    lines = str(error).strip().splitlines()
    ENABLED, disabled_reason = False, f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _block_n(n_out: int) -> int:
    """Output columns per program: the widest block that still gives >= 256 programs (two per SM of an H100)."""
    for block in (64, 32):
        if n_out >= 256 * block:
            return block
    return 16


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b; in exact float32 for float32 models (tensor cores would round the inputs to tf32)."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _weight_blocks(w_ptr, n, n_out, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, in_n, GEGLU: tl.constexpr):
        """Reduction channels k0.. of W.T's columns n, (BLOCK_K, BLOCK_N), and of the gate columns with GEGLU (the
        second half of W's rows; else the same block again, unused). Past K the block is masked out (no loads)."""
        k = k0 + tl.arange(0, BLOCK_K)
        w_mask = (k < K)[:, None] & in_n[None, :]
        w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=w_mask, other=0.0)
        g = w
        if GEGLU:
            g = tl.load(w_ptr + (n + n_out)[None, :] * K + k[:, None], mask=w_mask, other=0.0)
        return w, g

    @triton.jit
    def _norm_linear_kernel(x_ptr, x_stride, norm_w_ptr, norm_b_ptr, eps, hist_ptr, hist_stride_b, hist_stride_n,
                            pos_ptr, text_len, fmap_size, zero_row, w_ptr, bias_ptr, out_ptr, out_stride, rows,
                            n_out, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            GEGLU: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        first_column_block = tl.program_id(1) == 0
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = m < rows, n < n_out
        x_rows = x_ptr + m[:, None] * x_stride

        # the first block of weights does not depend on the previous kernel: loaded while it finishes
        w, g = _weight_blocks(w_ptr, n, n_out, 0, DIM, BLOCK_K, in_n, GEGLU)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()  # the previous kernel's writes (x, the cache) are visible from here on
            tl.extra.cuda.gdc_launch_dependents()

        # layer-norm statistics of each row from one load of the whole row (a loop would wait on every block)
        d = tl.arange(0, BLOCK_D)
        in_row = in_m[:, None] & (d < DIM)[None, :]
        row = tl.load(x_rows + d[None, :], mask=in_row, other=0.0).to(tl.float32)
        mean = tl.sum(row, axis=1) / DIM
        centred = tl.where(in_row, row - mean[:, None], 0.0)
        squares = tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / DIM + eps)

        # token shift: the history row each channel reads (as `transformer.shift_index`)
        pos = tl.load(pos_ptr)
        img = pos - text_len
        previous = tl.where(pos > 0, pos - 1, zero_row)
        left = tl.where(img % fmap_size != 0, pos - 1, zero_row)
        above = tl.where(img >= fmap_size, pos - fmap_size, zero_row)

        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        gate_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < DIM
            inside = in_m[:, None] & in_k[None, :]
            x = tl.load(x_rows + k[None, :], mask=inside, other=0.0).to(tl.float32)
            weight = tl.load(norm_w_ptr + k, mask=in_k, other=0.0).to(tl.float32)
            bias = tl.load(norm_b_ptr + k, mask=in_k, other=0.0).to(tl.float32)
            h = ((x - mean[:, None]) * rstd[:, None] * weight[None, :] + bias[None, :]).to(w_ptr.dtype.element_ty)
            if SHIFT:
                text_source = tl.where(k < (DIM + 1) // 2, previous, pos)
                image_source = tl.where(k < (DIM + 3) // 4, above, tl.where(k < 2 * ((DIM + 3) // 4), left, pos))
                source = tl.where(img < 0, text_source, image_source)
                own = source == pos
                history = hist_ptr + m[:, None] * hist_stride_b
                # the neighbours are earlier rows; this token's own row is written by one column block only
                tl.store(history + pos * hist_stride_n + k[None, :], h, mask=inside & first_column_block)
                shifted = tl.load(history + source[None, :] * hist_stride_n + k[None, :],
                                  mask=inside & ~own[None, :], other=0.0)
                h = tl.where(own[None, :], h, shifted)
            acc = _dot(h, w, acc, IEEE)
            if GEGLU:
                gate_acc = _dot(h, g, gate_acc, IEEE)
            w, g = _weight_blocks(w_ptr, n, n_out, k0 + BLOCK_K, DIM, BLOCK_K, in_n, GEGLU)  # next blocks
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=in_n, other=0.0).to(tl.float32)[None, :]
            if GEGLU:
                gate_acc += tl.load(bias_ptr + n_out + n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        if GEGLU:  # x * gelu(gates), the exact (erf) gelu
            acc = acc * 0.5 * gate_acc * (1.0 + tl.math.erf(gate_acc * 0.7071067811865476))
        tl.store(out_ptr + m[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_m[:, None] & in_n[None, :])

    @triton.jit
    def _merge_splits(part_ptr, m, k, inside, K: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PART: tl.constexpr):
        """Attention outputs (rows m, channels k) from partial softmax states (rows, heads, SPLITS, PART): each
        split's weighted values rescaled to the largest running max, over the rescaled sums."""
        heads = K // HEAD_DIM
        state = part_ptr + ((m[:, None] * heads + k[None, :] // HEAD_DIM) * SPLITS) * PART
        top = tl.full(inside.shape, -1.0e30, tl.float32)
        for s in tl.static_range(SPLITS):
            top = tl.maximum(top, tl.load(state + s * PART + PART - 2, mask=inside, other=0.0))
        values = tl.zeros(inside.shape, tl.float32)
        total = tl.zeros(inside.shape, tl.float32)
        for s in tl.static_range(SPLITS):
            weight = tl.exp(tl.load(state + s * PART + PART - 2, mask=inside, other=0.0) - top)
            values += weight * tl.load(state + s * PART + k[None, :] % HEAD_DIM, mask=inside, other=0.0)
            total += weight * tl.load(state + s * PART + PART - 1, mask=inside, other=1.0)
        return values / total

    @triton.jit
    def _linear_residual_kernel(h_ptr, h_stride, w_ptr, bias_ptr, scale_ptr, res_ptr, res_stride, out_ptr,
                                out_stride, rows, n_out, K: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                RESIDUAL: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
                                HEAD_DIM: tl.constexpr, PART: tl.constexpr, USE_GDC: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = m < rows, n < n_out
        w, _ = _weight_blocks(w_ptr, n, n_out, 0, K, BLOCK_K, in_n, False)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < K
            if SPLITS == 1:
                h = tl.load(h_ptr + m[:, None] * h_stride + k[None, :], mask=in_m[:, None] & in_k[None, :],
                            other=0.0)
            else:  # h is a split attention's partial states: merged here
                h = _merge_splits(h_ptr, m, k, in_m[:, None] & in_k[None, :], K, SPLITS, HEAD_DIM, PART)
                h = h.to(w_ptr.dtype.element_ty)
            acc = _dot(h, w, acc, IEEE)
            w, _ = _weight_blocks(w_ptr, n, n_out, k0 + BLOCK_K, K, BLOCK_K, in_n, False)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        inside = in_m[:, None] & in_n[None, :]
        if RESIDUAL:  # residual + scale * branch, as Branch's addcmul (in place when res_ptr is out_ptr)
            acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            scale = tl.load(scale_ptr + n, mask=in_n, other=0.0).to(tl.float32)
            residual = tl.load(res_ptr + m[:, None] * res_stride + n[None, :], mask=inside, other=0.0)
            acc = residual.to(tl.float32) + acc * scale[None, :]
        tl.store(out_ptr + m[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


class GpuStep:
    """One request's decoding step in Triton kernels: `step(x, pos)` runs the tokens x (batch, dim) at position pos
    (a one-element long tensor) through the stack, filling `cache`, and returns the image logits
    (batch, num_image_tokens). Check `supports` first; x is not modified."""

    def __init__(self, dalle, cache):
        t = dalle.transformer
        self.t, self.cache = t, cache
        self.head, self.text_tokens = dalle.to_logits, dalle.num_text_tokens  # not dalle: see stepper.StepperPool
        self.rows = cache.batch_size
        self.block_m = 16  # whatever the batch: a row is then computed by the same code, alone or not
        self.ieee = cache.kv[0].dtype == torch.float32
        self.masks = [t.layer_mask(i).contiguous() for i in range(t.depth)]
        self.cos_sin = t.rotary_cos_sin.to(cache.kv[0].dtype) if t.rotary_cos_sin is not None else None
        kv = cache.kv[0]
        self.pdl = PDL and kv.is_cuda and torch.cuda.get_device_capability(kv.device)[0] >= 9

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t, cache = self.t, self.cache
        hidden = torch.empty_like(x)
        residual = x  # the first branch reads x and writes hidden; later ones update hidden in place
        cos, sin = (self.cos_sin[0], self.cos_sin[1]) if self.cos_sin is not None else (None, None)
        for i, layer in enumerate(t.layers):
            attn, ff = layer.attn.module, layer.ff.module
            qkv = self._norm_linear(residual, layer.attn.norm, self._history(2 * i), pos, attn.to_qkv)
            out = decode_kernels.decode_attention(qkv, cache.kv[i], pos, self.masks[i], cos, sin, attn.heads,
                                                  attn.dim_head, tables=True, splits=ATTENTION_SPLITS,
                                                  pdl=self.pdl)
            if out.dim() == 3:  # (rows, 1, heads * dim_head); else partial states, merged by the next kernel
                out = out.view(self.rows, -1)
            self._linear_residual(out, attn.to_out, layer.attn, residual, hidden)
            residual = hidden
            gated = self._norm_linear(hidden, layer.ff.norm, self._history(2 * i + 1), pos, ff.proj_in, geglu=True)
            self._linear_residual(gated, ff.proj_out, layer.ff, hidden, hidden)
        norm, proj = self.head
        return self._norm_linear(residual, norm, None, pos, proj, rows_from=self.text_tokens)

    def _history(self, index: int) -> torch.Tensor | None:
        return self.cache.shifted[index] if self.cache.shifted is not None else None

    def _norm_linear(self, x, norm: nn.LayerNorm, history, pos, linear: nn.Linear, geglu: bool = False,
                     rows_from: int = 0) -> torch.Tensor:
        """linear(shift(norm(x))) [GEGLU'd], writing norm(x) into the shift history; linear's rows from
        `rows_from` on (the image head)."""
        weight = linear.weight[rows_from:]
        bias = linear.bias[rows_from:] if linear.bias is not None else None
        n_out = weight.shape[0] // 2 if geglu else weight.shape[0]
        out = torch.empty(self.rows, n_out, dtype=weight.dtype, device=x.device)
        block_n = _block_n(n_out)
        shift = history is not None
        dim = x.shape[1]
        grid = (triton.cdiv(self.rows, self.block_m), triton.cdiv(n_out, block_n))
        _norm_linear_kernel[grid](
            x, x.stride(0), norm.weight, norm.bias, norm.eps, history if shift else x,
            history.stride(0) if shift else 0, history.stride(1) if shift else 0, pos, self.t.text_len,
            self.t.fmap_size, self.t.seq_len, weight, bias if bias is not None else weight, out, out.stride(0),
            self.rows, n_out, DIM=dim, BLOCK_D=_pow2(dim), BLOCK_M=self.block_m, BLOCK_N=block_n,
            BLOCK_K=min(BLOCK_K, _pow2(dim)),
            SHIFT=shift, HAS_BIAS=bias is not None, GEGLU=geglu, IEEE=self.ieee, USE_GDC=self.pdl,
            num_warps=NUM_WARPS, launch_pdl=self.pdl)
        return out

    def _linear_residual(self, h, linear: nn.Linear, branch, residual, out) -> None:
        """out = residual + branch.scale * norm_out(linear(h)); out may be residual itself. h: (rows, k), or a split
        attention's partial states (rows, heads, splits, part)."""
        n_out, k = linear.weight.shape
        sandwich = branch.norm_out is not None
        target = torch.empty_like(out) if sandwich else out
        block_n = _block_n(n_out)
        grid = (triton.cdiv(self.rows, self.block_m), triton.cdiv(n_out, block_n))
        bias = linear.bias
        split = (h.shape[2], k // h.shape[1], h.shape[3]) if h.dim() == 4 else (1, 1, 1)
        _linear_residual_kernel[grid](
            h, h.stride(0), linear.weight, bias if bias is not None else linear.weight, branch.scale, residual,
            residual.stride(0), target, target.stride(0), self.rows, n_out, K=k, BLOCK_M=self.block_m,
            BLOCK_N=block_n, BLOCK_K=min(BLOCK_K, _pow2(k)), HAS_BIAS=bias is not None, RESIDUAL=not sandwich,
            IEEE=self.ieee, SPLITS=split[0], HEAD_DIM=split[1], PART=split[2], USE_GDC=self.pdl,
            num_warps=NUM_WARPS, launch_pdl=self.pdl)
        if sandwich:  # the norm needs whole rows: done after the product
            normed = nn.functional.layer_norm(target, target.shape[-1:], branch.norm_out.weight,
                                              branch.norm_out.bias, branch.norm_out.eps)
            torch.addcmul(residual, normed, branch.scale[0], out=out)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))
