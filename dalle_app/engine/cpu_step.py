"""The CPU decoding step as one compiled C call (`cpu_step.c`), built on first use with the system's C compiler.

On a 2-core CPU an eager PyTorch step of the built-in model is ~300 operator calls whose fixed costs (2-50 us each)
outweigh their arithmetic; the whole step in C has one. `CpuStep` binds a model's weights and one request's cache
to the C structures once, then each call runs every layer and the image head for one token. It computes what
`decode_token` + `DALLE.image_logits` compute, in float32, up to rounding (tests compare the two).

The library is compiled with `cc -O3 -march=native` (OpenMP when the compiler has it) into
`$DALLE_APP_CACHE/cpu_step/` (default `~/.cache/dalle_app`), named by a hash of the source, the flags and the CPU, so
a build is reused by later runs and never by another kind of CPU. Without a compiler, or with
`DALLE_APP_CPU_KERNEL=0`, the engine keeps the PyTorch step; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models.token_step import plain_stack, shift_segments

SOURCE = Path(__file__).with_name("cpu_step.c")
ENV_SWITCH = "DALLE_APP_CPU_KERNEL"  # "0" turns the C step off
_reason: str | None = None


class _Branch(ctypes.Structure):
    _fields_ = [("norm_w", ctypes.c_void_p), ("norm_b", ctypes.c_void_p), ("norm_out_w", ctypes.c_void_p),
                ("norm_out_b", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("history", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("eps_out", ctypes.c_float)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn", _Branch), ("ff", _Branch), ("qkv_w", ctypes.c_void_p), ("out_w", ctypes.c_void_p),
                ("out_b", ctypes.c_void_p), ("in_w", ctypes.c_void_p), ("in_b", ctypes.c_void_p),
                ("proj_w", ctypes.c_void_p), ("proj_b", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                ("mask_heads", ctypes.c_int64), ("mask_seq", ctypes.c_int64), ("kv", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "dim", "heads", "dim_head", "hidden", "depth", "max_len",
                                                      "n_out", "threads")] + [
        ("layers", ctypes.POINTER(_Layer)), ("head_norm_w", ctypes.c_void_p), ("head_norm_b", ctypes.c_void_p),
        ("head_w", ctypes.c_void_p), ("head_b", ctypes.c_void_p), ("head_eps", ctypes.c_float)]


def _cpu_signature() -> str:
    """What the compiled code depends on: the machine and, on Linux, the CPU model and instruction-set flags."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            parts += [line for line in f if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        pass
    return "".join(parts)


