"""One decoding step for all rows of a request, and the captured steps kept for the next request.

`Stepper` feeds the image token of every row at a position and returns the next sampled token of each. On CUDA it
captures the step once in a CUDA graph (the Triton step, `gpu_step`, where it applies; else the PyTorch step, or
torch.compile's) and then replays it for every position; on the CPU it calls the C step (`cpu_step`) where it
applies. A stepper owns its request's KV cache, and on CUDA it captures the prefill too (once per number of given
image tokens). Building one costs two warm-up steps, a capture and an eager prefill (~45 ms of a one-image request
on an H100), so `POOL` keeps the last few per model, and a request of the same batch and sampling settings takes one
over: its prefill rewrites the part of the cache that the request reads.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from ..models.token_step import decode_token
from ..models.transformer import InferenceCache
from . import cpu_step, gpu_step
from .sampling import SamplingOptions, guide, sample


def decode_step(dalle, kv, shifted, seeds, ids, pos, guided, cond_scale, temperature, top_k, top_p,
                 fused_step=None):
    """Feed image tokens ids (rows, 1) at sequence position pos; return the next sampled image token per row.
    fused_step: a `cpu_step.CpuStep` or `gpu_step.GpuStep` over this cache, which then runs the transformer and the
    head (and the CpuStep, without top-p, guidance and sampling)."""
    text_len = dalle.text_seq_len + 1
    feed = ids.repeat(2, 1) if guided else ids
    img_pos = pos - text_len
    x = dalle.embed_image(feed, img_pos)
    cache = InferenceCache(kv, shifted)
    if fused_step is not None:  # one C call on the CPU, five Triton kernels a layer on CUDA
        logits = fused_step(x[:, -1], pos)
        if top_p is None and isinstance(fused_step, cpu_step.CpuStep):  # and the sampling in another C call
            return fused_step.sample(logits, seeds, img_pos + 1, temperature, top_k, cond_scale if guided else None)
    elif torch.is_tensor(pos):  # captured or compiled: one program for every position
        logits = dalle.image_logits(dalle.transformer(x, cache=cache, start=pos)[:, -1])
    else:  # eager: the same step in far fewer operations
        logits = dalle.image_logits(decode_token(dalle.transformer, x[:, -1], cache, pos))
    if guided:
        logits = guide(logits, cond_scale)
    # noise position = index of the token being chosen
    return sample(logits, seeds, img_pos + 1, temperature, top_k, top_p)


_COMPILED: dict = {}


def _compiled_step(mode: str | None = None):
    """`decode_step` through torch.compile (`mode`: a torch.compile mode, None for the default): one program per
    batch shape, the cache updated in place, the step's many small kernels fused. Requests come in many batch
    sizes, hence the raised recompile limit."""
    if mode not in _COMPILED:
        import torch._dynamo
        import torch._inductor.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # tunes the block sizes of the generated GPU kernels: on an H200 the community shape went from 0.271 s to
        # 0.255 s (8 guided images) and 0.233 s to 0.227 s (1), session 7; no effect on CPU code
        torch._inductor.config.coordinate_descent_tuning = True
        _COMPILED[mode] = torch.compile(decode_step, dynamic=False, mode=mode)
    return _COMPILED[mode]


class Stepper:
    """Runs one decoding step for all rows over `cache`: `stepper(ids, pos)` feeds the image tokens ids (rows, 1)
    at sequence position pos and returns the next sampled token of each row. seeds: (rows,) long tensor, the
    stepper's own (`start` sets new values for another request). Built for one model, which it holds weakly (see
    `StepperPool`)."""

    def __init__(self, dalle, cache, seeds, options: SamplingOptions, guided: bool, use_graph: bool,
                 compile: bool | str = False):
        self._dalle = weakref.ref(dalle)
        self.cache, self.seeds, self.guided, self.compile = cache, seeds, guided, compile
        self.options = options
        self.top_k = options.effective_top_k(dalle.num_image_tokens, dalle.total_tokens)
        self.graph = None
        self.notes: list[str] = []
        self._first_step = True
        self._use_graph = use_graph
        kind = self._fused_kind(dalle)
        self.fused_step = kind(dalle, cache) if kind is not None else None
        # the position as a tensor: one graph or compiled program serves every position
        self.static_pos = torch.full((1,), dalle.text_seq_len + 1, dtype=torch.long, device=seeds.device)
        self._prefills: dict = {}  # captured prefills by number of given image tokens
        if use_graph:
            self._capture()

    def _fused_kind(self, dalle):
        """The hand-written step to use for this model and cache: the C step (CPU, no graph), the Triton step
        (CUDA, not compiled) or None (the PyTorch step)."""
        if not self._use_graph and not self.compile and cpu_step.supports(dalle, self.cache):
            return cpu_step.CpuStep
        if not self.compile and gpu_step.supports(dalle, self.cache):
            return gpu_step.GpuStep
        return None

    def fits(self, dalle) -> bool:
        """Whether this kept stepper runs the step a new one would now (a step switched off since does not)."""
        running = type(self.fused_step) if self.fused_step is not None else None
        return running is self._fused_kind(dalle)

    def start(self, seeds: torch.Tensor) -> None:
        """Begin another request: these seeds (copied into the captured ones) and no notes yet. The caller then
        fills the cache up to the first position to step (the prefill)."""
        self.seeds.copy_(seeds)
        self.notes = []

    def prefill(self, text: torch.Tensor, prefix_ids: torch.Tensor) -> torch.Tensor:
        """Run [bos, text, given image tokens] of every row into the cache and sample the image token after them:
        (rows,) ids. text: (cache rows, T), the unconditional rows included with guidance; prefix_ids: (rows, n),
        the leading image tokens kept. With a CUDA graph the prefill is captured too, once per n."""
        if self.graph is None:
            return self._prefill(text, prefix_ids)
        n = prefix_ids.shape[1]
        if n not in self._prefills:  # the first one runs as it is (warming up what it uses), then is captured
            result = self._prefill(text, prefix_ids)
            self._prefills[n] = self._capture_prefill(text, prefix_ids)
            return result
        if self._prefills[n] is None:  # could not be captured
            return self._prefill(text, prefix_ids)
        graph, static_text, static_prefix, static_out = self._prefills[n]
        static_text.copy_(text)
        static_prefix.copy_(prefix_ids)
        graph.replay()
        return static_out.clone()

    def _prefill(self, text, prefix_ids):
        dalle, o = self._dalle(), self.options
        tokens = dalle.embed(text, prefix_ids.repeat(2, 1) if self.guided else prefix_ids)
        hidden = dalle.transformer(tokens, cache=self.cache, start=0)
        logits = dalle.image_logits(hidden[:, -1])
        if self.guided:
            logits = guide(logits, o.cond_scale)
        return sample(logits, self.seeds, prefix_ids.shape[1], o.temperature, self.top_k, o.top_p)

    def _capture_prefill(self, text, prefix_ids):
        """(graph, text, prefix ids, output) of a captured prefill, or None where it cannot be captured."""
        static_text, static_prefix = text.clone(), prefix_ids.clone()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._prefill(static_text, static_prefix)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - e.g. an operation that waits for the host: the prefill then runs as it is
            return None
        return graph, static_text, static_prefix, static_out

    def _run_step(self, ids, pos):
        mode = self.compile if isinstance(self.compile, str) else None
        step = _compiled_step(mode) if self.compile else decode_step
        c, o = self.cache, self.options

        def run():
            return step(self._dalle(), c.kv, c.shifted, self.seeds, ids, pos, self.guided, o.cond_scale, o.temperature,
                        self.top_k, o.top_p, self.fused_step)

        if not isinstance(self.fused_step, gpu_step.GpuStep) or not self._first_step:
            return run()
        try:  # its first step builds its kernels, which an older GPU or Triton may refuse
            result = run()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the cause, the PyTorch step computes the same
            gpu_step.disable(error)
            self.notes.append("The Triton decoding step failed on this GPU, so the PyTorch step was used "
                              f"({gpu_step.disabled_reason}).")
            self.fused_step = None  # it wrote only this position's cache entries, which the PyTorch step rewrites
            return run()
        self._first_step = False
        return result

    def _capture(self):
        dev = self.seeds.device
        self.static_ids = torch.zeros(len(self.seeds), 1, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels outside the graph
            for _ in range(2):
                self._run_step(self.static_ids, self.static_pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._run_step(self.static_ids, self.static_pos)

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.graph is None:
            tensor_pos = self.compile or isinstance(self.fused_step, gpu_step.GpuStep)
            return self._run_step(ids, self.static_pos.fill_(pos) if tensor_pos else pos)
        self.static_ids.copy_(ids)
        self.static_pos.fill_(pos)
        self.graph.replay()
        return self.static_out.clone()


class StepperPool:
    """Idle steppers kept per model, at most `keep` each (least recently used dropped first), for the next request
    with the same key. A stepper is taken out while a request uses it, so two requests never share one (the
    scheduler may pause a request between tokens). Models are held weakly: a model no longer used elsewhere is
    freed with its steppers."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._idle: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def take(self, dalle, key) -> Stepper | None:
        """The idle stepper of this model and key, removed from the pool; None if there is none."""
        with self._lock:
            return self._idle.get(dalle, {}).pop(key, None)

    def put(self, dalle, key, stepper: Stepper) -> None:
        """Keep a stepper whose request finished, for the next request with this key."""
        if self.keep < 1:
            return
        with self._lock:
            idle = self._idle.setdefault(dalle, OrderedDict())
            idle[key] = stepper
            idle.move_to_end(key)
            while len(idle) > self.keep:
                idle.popitem(last=False)

    def clear(self) -> int:
        """Drop every idle stepper (their caches and graphs), e.g. to free GPU memory; how many were dropped."""
        with self._lock:
            dropped = sum(len(idle) for idle in self._idle.values())
            self._idle = weakref.WeakKeyDictionary()
        return dropped


POOL = StepperPool()


def stepper_key(dalle, rows: int, options: SamplingOptions, use_graph: bool, compile: bool | str) -> tuple:
    """What a stepper was built for: rows, sampling settings (captured as constants), how it runs, the Triton
    step's launch settings, and where the model's weights are (a model moved or cast gets new steppers). Which step
    it runs (C, Triton or PyTorch) is not part of it: `Stepper.fits` checks that."""
    where = tuple(t.data_ptr() for t in (*dalle.parameters(), *dalle.buffers()))
    return (rows, options.cond_scale, options.temperature, options.top_k, options.filter_thres, options.top_p,
            use_graph, compile, gpu_step.launch_settings(), hash(where))
