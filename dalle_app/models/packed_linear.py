"""Float32 (and bfloat16) linear layers on the CPU through oneDNN, with the weight prepacked once.

Decoding multiplies a handful of rows by each weight matrix at every token. For such products PyTorch's default CPU
GEMM is 2-3x slower than oneDNN with a weight laid out for it ahead of time (on a 2-core AMD EPYC, 8 rows by a
256 -> 2048 weight: 134 us against 58 us; `benchmarks/generate.py --device cpu` shows the whole effect). This is the
same kernel torch.compile's CPU backend picks with frozen weights, without a compile.

It is used for inference only: with autograd recording, under torch.compile, off the CPU, or in a dtype that
`packed_dtypes()` does not choose for this machine (float32 depends on the CPU) it is plain `F.linear`. The
packed copy is kept beside the weight and rebuilt when the weight changes (a new tensor, or an in-place update such
as an optimizer step or `load_state_dict`, which bumps the tensor's version counter), so a stale copy is never
used.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
CHOICE_ENV = "DALLE_APP_CPU_LINEAR"  # "packed" or "plain" for float32; default: by CPU vendor, as measured


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def packed_dtypes() -> set:
    """The dtypes whose CPU linear layers use the packed path on this machine.

    float32: on an AMD EPYC (Zen 4) the packed product of 8 rows by the built-in model's weights is 2-3x faster than
    MKL's; on an Intel Xeon with AMX, MKL is faster up to 8 rows (0.97 ms against 1.12 ms) and the packed path only
    from 16. The choice is fixed per machine, not timed per process, so that a seed gives the same image in every
    run. bfloat16 (where the CPU has native bf16 instructions) was faster packed on both: 0.74 ms against 1.15 ms."""
    if not _available:
        return set()
    choice = os.environ.get(CHOICE_ENV, "").strip().lower()
    fp32 = choice == "packed" or (choice != "plain" and _cpu_vendor() == "AuthenticAMD")
    dtypes = {torch.float32} if fp32 else set()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    return dtypes


_DTYPES = packed_dtypes()


def _use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_available and x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, holder: nn.Module,
                  name: str = "_packed_weight") -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed with a oneDNN-packed copy of `weight` stored on `holder` under `name`
    when that is possible and faster (float32 inference on the CPU)."""
    global _available
    if not _use_packed(x, weight):
        return F.linear(x, weight, bias)
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
    cached = holder.__dict__.get(name)
    if cached is None or cached[0] != key:
        try:
            with torch.no_grad():
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        except RuntimeError:  # a build whose oneDNN lacks this path: use the default GEMM from now on
            _available = False
            return F.linear(x, weight, bias)
        holder.__dict__[name] = cached
    return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict keys) that runs float32 CPU inference through `packed_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self)