def _cache_dir() -> Path:
    root = os.environ.get("DALLE_APP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "dalle_app")
    return Path(root) / "cpu_step"


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile SOURCE into target (atomically: concurrent builds do not see half a file); None or the error text."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip().splitlines()[-1:] or ["failed"]
        os.replace(built, target)
    return None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled step, built on the first call of a process if no build for this CPU exists; None if it cannot be
    built or loaded here (see `unavailable_reason`)."""
    global _reason
    _reason = None
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason = f"{ENV_SWITCH}=0"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler or not shutil.which(compiler):
        _reason = "no C compiler found (install gcc, or set CC)"
        return None
    source = SOURCE.read_bytes()
    attempts = [["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"]]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"cpu_step_{key}.so"
        try:
            if not target.exists():
                error = _compile(compiler, flags, target)
                if error is not None:
                    errors.append(f"{' '.join(flags)}: {error[0]}")
                    continue
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        lib.dalle_panel_width.restype = ctypes.c_int
        lib.dalle_sample.restype = ctypes.c_int
        lib.dalle_sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_float,
                                     ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.dalle_step.restype = ctypes.c_int
        lib.dalle_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        return lib
    _reason = "the C step did not build: " + "; ".join(errors)
    return None


def unavailable_reason() -> str | None:
    """Why `library()` is None (after it was called), else None."""
    return _reason


def packed_weight(weight: torch.Tensor, holder: nn.Module, name: str = "_c_step_weight") -> torch.Tensor:
    """`weight` (n, k) laid out for the C step's products: panels of `dalle_panel_width()` outputs, (panels, k, width),
    zero-padded. Kept on `holder` and rebuilt when the weight changes (new tensor or in-place update)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = holder.__dict__.get(name)
    if cached is None or cached[0] != key:
        width = library().dalle_panel_width()
        n, k = weight.shape
        padded = torch.zeros((n + width - 1) // width * width, k, dtype=torch.float32)
        padded[:n] = weight.detach()
        cached = (key, padded.view(-1, width, k).transpose(1, 2).contiguous())
        holder.__dict__[name] = cached
    return cached[1]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def supports(dalle, cache) -> bool:
    """Whether the C step computes this model's decoding step over this cache: float32 on the CPU, contiguous
    buffers, a non-reversible stack without the `stable` max-division, GEGLU feed-forwards, an even head size
    with rotary (`plain_stack`); and the library built."""
    tensors = [*cache.kv, *(cache.shifted or []), *dalle.parameters()]
    if any(x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() for x in tensors):
        return False
    return plain_stack(dalle, cache) and library() is not None


class CpuStep:
    """One request's decoding step in C: `step(x, pos)` runs the tokens x (batch, dim) at position pos through the
    stack, filling `cache`, and returns the image logits (batch, num_image_tokens). Check `supports` first."""

    def __init__(self, dalle, cache, threads: int | None = None):
        t = dalle.transformer
        self.t, self.cache = t, cache  # not dalle: see stepper.StepperPool
        self._lib = library()
        self._keep = []  # tensors whose memory the C structures point into
        batch = cache.kv[0].shape[1]
        layers = (_Layer * t.depth)()
        for i, layer in enumerate(t.layers):
            attn, ff = layer.attn.module, layer.ff.module
            mask = None
            if t.layer_types[i] != "full":
                mask = self._hold(t.layer_mask(i).to(torch.bool).contiguous())
            layers[i] = _Layer(
                self._branch(layer.attn, cache.shifted[2 * i] if cache.shifted else None),
                self._branch(layer.ff, cache.shifted[2 * i + 1] if cache.shifted else None),
                self._packed(attn.to_qkv), self._packed(attn.to_out), _ptr(attn.to_out.bias),
                self._packed(ff.proj_in), _ptr(ff.proj_in.bias), self._packed(ff.proj_out), _ptr(ff.proj_out.bias),
                _ptr(mask), (mask.shape[0] if mask is not None and mask.dim() == 3 else 1),
                (mask.shape[-1] if mask is not None else 0), _ptr(cache.kv[i]))
        norm, proj = dalle.to_logits
        n_text = dalle.num_text_tokens
        head_w = self._hold(packed_weight(proj.weight[n_text:], proj, "_c_step_image_head"))
        head_b = self._hold(proj.bias[n_text:].contiguous())
        hidden = t.layers[0].ff.module.proj_out.weight.shape[1]
        self.n_out = dalle.num_image_tokens
        self._model = _Model(batch, t.dim, t.heads, t.dim_head, hidden, t.depth, cache.kv[0].shape[3], self.n_out,
                             threads or torch.get_num_threads(), layers, _ptr(norm.weight), _ptr(norm.bias),
                             _ptr(head_w), _ptr(head_b), norm.eps)
        self._layers = layers
        self.batch = batch
        self._positions: dict[int, tuple] = {}

    def _packed(self, linear: nn.Linear) -> int:
        return self._hold(packed_weight(linear.weight, linear)).data_ptr()

    def _hold(self, tensor: torch.Tensor) -> torch.Tensor:
        self._keep.append(tensor)
        return tensor

    @staticmethod
    def _branch(branch, history) -> _Branch:
        out = branch.norm_out
        return _Branch(_ptr(branch.norm.weight), _ptr(branch.norm.bias), _ptr(out.weight if out else None),
                       _ptr(out.bias if out else None), _ptr(branch.scale), _ptr(history), branch.norm.eps,
                       out.eps if out else 0.0)

    def _position(self, pos: int) -> tuple:
        """The per-position arguments: rotary cos and sin, token-shift segments and their count (kept alive here)."""
        if pos not in self._positions:
            t = self.t
            cos = sin = segments = None
            if t.rotary:
                cos, sin = (c.contiguous() for c in t.rotary_cos_sin[:, pos])
            if t.shift:
                rows = [(-1 if row is None else row, lo, hi) for row, lo, hi in shift_segments(t, self.cache, pos)]
                segments = torch.tensor(rows, dtype=torch.int32)
            self._positions[pos] = ((cos, sin, segments), _ptr(cos), _ptr(sin), _ptr(segments),
                                    len(segments) if segments is not None else 0)
        return self._positions[pos][1:]

    def sample(self, logits: torch.Tensor, seeds: torch.Tensor, position: int, temperature: float,
               top_k: int | None, cond_scale: float | None = None) -> torch.Tensor:
        """`sampling.sample_plain(guide(logits, cond_scale), ...)` without top-p, in one C call: one token (rows,)
        per image from logits (rows, vocab), or (2 * rows, vocab) [conditional; unconditional] with cond_scale."""
        logits = logits.to(torch.float32).contiguous()
        seeds = seeds.to(torch.int64).contiguous()
        rows = seeds.shape[0]
        if logits.shape[0] != rows * (2 if cond_scale is not None else 1):
            raise ValueError(f"got {logits.shape[0]} rows of logits for {rows} seeds.")
        out = torch.empty(rows, dtype=torch.int64)
        status = self._lib.dalle_sample(logits.data_ptr(), rows, logits.shape[1], cond_scale is not None,
                                        1.0 if cond_scale is None else cond_scale, temperature, top_k or 0,
                                        seeds.data_ptr(), position, out.data_ptr())
        if status != 0:
            raise MemoryError("the CPU sampler could not allocate its scratch memory.")
        return out

    def __call__(self, x: torch.Tensor, pos: int, with_logits: bool = True) -> torch.Tensor:
        """Image logits (batch, num_image_tokens) for the tokens x (batch, dim) at position pos; with
        with_logits=False the hidden states (batch, dim) instead."""
        if x.shape != (self.batch, self.t.dim):
            raise ValueError(f"expected tokens of shape ({self.batch}, {self.t.dim}), got {tuple(x.shape)}.")
        if not 0 <= pos < self._model.max_len:
            raise ValueError(f"position {pos} is outside the cache (0..{self._model.max_len - 1}).")
        x = x.to(torch.float32, copy=True).contiguous()  # the C step overwrites it
        logits = torch.empty(self.batch, self.n_out) if with_logits else None
        status = self._lib.dalle_step(ctypes.byref(self._model), x.data_ptr(), pos, *self._position(pos),
                                      _ptr(logits))
        if status != 0:
            raise MemoryError("the CPU decoding step could not allocate its scratch memory.")
        return logits if with_logits else x
