"""Attention for the DALLE-pytorch family, with every attention pattern expressed as a dense boolean mask.

DALLE-pytorch computes `axial_row`, `axial_col`, `conv_like` and DeepSpeed `sparse` attention with special kernels.
Here each pattern is a static (seq, seq) "may attend" mask over the token layout [bos, text..., image...], which
gives the same result as those kernels, needs no DeepSpeed, and makes every layer KV-cacheable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_kernels
from .packed_linear import Linear

ATTENTION_TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")
CONV_WINDOWS = ("above_left", "centered")
SPARSE_BLOCK = 16


def attention_mask(kind: str, text_len: int, fmap_size: int, seq_len: int, conv_like_window: str = "above_left") -> torch.Tensor:
    """Boolean (seq_len, seq_len) mask, True where query i may attend to key j, for a causal DALLE layer.

    Positions `< text_len` are bos and text; the rest are image tokens in raster order on a fmap_size grid.
    Every image query sees all text keys; within the image the pattern depends on `kind`:
    `full` everything before it, `axial_row` its own row, `axial_col` its own column, `conv_like` a 5x5 window
    (rows r-4..r, cols c-4..c since DALLE-pytorch 1.5.0; a centred window cut to earlier tokens before that).
    `sparse` is built from a checkpoint's block layout with `sparse_attention_mask` instead.
    """
    idx = torch.arange(seq_len)
    causal = idx[None, :] <= idx[:, None]
    if kind == "full":
        return causal
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"Unknown attention type {kind!r}; use one of {', '.join(ATTENTION_TYPES)}.")
    img = (idx - text_len).clamp(min=0)
    row, col = img // fmap_size, img % fmap_size
    is_text = idx < text_len
    dr = row[:, None] - row[None, :]  # query row minus key row
    dc = col[:, None] - col[None, :]
    if kind == "axial_row":
        local = dr == 0
    elif kind == "axial_col":
        local = dc == 0
    elif kind == "conv_like":
        if conv_like_window == "above_left":
            local = (dr >= 0) & (dr <= 4) & (dc >= 0) & (dc <= 4)
        elif conv_like_window == "centered":
            local = (dr.abs() <= 2) & (dc.abs() <= 2)
        else:
            raise ValueError(f"conv_like_window must be one of {CONV_WINDOWS}, not {conv_like_window!r}.")
    else:
        raise ValueError("sparse attention masks come from a block layout: use sparse_attention_mask().")
    image_query = ~is_text[:, None]
    allowed = is_text[None, :] | (image_query & ~is_text[None, :] & local)
    # text queries only see text (which the causal mask already guarantees)
    return causal & allowed


def sparse_attention_mask(layout: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-head (heads, seq_len, seq_len) mask from a DeepSpeed block layout (heads, blocks, blocks), causal."""
    pos = torch.arange(seq_len, device=layout.device)
    block = pos // SPARSE_BLOCK
    allowed = layout[:, block[:, None], block[None, :]].bool()
    return allowed & (pos[None, :] <= pos[:, None])


def sparse_layout_shape(heads: int, seq_len: int) -> tuple[int, int, int]:
    """Shape of the `master_layout` buffer DeepSpeed stores for a sparse layer."""
    blocks = math.ceil(seq_len / SPARSE_BLOCK)
    return heads, blocks, blocks


def rotary_table(text_len: int, fmap_size: int, dim_head: int) -> torch.Tensor:
    """DALLE-pytorch's rotary angle table, shape (1, text_len + fmap_size**2, width).

    Three parts per row, each angle repeated twice for an interleaved pair: a 1-D language position (text rows 0..,
    image rows all at 8192), then the image row and column coordinates in [-1, 1] (text rows at -10).
    """
    rot_dim = dim_head // 3
    n_freq = rot_dim // 2
    lang_freqs = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2)[:n_freq].float() / rot_dim))
    pixel_freqs = torch.linspace(1.0, 5.0, n_freq) * math.pi
    image_len = fmap_size * fmap_size

    lang_pos = torch.cat([torch.arange(text_len).float(), torch.full((image_len,), 8192.0)])
    coords = torch.linspace(-1.0, 1.0, fmap_size)
    text_coord = torch.full((text_len,), -10.0)
    row_pos = torch.cat([text_coord, coords.repeat_interleave(fmap_size)])
    col_pos = torch.cat([text_coord, coords.repeat(fmap_size)])

    parts = [pos[:, None] * freqs[None, :] for pos, freqs in
             ((lang_pos, lang_freqs), (row_pos, pixel_freqs), (col_pos, pixel_freqs))]
    table = torch.cat([p.repeat_interleave(2, dim=-1) for p in parts], dim=-1)
    return table[None]


