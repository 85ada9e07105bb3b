"""The transformer shared by DALLE and CLIP.

Each layer is two residual branches, attention then feed-forward, each computed as
    branch(x) = scale * norm_out(module(shift(norm(x))))
with LayerScale `scale`, an optional sandwich `norm_out`, and an optional token shift (DALLE). Layers may share their
attention / feed-forward modules, and may run as a reversible two-stream stack (inference: mean of the streams).

Module names are our own; `state_dict()` emits DALLE-pytorch 1.6.6 keys and `load_state_dict()` accepts them
(and the wrapper depths of older releases), see `_to_reference_key` / `_from_reference_key`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import cycle, islice

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (Attention, FeedForward, Rotary, attention_mask, rotary_table, rotary_tables,
                        sparse_attention_mask)


@dataclass
class InferenceCache:
    """Static, preallocated decoding state for one batch: written in place, never resized.

    kv:      one tensor per layer (not per shared module), (2, batch, heads, max_len, dim_head): keys (0) and
             values (1) after rotary, in one tensor so that a step writes both with one copy.
    shifted: one tensor per layer and branch (attention at 2*i, feed-forward at 2*i + 1), (batch, max_len + 1, dim):
             the normalised branch inputs that token shift reads back from; the extra last row stays zero (what
             shifted-in edge channels read). None when the model does not shift tokens.
    Separate tensors rather than one big one: torch.compile updates a graph input in place, but turns a write into
    a view of one (cache[i]) into a copy of the whole tensor.
    """

    kv: list[torch.Tensor]
    shifted: list[torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.kv[0].shape[1]

    def select(self, rows: torch.Tensor) -> "InferenceCache":
        """A new cache holding only the given batch rows (used to drop finished or cancelled rows)."""
        shifted = [h.index_select(0, rows) for h in self.shifted] if self.shifted is not None else None
        return InferenceCache([kv.index_select(1, rows) for kv in self.kv], shifted)


def shift_index(positions: torch.Tensor, text_len: int, fmap_size: int, dim: int, zero_row: int) -> torch.Tensor:
    """For DALLE-pytorch's token shift: the history row each channel of each position reads, (n, dim) long.

    Text tokens take the first half of their channels from the previous token; image tokens take their first quarter
    from the token one row above and their second quarter from the token to their left; channels with no such
    neighbour (image edges, the first token, the first image token reading text) read `zero_row`, which holds zeros.
    The other channels read the token itself."""
    ch = torch.arange(dim, device=positions.device)[None, :]
    half, quarter = (dim + 1) // 2, (dim + 3) // 4  # torch.chunk(2) / chunk(4) sizes
    pos = positions[:, None]
    img = pos - text_len
    is_text = img < 0
    zero = torch.full_like(pos, zero_row)
    text_src = torch.where(ch < half, torch.where(pos > 0, pos - 1, zero), pos)
    left = torch.where(img % fmap_size != 0, pos - 1, zero)
    above = torch.where(img >= fmap_size, pos - fmap_size, zero)
    image_src = torch.where(ch < quarter, above, torch.where(ch < 2 * quarter, left, pos))
    return torch.where(is_text, text_src, image_src)


def write_history(history: torch.Tensor, h: torch.Tensor, start) -> None:
    """Store the normalised tokens h (b, n, d) at positions start.. of a token-shift history (b, max_len + 1, d)."""
    if torch.is_tensor(start):
        history.index_copy_(1, start, h)
    else:
        history[:, start:start + h.shape[1]] = h


def shift_tokens(history: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token-shifted tokens (b, n, d): channel c of token t is history[:, index[t, c], c] (one gather)."""
    return history.gather(1, index.expand(history.shape[0], -1, -1))


