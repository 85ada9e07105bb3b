"""Image and text generation with a static KV cache.

One request = `rows` images. With guidance the batch holds 2*rows sequences, [conditional; unconditional], each
with its own cache rows, run in one forward pass per token. On CUDA the per-token step (embedding, transformer,
head, guidance, sampling) is captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.token_step import decode_token
from ..models.transformer import InferenceCache
from . import cpu_step, gpu_step
from .sampling import SamplingOptions, guide, sample

ProgressFn = Callable[["Progress"], None]


@dataclass
class Progress:
    """What a progress callback receives every few tokens."""

    done: int  # image tokens decided so far (per image)
    total: int  # image tokens per image
    elapsed: float  # seconds since the start
    image_ids: torch.Tensor  # (rows, done) tokens so far, raster order

    @property
    def tokens_per_second(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def seconds_left(self) -> float:
        rate = self.tokens_per_second
        return (self.total - self.done) / rate if rate > 0 else float("inf")


@dataclass
class ImageTokens:
    """Result of `generate_image_tokens`: (rows, tokens) ids, complete unless cancelled."""

    image_ids: torch.Tensor
    seeds: list[int]
    completed: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class TextTokens:
    """Result of `complete_text`: (rows, text_seq_len) ids, 0 = padding; complete unless stopped."""

    token_ids: torch.Tensor
    seeds: list[int]
    completed: bool = True


def _seed_tensor(seeds, rows, device):
    if seeds is None:
        seeds = torch.randint(0, 2 ** 31 - 1, (rows,)).tolist()
    seeds = [int(s) for s in seeds]
    if len(seeds) != rows:
        raise ValueError(f"got {len(seeds)} seeds for {rows} images; give one seed per image.")
    return seeds, torch.tensor(seeds, dtype=torch.long, device=device)


def _decode_step(dalle, kv, shifted, seeds, ids, pos, guided, cond_scale, temperature, top_k, top_p,
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
    """`_decode_step` through torch.compile (`mode`: a torch.compile mode, None for the default): one program per
    batch shape, the cache updated in place, the step's many small kernels fused. Requests come in many batch
    sizes, hence the raised recompile limit."""
    if mode not in _COMPILED:
        import torch._dynamo
        import torch._inductor.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # tunes the block sizes of the generated GPU kernels: on an H200 the community shape went from 0.271 s to
        # 0.255 s (8 guided images) and 0.233 s to 0.227 s (1), session 7; no effect on CPU code
        torch._inductor.config.coordinate_descent_tuning = True
        _COMPILED[mode] = torch.compile(_decode_step, dynamic=False, mode=mode)
    return _COMPILED[mode]


class _Stepper:
    """Runs one decoding step for all rows: feed image token at position `pos`, return the next sampled token."""

    def __init__(self, dalle, cache, seeds, options: SamplingOptions, guided: bool, use_graph: bool,
                 compile: bool | str = False):
        self.dalle, self.cache, self.seeds, self.guided, self.compile = dalle, cache, seeds, guided, compile
        self.options = options
        self.top_k = options.effective_top_k(dalle.num_image_tokens, dalle.total_tokens)
        self.graph = None
        self.notes: list[str] = []
        self._first_step = True
        eager = not use_graph and not compile
        self.fused_step = None
        if eager and cpu_step.supports(dalle, cache):
            self.fused_step = cpu_step.CpuStep(dalle, cache)
        elif not compile and gpu_step.supports(dalle, cache):
            self.fused_step = gpu_step.GpuStep(dalle, cache)
        # the position as a tensor: one graph or compiled program serves every position
        self.static_pos = torch.full((1,), dalle.text_seq_len + 1, dtype=torch.long, device=seeds.device)
        if use_graph:
            self._capture()

    def _run_step(self, ids, pos):
        mode = self.compile if isinstance(self.compile, str) else None
        step = _compiled_step(mode) if self.compile else _decode_step
        c, o = self.cache, self.options

        def run():
            return step(self.dalle, c.kv, c.shifted, self.seeds, ids, pos, self.guided, o.cond_scale, o.temperature,
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


def _in_inference_mode(fn):
    """Run fn under torch.inference_mode, which skips autograd's per-operation bookkeeping (about 10% of a CPU
    decoding step), and hand back its tensors as ordinary ones, which callers may modify in place."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            result = fn(*args, **kwargs)
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            if torch.is_tensor(value):
                setattr(result, f.name, value.clone())
        return result

    return wrapper


