"""Sampling pieces: per-image counter-based noise, top-k / top-p filtering, classifier-free guidance.

Noise is a hash of (seed, position, token id), not a draw from a shared RNG stream, so an image's tokens depend
only on its own seed and settings: the same whatever else is in the batch, however the batch is split, and
inside a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK62 = (1 << 62) - 1
_C1, _C2, _C3 = 0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB


@dataclass
class SamplingOptions:
    """How to pick each token.

    temperature: softmax temperature (> 0). top_k: keep the k most likely image codes (None = all).
    filter_thres: DALLE-pytorch's filter, keep (1 - filter_thres) of the *whole* vocabulary; used only when top_k
    is None. top_p: nucleus sampling mass (None = off). cond_scale: classifier-free guidance scale (1 = off).
    """

    temperature: float = 1.0
    top_k: int | None = None
    filter_thres: float | None = None
    top_p: float | None = None
    cond_scale: float = 1.0

    def validate(self) -> "SamplingOptions":
        """Raise ValueError with a plain sentence when a setting is out of range."""
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or empty for no limit), got {self.top_k}.")
        if self.filter_thres is not None and not 0 <= self.filter_thres < 1:
            raise ValueError(f"filter_thres must be in [0, 1), got {self.filter_thres}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not (self.cond_scale == self.cond_scale and abs(self.cond_scale) < 1e4):
            raise ValueError(f"cond_scale must be a finite number, got {self.cond_scale}.")
        return self

    def effective_top_k(self, vocab: int, total_tokens: int) -> int | None:
        """The k to apply over a `vocab`-sized candidate set (None = no top-k)."""
        if self.top_k is not None:
            return min(self.top_k, vocab)
        if self.filter_thres is not None:
            k = max(int((1 - self.filter_thres) * total_tokens), 1)
            return k if k < vocab else None
        return None


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 62-bit integer mixer (splitmix-style) on int64 tensors, kept non-negative."""
    x = (x ^ (x >> 31)) * _C2 & _MASK62
    x = (x ^ (x >> 29)) * _C3 & _MASK62
    return x ^ (x >> 32)


def uniform_noise(seeds: torch.Tensor, position, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise (rows, vocab) determined by each row's seed, the position and the token id."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    position = torch.as_tensor(position, dtype=torch.long, device=seeds.device)
    x = (seeds[:, None] * _C1 + _mix(position * _C2 + ids[None, :] + 1)) & _MASK62
    x = _mix(x)
    return (((x >> 38) & 0xFFFFFF).float() + 0.5) / float(1 << 24)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf (the most likely token always survives)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seeds: torch.Tensor, position, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """Gumbel-max sample (rows,) from logits (rows, vocab): exact sampling from softmax(filtered logits / T).

    On CUDA, top-k without top-p runs as one fused kernel (`fused_sample`) that picks the same tokens."""
    if top_k is not None and top_k < logits.shape[-1] and top_p is None and fused_sample.available(logits):
        return fused_sample.sample_top_k(logits, seeds, position, temperature, top_k)
    return sample_plain(logits, seeds, position, temperature, top_k, top_p)


def sample_plain(logits: torch.Tensor, seeds: torch.Tensor, position, temperature, top_k=None, top_p=None):
    """`sample` in plain PyTorch operations, on any device."""
    logits = filter_logits(logits.float(), top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, position, logits.shape[-1])))
    return (logits / temperature + gumbel).argmax(dim=-1)


def guide(logits: torch.Tensor, cond_scale) -> torch.Tensor:
    """Classifier-free guidance on stacked rows [conditional; unconditional]: null + (cond - null) * scale."""
    cond, null = logits.chunk(2, dim=0)
    return null + (cond - null) * cond_scale


from . import fused_sample  # noqa: E402  (it reads the noise constants above)
