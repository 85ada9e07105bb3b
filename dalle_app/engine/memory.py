"""Memory planning: estimate what a request needs, and split it when the GPU runs out."""

from __future__ import annotations

from typing import Callable

import torch

from .generate import ImageTokens, generate_image_tokens
from .stepper import POOL


def estimate_request_bytes(dalle, rows: int, guided: bool, dtype_bytes: int | None = None) -> int:
    """Bytes of cache and activations one generate_image_tokens call needs beyond the weights (an upper estimate)."""
    t = dalle.transformer
    p = next(dalle.parameters())
    dtype_bytes = dtype_bytes or p.element_size()
    seqs = rows * (2 if guided else 1)
    L = dalle.total_seq_len
    kv = 2 * t.depth * seqs * t.heads * L * t.dim_head * dtype_bytes
    shift = (2 * t.depth * seqs * L * t.dim * dtype_bytes) if t.shift else 0
    # prefill activations: qkv, attention scores (heads x L x L) and the 8x-wide feed-forward of one layer
    prefill = seqs * L * (3 * t.heads * t.dim_head + 8 * t.dim) * dtype_bytes + seqs * t.heads * L * L * 4
    logits = seqs * dalle.total_tokens * 4 * 4
    return kv + shift + prefill + logits


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def generate_in_chunks(dalle, text: torch.Tensor, options, *, seeds, chunk_size: int | None = None,
                       generate: Callable = generate_image_tokens, **kwargs) -> ImageTokens:
    """Run generate_image_tokens over the rows in chunks; on out-of-memory, halve the chunk and retry.

    Because every image's noise depends only on its own seed, the split does not change any image.
    The result's `notes` say when the request had to be split. Before the first split, the steppers kept for later
    requests (`stepper.POOL`, caches and graphs) are dropped and the same chunk is tried again.
    """
    rows = text.shape[0]
    seeds = [int(s) for s in seeds]
    chunk = min(chunk_size or rows, rows)
    notes: list[str] = []
    while True:
        try:
            parts, seconds, completed = [], 0.0, True
            for lo in range(0, rows, chunk):
                hi = min(lo + chunk, rows)
                sub_kwargs = dict(kwargs)
                if sub_kwargs.get("prime_ids") is not None:
                    sub_kwargs["prime_ids"] = sub_kwargs["prime_ids"][lo:hi]
                part = generate(dalle, text[lo:hi], options, seeds=seeds[lo:hi], **sub_kwargs)
                parts.append(part.image_ids)
                seconds += part.seconds
                completed &= part.completed
                if not part.completed:
                    break
            n = min(p.shape[1] for p in parts)
            ids = torch.cat([p[:, :n] for p in parts])
            return ImageTokens(ids, seeds[:ids.shape[0]], completed, seconds, notes)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            kept = POOL.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if kept:
                continue
            if chunk == 1:
                raise MemoryError("The GPU ran out of memory even for one image at a time; free GPU memory "
                                  "or use a smaller model or the CPU.") from err
            chunk = max(1, chunk // 2)
            notes.append(f"GPU memory ran out; retried in chunks of {chunk} images.")