def rotary_tables(angles: torch.Tensor, dim_head: int) -> torch.Tensor:
    """cos and signed sin per position and channel, stacked (2, n, dim_head), for angles (n, width).

    DALLE-pytorch rotates interleaved channel pairs: out[2i] = x[2i] cos - x[2i+1] sin and
    out[2i+1] = x[2i+1] cos + x[2i] sin, i.e. out = x * cos + swap_pairs(x) * signed_sin; channels past `width`
    pass through (cos 1, sin 0)."""
    n, width = angles.shape
    cos = torch.ones(n, dim_head, dtype=angles.dtype, device=angles.device)
    sin = torch.zeros_like(cos)
    cos[:, :width] = angles.cos()
    sign = torch.tensor([-1.0, 1.0], dtype=angles.dtype, device=angles.device).repeat(width // 2)
    sin[:, :width] = angles.sin() * sign
    return torch.stack((cos, sin))


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x0, x3, x2, ...) from (x0, x1, x2, x3, ...) along the last dimension."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


@dataclass
class Rotary:
    """The rotary embedding of the n positions of one forward call: cos and signed sin, each (n, dim_head)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @cached_property
    def matrix(self) -> torch.Tensor:
        """The rotation of a single position as a (dim_head, dim_head) matrix: `x @ matrix` rotates x."""
        cos, sin = self.cos[0], self.sin[0]
        return torch.diag(cos) + swap_pairs(torch.eye(len(cos), dtype=cos.dtype, device=cos.device)) * sin

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (b, n, ..., dim_head), the tokens at the n positions."""
        if x.shape[1] == 1 and not torch.compiler.is_compiling():
            return x @ self.matrix.to(x.dtype)  # one decoding step, eager: one matmul instead of three kernels
        shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1],)
        cos, sin = self.cos.to(x.dtype).view(shape), self.sin.to(x.dtype).view(shape)
        return x * cos + swap_pairs(x) * sin


class Attention(nn.Module):
    """Multi-head attention (to_qkv without bias, to_out with bias) with rotary on q, k *and* v, as DALLE-pytorch.

    `kind` records the layer's pattern (the mask itself is owned by the Transformer); a `sparse` layer also holds
    DeepSpeed's persistent `master_layout` block table.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, kind: str = "full",
                 seq_len: int | None = None):
        super().__init__()
        self.heads, self.dim_head, self.kind = heads, dim_head, kind
        inner = heads * dim_head
        self.to_qkv = Linear(dim, inner * 3, bias=False)
        self.to_out = Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)
        if kind == "sparse":
            if seq_len is None:
                raise ValueError("a sparse attention layer needs seq_len to size its block layout.")
            self.register_buffer("master_layout", torch.ones(sparse_layout_shape(heads, seq_len), dtype=torch.long))

    def forward(self, x, mask=None, rotary=None, kv_cache=None, start=0, causal=False):
        """Attend from x (b, n, dim) at positions start..start+n-1.

        mask: bool, broadcastable to (b, heads, n, keys), True = may attend (None = attend to all keys).
        causal: instead of a mask, each query attends to the keys up to its own position (x is the whole sequence
        from position 0); SDPA then runs its flash kernel, which an explicit mask rules out.
        rotary: the Rotary of the n positions, or None.
        kv_cache: the layer's key/value buffer (2, b, heads, max_len, dim_head) that receives this call's keys and
        values; the call then attends to the cached keys 0..start+n-1 (or to the whole buffer, masked, when start
        is a tensor).
        """
        if decode_kernels.available(x, kv_cache, start, mask):  # one decoding step in one kernel
            cos, sin = (rotary.cos, rotary.sin) if rotary is not None else (None, None)
            out = decode_kernels.decode_attention(self.to_qkv(x), kv_cache, start, mask, cos, sin, self.heads,
                                                  self.dim_head)
            return self.dropout(self.to_out(out))
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head))  # (b, n, 3, heads, dim_head)
        if rotary is not None:  # DALLE-pytorch rotates q, k and v alike
            qkv = rotary.apply(qkv)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, b, heads, n, dim_head)
        q, k, v = qkv.unbind(0)
        if kv_cache is not None:
            k, v = write_kv(kv_cache, qkv[1:], start)
        if torch.is_tensor(start) and mask is not None:
            out = attend_static_cache(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        out = out.transpose(1, 2).flatten(2)
        return self.dropout(self.to_out(out))


def attend_static_cache(q, k, v, mask):
    """Attention of a decoding step's queries over a whole static cache, the unwritten tail masked out.

    Plain matmuls and a softmax in float32: with one query per row, SDPA's fused kernels spend most of their time on
    empty tiles, and this form lets torch.compile fuse the mask and softmax."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    weights = torch.where(mask, scores, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    return weights.to(v.dtype) @ v


def write_kv(kv_cache: torch.Tensor, kv: torch.Tensor, start):
    """Store keys and values kv (2, b, heads, n, dim_head) at positions start.. of one layer's cache
    (2, b, heads, max_len, dim_head) and return the keys and values visible to these queries."""
    if torch.is_tensor(start):  # graph-capturable single step: write in place, attend over the whole (masked) buffer
        kv_cache.index_copy_(3, start, kv)
        return kv_cache.unbind(0)
    end = start + kv.shape[3]
    kv_cache[:, :, :, start:end] = kv
    return kv_cache[:, :, :, :end].unbind(0)


class FeedForward(nn.Module):
    """GEGLU feed-forward: Linear(dim, 2*mult*dim) -> x * gelu(gates) -> dropout -> Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = Linear(dim * mult, dim)

    def forward(self, x):
        x, gates = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(x * F.gelu(gates)))