@_in_inference_mode
def generate_image_tokens(dalle, text: torch.Tensor, options: SamplingOptions | None = None, *, seeds=None,
                          prime_ids: torch.Tensor | None = None, keep_mask: torch.Tensor | None = None,
                          progress: ProgressFn | None = None, progress_every: int = 16,
                          should_stop: Callable[[], bool] | None = None, use_cuda_graph: bool | None = None,
                          compile_step: bool | str = False) -> ImageTokens:
    """Sample image tokens for each row of `text` (rows, T) (0 = padding; repeat rows for several images each).

    prime_ids: (rows, k) leading tokens to keep (DALLE-pytorch's num_init_img_tokens), or (rows, I) together with
    keep_mask (I,) bool: kept positions take the given ids, the others are sampled, in raster order.
    seeds: one int per row (None = random); returned in the result. progress: called every `progress_every` tokens
    with a Progress; should_stop: polled between tokens, generation then returns the tokens decided so far.
    use_cuda_graph: capture the step in a CUDA graph (default: on CUDA). compile_step: fuse the step with
    torch.compile first (True, or a torch.compile mode such as "max-autotune-no-cudagraphs"); the first call per
    batch shape then compiles for a while.
    """
    options = (options or SamplingOptions()).validate()
    dalle_was_training = dalle.training
    dalle.eval()
    device = next(dalle.parameters()).device
    rows, total = text.shape[0], dalle.image_seq_len
    text = text.to(device)
    seeds, seed_t = _seed_tensor(seeds, rows, device)
    guided = options.cond_scale != 1

    # which image positions are given rather than sampled
    given = torch.zeros(total, dtype=torch.bool, device=device)
    full_prime = torch.zeros(rows, total, dtype=torch.long, device=device)
    if prime_ids is not None:
        prime_ids = prime_ids.to(device).long()
        if keep_mask is None:
            given[:prime_ids.shape[1]] = True
            full_prime[:, :prime_ids.shape[1]] = prime_ids
        else:
            given = keep_mask.to(device).bool().flatten()
            full_prime = prime_ids
        if given.all():
            return ImageTokens(full_prime.clone(), seeds, True, 0.0, ["every image token was kept; nothing to sample"])
    prefix = int(given.long().cumprod(0).sum())  # leading run of given tokens goes into the prefill

    start_time = time.perf_counter()
    batch_text = torch.cat([text, torch.zeros_like(text)]) if guided else text
    cache = dalle.new_cache(batch_text.shape[0])
    prefix_ids = full_prime[:, :prefix]
    tokens = dalle.embed(batch_text, prefix_ids.repeat(2, 1) if guided else prefix_ids)
    hidden = dalle.transformer(tokens, cache=cache, start=0)
    logits = dalle.image_logits(hidden[:, -1])
    if guided:
        logits = guide(logits, options.cond_scale)
    top_k = options.effective_top_k(dalle.num_image_tokens, dalle.total_tokens)
    next_ids = sample(logits, seed_t, prefix, options.temperature, top_k, options.top_p)

    out = full_prime.clone()
    text_len = dalle.text_seq_len + 1
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    stepper = _Stepper(dalle, cache, seed_t, options, guided, use_graph=use_cuda_graph and prefix < total - 1,
                       compile=compile_step)
    completed = True
    given_list = given.tolist()  # host copy: no device sync inside the loop
    for j in range(prefix, total):
        if not given_list[j]:
            out[:, j] = next_ids
        if progress is not None and ((j + 1 - prefix) % progress_every == 0 or j == total - 1):
            progress(Progress(j + 1, total, time.perf_counter() - start_time, out[:, :j + 1]))
        if j == total - 1:
            break
        if should_stop is not None and should_stop():
            out = out[:, :j + 1]
            completed = False
            break
        next_ids = stepper(out[:, j:j + 1], text_len + j)
    dalle.train(dalle_was_training)
    return ImageTokens(out, seeds, completed, time.perf_counter() - start_time, stepper.notes)


@_in_inference_mode
def complete_text(dalle, prefixes: list[list[int]], options: SamplingOptions | None = None, *, seeds=None,
                  should_stop: Callable[[], bool] | None = None) -> TextTokens:
    """Continue each token-id prefix up to text_seq_len tokens; a sampled pad id ends that row's text.
    should_stop: polled between tokens; the texts then end where they are (completed False)."""
    options = (options or SamplingOptions()).validate()
    was_training = dalle.training
    dalle.eval()
    device = next(dalle.parameters()).device
    rows, T = len(prefixes), dalle.text_seq_len
    seeds, seed_t = _seed_tensor(seeds, rows, device)
    text = torch.zeros(rows, T, dtype=torch.long, device=device)
    lengths = []
    for r, p in enumerate(prefixes):
        p = list(p)[:T]
        text[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        lengths.append(len(p))
    start = min(lengths)
    prepared = dalle.prepare_text(text)  # (rows, T+1) with bos
    cache = dalle.new_cache(rows)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    completed = True
    top_k = options.effective_top_k(dalle.num_text_tokens, dalle.total_tokens)
    hidden = dalle.transformer(dalle.embed_text(prepared[:, :start + 1]), cache=cache, start=0)
    c_step = cpu_step.CpuStep(dalle, cache) if cpu_step.supports(dalle, cache) else None
    for pos in range(start, T):  # hidden at position pos predicts text token pos (0-based)
        logits = dalle.logits(hidden[:, -1:], pos)[:, 0, :dalle.num_text_tokens]
        logits[:, 0] = float("-inf")  # id 0 is padding, never a real token
        token = sample(logits, seed_t, pos, options.temperature, top_k, options.top_p)
        given = torch.tensor([pos < n for n in lengths], device=device)
        token = torch.where(given, text[:, pos], token)
        finished |= ~given & (token >= dalle.vocab_text)
        text[:, pos] = torch.where(finished, torch.zeros_like(token), token)
        if bool(finished.all()) or pos == T - 1:
            break
        if should_stop is not None and should_stop():
            completed = False
            break
        step_ids = torch.where(text[:, pos] == 0, dalle.vocab_text + pos, text[:, pos])
        x = dalle.embed_text(step_ids[:, None], pos + 1)[:, 0]
        if c_step is not None:
            hidden = c_step(x, pos + 1, with_logits=False)[:, None]
        else:
            hidden = decode_token(dalle.transformer, x, cache, pos + 1)[:, None]
    dalle.train(was_training)
    return TextTokens(text, seeds, completed)
