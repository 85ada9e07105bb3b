"""Image and text generation with a static KV cache.

One request = `rows` images. With guidance the batch holds 2*rows sequences, [conditional; unconditional], each
with its own cache rows, run in one forward pass per token. On CUDA the per-token step (embedding, transformer,
head, guidance, sampling) is captured once in a CUDA graph and replayed (`stepper.Stepper`), and kept for the next
request of the same shape and settings (`stepper.POOL`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.token_step import decode_token
from . import cpu_step
from .sampling import SamplingOptions, sample
from .stepper import POOL, Stepper, stepper_key

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
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    use_graph = use_cuda_graph and prefix < total - 1
    # the stepper first: capturing its graph runs steps that write the cache, which the prefill then overwrites
    key = stepper_key(dalle, batch_text.shape[0], options, use_graph, compile_step)
    stepper = POOL.take(dalle, key)
    if stepper is not None and not stepper.fits(dalle):
        stepper = None
    if stepper is None:
        stepper = Stepper(dalle, dalle.new_cache(batch_text.shape[0]), seed_t, options, guided,
                          use_graph=use_graph, compile=compile_step)
    stepper.start(seed_t)
    next_ids = stepper.prefill(batch_text, full_prime[:, :prefix])

    out = full_prime.clone()
    text_len = dalle.text_seq_len + 1
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
    POOL.put(dalle, key, stepper)  # not after an error: it may have stopped mid-step
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