class Branch(nn.Module):
    """One residual branch: norm -> (token shift) -> module -> (sandwich norm) -> LayerScale, added to the stream."""

    def __init__(self, dim: int, module: nn.Module, layer_index: int, sandwich_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.module = module
        self.norm_out = nn.LayerNorm(dim) if sandwich_norm else None
        init = 0.1 if layer_index + 1 <= 18 else 1e-5 if layer_index + 1 <= 24 else 1e-6
        self.scale = nn.Parameter(torch.full((1, 1, dim), init))

    def forward(self, x, shift=None, residual=None, **module_kwargs):
        """residual + scale * branch(x); the residual stream is x itself unless given (reversible layers)."""
        h = self.norm(x)
        if shift is not None:
            h = shift(h)
        h = self.module(h, **module_kwargs)
        if self.norm_out is not None:
            h = self.norm_out(h)
        return torch.addcmul(x if residual is None else residual, h, self.scale)


class Layer(nn.Module):
    """The attention branch and the feed-forward branch of one layer."""

    def __init__(self, attn_branch: Branch, ff_branch: Branch):
        super().__init__()
        self.attn = attn_branch
        self.ff = ff_branch


class Transformer(nn.Module):
    """Stack of attention / feed-forward layers with DALLE-pytorch's options (keyword arguments as in 1.6.6)."""

    def __init__(self, *, dim, depth, seq_len, reversible=False, causal=True, heads=8, dim_head=64, ff_mult=4,
                 attn_dropout=0.0, ff_dropout=0.0, attn_types=None, image_fmap_size=None, sparse_attn=False,
                 stable=False, sandwich_norm=False, shift_tokens=False, rotary_emb=True, shared_attn_ids=None,
                 shared_ff_ids=None, optimize_for_inference=False, conv_like_window="above_left"):
        super().__init__()
        attn_types = tuple(attn_types or ("full",))
        if isinstance(attn_types, str):
            attn_types = (attn_types,)
        self.dim, self.depth, self.seq_len, self.heads, self.dim_head = dim, depth, seq_len, heads, dim_head
        self.reversible, self.causal, self.stable = reversible, causal, stable
        self.shift, self.rotary = shift_tokens, rotary_emb
        self.conv_like_window = conv_like_window
        self.fmap_size = image_fmap_size
        image_len = (image_fmap_size or 0) ** 2
        self.text_len = seq_len + 1 - image_len  # bos + text
        self.layer_types = list(islice(cycle(attn_types), depth))
        attn_ids = list(islice(cycle(shared_attn_ids or range(depth)), depth))
        ff_ids = list(islice(cycle(shared_ff_ids or range(depth)), depth))

        attn_modules, ff_modules, layers = {}, {}, []
        for i, (kind, attn_id, ff_id) in enumerate(zip(self.layer_types, attn_ids, ff_ids)):
            if attn_id not in attn_modules:
                attn_modules[attn_id] = Attention(dim, heads, dim_head, attn_dropout, kind, seq_len)
            attn = attn_modules[attn_id]
            if attn.kind != kind:
                raise ValueError(f"Layers sharing attention id {attn_id!r} must have one attention type, "
                                 f"got {attn.kind!r} and {kind!r}.")
            if ff_id not in ff_modules:
                ff_modules[ff_id] = FeedForward(dim, ff_mult, ff_dropout)
            layers.append(Layer(Branch(dim, attn, i, sandwich_norm), Branch(dim, ff_modules[ff_id], i, sandwich_norm)))
        self.layers = nn.ModuleList(layers)

        if rotary_emb:
            self.register_buffer("pos_emb", rotary_table(self.text_len, image_fmap_size or 0, dim_head))
            # cos and sin of every position, from pos_emb (refreshed when a checkpoint's pos_emb is loaded)
            self.register_buffer("rotary_cos_sin", rotary_tables(self.pos_emb[0], dim_head), persistent=False)
            self.register_load_state_dict_post_hook(_refresh_rotary)
        else:
            self.pos_emb = self.rotary_cos_sin = None
        if shift_tokens:  # which history row each channel of each position reads, for a cache of seq_len rows
            positions = torch.arange(seq_len)
            self.register_buffer("shift_sources", shift_index(positions, self.text_len, self.fmap_size, dim, seq_len),
                                 persistent=False)
        for kind in set(self.layer_types) - {"sparse"}:
            if causal:
                mask = attention_mask(kind, self.text_len, image_fmap_size or 1, seq_len, conv_like_window)
                self.register_buffer(f"mask_{kind}", mask, persistent=False)

        self.register_load_state_dict_pre_hook(_load_reference_keys)
        self.register_state_dict_post_hook(_emit_reference_keys)

    # -- masks -----------------------------------------------------------------------------------------------------
    def layer_mask(self, i: int) -> torch.Tensor | None:
        """The (seq, seq) or (heads, seq, seq) may-attend mask of layer i; None for non-causal (CLIP) layers."""
        if not self.causal:
            return None
        kind = self.layer_types[i]
        if kind == "sparse":
            return sparse_attention_mask(self.layers[i].attn.module.master_layout, self.seq_len)
        return getattr(self, f"mask_{kind}")

    def _query_mask(self, i, positions, keys, key_mask):
        if self.layer_types[i] == "full" and keys is not None and len(positions) == 1 and key_mask is None:
            return None  # one query over the keys before it: nothing to mask (and SDPA is faster without one)
        mask = self.layer_mask(i)
        if mask is not None:
            mask = mask[..., positions, :][..., :keys] if keys is not None else mask[..., positions, :]
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask  # -> (heads|1, n, keys)
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            mask = km if mask is None else mask & km
        return mask

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x, mask=None, cache: InferenceCache | None = None, start=0):
        """Run x (b, n, dim), the tokens at positions start..start+n-1, through the stack.

        mask: optional key-padding mask (b, n), True = keep (CLIP). cache: an InferenceCache to read and fill;
        start: the position of x's first token (an int, or a 1-element long tensor for graph-captured steps).
        """
        n = x.shape[1]
        if torch.is_tensor(start):
            positions, keys = start, None  # attend over the whole static cache, masked
        else:
            positions = torch.arange(start, start + n, device=x.device)
            keys = start + n
        rotary = Rotary(*self.rotary_cos_sin[:, positions]) if self.rotary_cos_sin is not None else None
        shift = None
        if self.shift:  # the zero row: the cache's extra last row, or a zero row appended to x (no cache)
            zero_row = cache.shifted[0].shape[1] - 1 if cache is not None else n
            if zero_row == self.seq_len:
                shift = self.shift_sources[positions]
            else:
                shift = shift_index(positions, self.text_len, self.fmap_size, self.dim, zero_row)
        # a captured one-token step: the channels that read the token itself, once for every branch
        own = shift == start if shift is not None and torch.is_tensor(start) else None
        masks = {}

        if self.reversible:
            x1 = x2 = x
        for i, layer in enumerate(self.layers):
            kind = self.layer_types[i]
            if kind == "sparse" or kind not in masks:
                masks[kind] = self._query_mask(i, positions, keys, mask)
            mask_i = masks[kind]
            kv = cache.kv[i] if cache is not None else None
            attn_kw = dict(mask=mask_i, rotary=rotary, kv_cache=kv, start=start)
            if kind == "full" and self.causal and mask is None and not torch.is_tensor(start) and start == 0:
                attn_kw.update(mask=None, causal=True)  # the whole sequence from 0: SDPA's flash kernel
            attn_shift = self._shifter(cache, i, 0, start, n, shift, own)
            ff_shift = self._shifter(cache, i, 1, start, n, shift, own)
            if self.reversible:
                x1 = layer.attn(x2, attn_shift, residual=x1, **attn_kw)
                x2 = layer.ff(x1, ff_shift, residual=x2)
            else:
                x = layer.attn(x, attn_shift, **attn_kw)
                x = layer.ff(x, ff_shift)
        return (x1 + x2) / 2 if self.reversible else x

    def _shifter(self, cache, layer, branch, start, n, index, own=None):
        """Token shift for one branch; with a cache, the unshifted inputs are kept there for later tokens. `own`: in
        a captured one-token step, the channels that read the token itself (index == start)."""
        if not self.shift:
            return None

        def shift(h):
            if cache is None:
                return shift_tokens(F.pad(h, (0, 0, 0, 1)), index)
            history = cache.shifted[2 * layer + branch]
            if own is not None:
                # one token of a captured step: its neighbours are earlier tokens, already in the history, and its
                # own channels come from h, so the gather does not have to wait for the write (which leaves
                # torch.compile free to fuse norm, shift and write; not yet timed on a GPU)
                shifted = torch.where(own, h, shift_tokens(history, index))
                write_history(history, h, start)
                return shifted
            write_history(history, h, start)
            return shift_tokens(history, index)

        return shift

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> InferenceCache:
        """Allocate an InferenceCache for `batch_size` rows and up to `max_len` positions (default: seq_len)."""
        max_len = max_len or self.seq_len
        p = self.layers[0].attn.norm.weight
        device, dtype = device or p.device, dtype or p.dtype
        kv = [torch.zeros(2, batch_size, self.heads, max_len, self.dim_head, device=device, dtype=dtype)
              for _ in range(self.depth)]
        shifted = ([torch.zeros(batch_size, max_len + 1, self.dim, device=device, dtype=dtype)
                    for _ in range(2 * self.depth)] if self.shift else None)
        return InferenceCache(kv, shifted)


