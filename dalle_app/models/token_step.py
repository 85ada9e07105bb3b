"""One decoding step of the transformer in as few operations as possible, for eager decoding (the CPU).

On the CPU each PyTorch operation costs a fixed 2-50 us whatever its size, and a decoding step of a small model
is made of little else: on the built-in model the general `Transformer.forward` spends more time on module calls,
views and masks than on arithmetic. `decode_token` computes the same thing for one token at an integer position
with 2-D tensors, a precomputed rotation matrix, no masks for full attention and token shift as one concatenation
of slices; the engine uses it whenever the step is not captured or compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, FeedForward, Rotary
from .packed_linear import packed_linear
from .transformer import InferenceCache, Transformer, shift_index


def decode_token(t: Transformer, x: torch.Tensor, cache: InferenceCache, pos: int) -> torch.Tensor:
    """The token x (b, dim) at position `pos` through the stack `t`, reading and filling `cache`.

    Equals `t(x[:, None], cache=cache, start=pos)[:, 0]`; inference only (no dropout)."""
    return _TokenStep(t, cache, pos, x.dtype).run(x)


class _TokenStep:
    """What every layer of one step shares: the cache, the position, its rotation and its token-shift segments."""

    def __init__(self, t: Transformer, cache: InferenceCache, pos: int, dtype: torch.dtype):
        self.t, self.cache, self.pos = t, cache, pos
        self.rotation = Rotary(*t.rotary_cos_sin[:, pos:pos + 1]).matrix.to(dtype) if t.rotary else None
        self.shift = shift_segments(t, cache, pos) if t.shift else None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x2 = x
        for i, layer in enumerate(self.t.layers):
            if self.t.reversible:
                x1 = self.branch(layer.attn, x2, x1, 2 * i, lambda h: self.attend(i, layer.attn.module, h))
                x2 = self.branch(layer.ff, x1, x2, 2 * i + 1, lambda h: self.feed_forward(layer.ff.module, h))
            else:
                x = self.branch(layer.attn, x, x, 2 * i, lambda h: self.attend(i, layer.attn.module, h))
                x = self.branch(layer.ff, x, x, 2 * i + 1, lambda h: self.feed_forward(layer.ff.module, h))
        return (x1 + x2) / 2 if self.t.reversible else x

    def branch(self, branch, x, residual, history_index: int, module) -> torch.Tensor:
        """residual + scale * norm_out(module(shift(norm(x)))), as `Branch.forward`."""
        h = F.layer_norm(x, x.shape[-1:], branch.norm.weight, branch.norm.bias, branch.norm.eps)
        if self.shift is not None:
            history = self.cache.shifted[history_index]
            pieces = [history[:, row, lo:hi] if row is not None else h[:, lo:hi] for row, lo, hi in self.shift]
            history[:, self.pos] = h  # after the reads, which are of earlier positions (or of the zero row)
            h = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        h = module(h)
        if branch.norm_out is not None:
            h = branch.norm_out(h)
        return torch.addcmul(residual, h, branch.scale[0])

    def attend(self, i: int, attn, h: torch.Tensor) -> torch.Tensor:
        b, pos = h.shape[0], self.pos
        qkv = packed_linear(h, attn.to_qkv.weight, None, attn.to_qkv).view(b, 3, attn.heads, attn.dim_head)
        if self.rotation is not None:
            qkv = qkv @ self.rotation
        kv = self.cache.kv[i]  # (2, b, heads, max_len, dim_head)
        kv[:, :, :, pos] = qkv[:, 1:].transpose(0, 1)
        q = qkv[:, 0, :, None]  # (b, heads, 1, dim_head)
        mask = None
        if self.t.layer_types[i] != "full":  # this query's row of the layer's mask: (1 or heads, 1, keys)
            mask = self.t.layer_mask(i)[..., pos:pos + 1, :pos + 1]
        out = F.scaled_dot_product_attention(q, kv[0, :, :, :pos + 1], kv[1, :, :, :pos + 1], attn_mask=mask)
        return packed_linear(out.view(b, -1), attn.to_out.weight, attn.to_out.bias, attn.to_out)

    @staticmethod
    def feed_forward(ff, h: torch.Tensor) -> torch.Tensor:
        h, gates = packed_linear(h, ff.proj_in.weight, ff.proj_in.bias, ff.proj_in).chunk(2, dim=-1)
        return packed_linear(h * F.gelu(gates), ff.proj_out.weight, ff.proj_out.bias, ff.proj_out)


def plain_stack(dalle, cache: InferenceCache) -> bool:
    """Whether this model and cache have the shape the hand-written decoding steps (`engine.cpu_step`,
    `engine.gpu_step`) compute: a causal, non-reversible stack without the `stable` max-division, attention and
    GEGLU feed-forward modules, an even head size under rotary, and a token-shift history one row longer than the
    cache (its zero row)."""
    t = dalle.transformer
    if t.reversible or not isinstance(dalle.norm_by_max, nn.Identity) or not t.causal:
        return False
    if t.rotary and t.dim_head % 2:
        return False
    if cache.shifted is not None and cache.shifted[0].shape[1] != cache.kv[0].shape[3] + 1:
        return False
    return all(isinstance(layer.attn.module, Attention) and isinstance(layer.ff.module, FeedForward)
               for layer in t.layers)


def shift_segments(t: Transformer, cache: InferenceCache, pos: int) -> list[tuple[int | None, int, int]]:
    """Token shift of position pos as channel ranges: (history row, lo, hi), row None for the token itself.

    From the same `shift_index` rule as the general path, computed once per position and history length."""
    zero_row = cache.shifted[0].shape[1] - 1
    table = t.__dict__.setdefault("_shift_segments", {})
    key = (pos, zero_row)
    if key not in table:
        rows = shift_index(torch.tensor([pos]), t.text_len, t.fmap_size, t.dim, zero_row)[0].tolist()
        segments = []
        for c, row in enumerate(rows):
            source = None if row == pos else row
            if segments and segments[-1][0] == source:
                segments[-1][2] = c + 1
            else:
                segments.append([source, c, c + 1])
        table[key] = [tuple(s) for s in segments]
    return table[key]