# -- DALLE-pytorch key layout ------------------------------------------------------------------------------------------
# internal: layers.{i}.{attn|ff}.{scale|norm.*|norm_out.*|module.<leaf>}
# reference: layers.layers.{i}.{0|1}.  or  layers.blocks.{i}.{f|g}.net.   then scale | fn.norm.* | fn.norm_out.* |
#            fn.<wrappers>.<leaf>, with leaf names to_qkv / to_out.0 / attn_fn.master_layout / net.0 / net.3
_LEAF_TO_REF = {"to_qkv.": "to_qkv.", "to_out.": "to_out.0.", "master_layout": "attn_fn.master_layout",
                "proj_in.": "net.0.", "proj_out.": "net.3."}
_LEAF_FROM_REF = {v: k for k, v in _LEAF_TO_REF.items()}
_INTERNAL = re.compile(r"layers\.(\d+)\.(attn|ff)\.(.*)")
_REFERENCE = re.compile(r"layers\.(?:layers\.(\d+)\.([01])|blocks\.(\d+)\.([fg])\.net)\.(.*)")


def _to_reference_key(t: Transformer, rest: str) -> str | None:
    m = _INTERNAL.fullmatch(rest)
    if not m:
        return None
    i, branch, tail = m.groups()
    is_attn = branch == "attn"
    if t.reversible:
        prefix = f"layers.blocks.{i}.{'f' if is_attn else 'g'}.net."
    else:
        prefix = f"layers.layers.{i}.{0 if is_attn else 1}."
    if tail == "scale" or tail.startswith("norm"):
        return prefix + (tail if tail == "scale" else "fn." + tail)
    tail = tail.removeprefix("module.")
    for ours, theirs in _LEAF_TO_REF.items():
        if tail.startswith(ours):
            # 1.6.6: LayerScale.fn -> PreNorm.fn -> [CachedAs -> PreShiftToken ->] CachedAs (attention only) -> module
            wrappers = 2 + (1 if is_attn else 0) + (2 if t.shift else 0)
            return prefix + "fn." * wrappers + theirs + tail[len(ours):]
    return None


def _from_reference_key(rest: str) -> str | None:
    m = _REFERENCE.fullmatch(rest)
    if not m:
        return None
    i = m.group(1) or m.group(3)
    is_attn = (m.group(2) or m.group(4)) in ("0", "f")
    tail = m.group(5)
    branch = "attn" if is_attn else "ff"
    if tail == "scale":
        return f"layers.{i}.{branch}.scale"
    tail = tail.removeprefix("fn.")
    if tail.startswith(("norm.", "norm_out.")):
        return f"layers.{i}.{branch}.{tail}"
    while tail.startswith("fn."):  # any wrapper depth: 1.6.6, <= 1.2.2, with or without token shift
        tail = tail[3:]
    for theirs, ours in _LEAF_FROM_REF.items():
        if tail.startswith(theirs):
            return f"layers.{i}.{branch}.module.{ours}{tail[len(theirs):]}"
    return None


def _refresh_rotary(module, incompatible_keys):
    module.rotary_cos_sin.copy_(rotary_tables(module.pos_emb[0].float(), module.dim_head))


def _emit_reference_keys(module, state_dict, prefix, local_metadata):
    items = list(state_dict.items())
    state_dict.clear()  # refill in order, renaming this module's keys
    for key, value in items:
        new = _to_reference_key(module, key[len(prefix):]) if key.startswith(prefix) else None
        state_dict[prefix + new if new is not None else key] = value


def _load_reference_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _from_reference_key(key[len(prefix):])
        if new is not None:
            state_dict[prefix + new] = state_dict.pop(key)
