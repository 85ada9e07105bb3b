"""Bring DALLE-pytorch state_dicts of any release to the 1.6.6 key layout.

Pure functions on dicts of tensors (no model classes needed). The historical layouts come from
shared/reference/dalle_state_dict_keys.txt section 11 and spec section 5.5:

* axial position keys ``image_pos_emb.weights_0/_1`` (axial_positional_embedding <= 0.2.1) -> ``weights.0/.1``;
* wrapper depth: between a layer's PreNorm and its attention / feed-forward leaf, releases up to 1.2.2 had
  fewer ``fn.`` levels than 1.4.0+; we strip them and re-insert the count 1.6.6 uses;
* ``transformer.pos_emb`` of 1.0.2-1.1.1, shape ``(1, 1, L, w)``, lacks the last row of the current
  ``(1, L + 1, w)`` table; the row is rebuilt from rows of the stored table (see `extend_rotary_table`);
* ``vae.model.loss.*`` (VQGAN training losses) are dropped;
* layers saved before LayerScale existed get ``scale = 1`` (which is exactly "no LayerScale").
"""

from __future__ import annotations

import math
import re

import torch

from .errors import ModelLoadError

# <prefix> = the LayerScale of one sub-block; <prefix>fn. = its PreNorm.
_LAYER_RE = re.compile(
    r"^(?P<prefix>transformer\.layers\.(?:layers\.(?P<i>\d+)\.(?P<sub>[01])|blocks\.(?P<bi>\d+)\.(?P<fg>[fg])\.net)\.)"
    r"(?P<rest>.*)$"
)
_PRENORM_OWN = ("norm.", "norm_out.")


def _split_layer_key(key: str):
    """(prefix, is_attention, number of extra `fn.` levels, leaf) for a layer key below a PreNorm, else None."""
    m = _LAYER_RE.match(key)
    if m is None or not m["rest"].startswith("fn."):
        return None
    rest = m["rest"][3:]  # drop the PreNorm's own "fn."
    if rest.startswith(_PRENORM_OWN):
        return None
    extra = 0
    while rest.startswith("fn."):
        rest = rest[3:]
        extra += 1
    is_attention = m["sub"] == "0" or m["fg"] == "f"
    return m["prefix"], is_attention, extra, rest


def layer_count(state_dict: dict) -> int:
    """Number of transformer layers in a DALLE state_dict (0 when there are none)."""
    indices = set()
    for key in state_dict:
        m = _LAYER_RE.match(key)
        if m:
            indices.add(int(m["i"] if m["i"] is not None else m["bi"]))
    return max(indices) + 1 if indices else 0


def infer_shift_tokens(state_dict: dict) -> bool | None:
    """Read `shift_tokens` off the feed-forward wrapper depth (1: off; 2: on, <=1.2.2; 3: on, >=1.4.0)."""
    depths = {parts[2] for k in state_dict if (parts := _split_layer_key(k)) and not parts[1]}
    if not depths:
        return None
    if len(depths) > 1:
        raise ModelLoadError(
            f"The checkpoint mixes feed-forward key layouts ({sorted(depths)} wrapper levels); it is not a "
            "DALLE-pytorch state_dict this app can read."
        )
    depth = depths.pop()
    if depth not in (1, 2, 3):
        raise ModelLoadError(f"Unknown feed-forward key layout ({depth} wrapper levels) in the checkpoint.")
    return depth > 1


def remap_layer_keys(state_dict: dict, shift_tokens: bool) -> dict:
    """Rewrite every layer key to the 1.6.6 wrapper depth for the given `shift_tokens`."""
    out = {}
    for key, value in state_dict.items():
        parts = _split_layer_key(key)
        if parts is None:
            out[key] = value
            continue
        prefix, is_attention, _, leaf = parts
        extra = (2 if is_attention else 1) + (2 if shift_tokens else 0)
        out[prefix + "fn." + "fn." * extra + leaf] = value
    return out


def add_missing_layer_scale(state_dict: dict, dim: int) -> tuple[dict, bool]:
    """Insert ``scale = 1`` for sub-blocks saved without LayerScale (identical behaviour)."""
    prefixes, have_scale = set(), set()
    dtype = None
    for key, value in state_dict.items():
        m = _LAYER_RE.match(key)
        if m:
            prefixes.add(m["prefix"])
            if m["rest"] == "scale":
                have_scale.add(m["prefix"])
            dtype = dtype or value.dtype
    missing = prefixes - have_scale
    if not missing:
        return state_dict, False
    out = dict(state_dict)
    for prefix in sorted(missing):
        out[prefix + "scale"] = torch.ones(1, 1, dim, dtype=dtype if dtype.is_floating_point else torch.float32)
    return out, True


def rename_axial_keys(state_dict: dict) -> tuple[dict, bool]:
    """``image_pos_emb.weights_0/_1`` -> ``image_pos_emb.weights.0/.1``."""
    out, changed = {}, False
    for key, value in state_dict.items():
        new = re.sub(r"^image_pos_emb\.weights_(\d+)$", r"image_pos_emb.weights.\1", key)
        changed |= new != key
        out[new] = value
    return out, changed


def rotary_table(text_seq_len: int, fmap_size: int, dim_head: int) -> torch.Tensor:
    """The DALLE-pytorch >= 1.1.2 rotary angle table ``(1, T + F*F + 1, 6 * (dim_head // 3 // 2))`` (spec 1.10).

    Columns: 1-D text angles (image rows at position 8192), then the image row and column
    coordinates on ``linspace(-1, 1, F)`` (text rows at -10); each frequency repeated twice.
    """
    rot_dim = dim_head // 3
    lang_freqs = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2)[: rot_dim // 2].float() / rot_dim))
    pixel_freqs = torch.linspace(1.0, 10 / 2, rot_dim // 2) * math.pi

    def angles(pos, freqs):
        return (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)

    text_len = text_seq_len + 1
    coords = torch.linspace(-1, 1, fmap_size)
    image_pos = torch.full((fmap_size * fmap_size,), 8192.0)
    lang = angles(torch.cat([torch.arange(text_len).float(), image_pos]), lang_freqs)
    rows = torch.cat([torch.full((text_len,), -10.0), coords.repeat_interleave(fmap_size)])
    cols = torch.cat([torch.full((text_len,), -10.0), coords.repeat(fmap_size)])
    table = torch.cat([lang, angles(rows, pixel_freqs), angles(cols, pixel_freqs)], dim=-1)
    return table[None]


def extend_rotary_table(old: torch.Tensor, text_seq_len: int, fmap_size: int) -> torch.Tensor:
    """``(1, 1, L, w)`` (1.0.2-1.1.1) -> ``(1, L + 1, w)``: rebuild the missing last row from stored rows.

    The last row is image position (F-1, F-1). Its text part and row-coordinate part equal those of
    the row before it (F-1, F-2); its column-coordinate part equals that of row (F-2, F-1). The
    column-coordinate columns are the ones that differ between image positions (0, 0) and (0, 1).
    Building the row from the stored table keeps whatever frequencies the old release used.
    """
    table = old.reshape(old.shape[-2], old.shape[-1])
    length, fmap = table.shape[0], fmap_size
    first_image = text_seq_len + 1
    if length != text_seq_len + fmap * fmap or fmap < 2:
        raise ModelLoadError(
            f"transformer.pos_emb has {length} rows, which does not fit text_seq_len={text_seq_len} plus a "
            f"{fmap}x{fmap} image; fix text_seq_len in hparams or use the VAE the model was trained with."
        )
    column_part = table[first_image] != table[first_image + 1]
    last = torch.where(column_part, table[length - fmap], table[length - 1])
    return torch.cat([table, last[None]], dim=0)[None]


def strip_vqgan_loss(state_dict: dict) -> tuple[dict, int]:
    """Drop ``vae.model.loss.*`` (LPIPS + discriminator), which inference never uses."""
    out = {k: v for k, v in state_dict.items() if not k.startswith("vae.model.loss.")}
    return out, len(state_dict) - len(out)


def strip_common_prefix(state_dict: dict, prefixes=("module.", "model.", "_orig_mod.")) -> tuple[dict, str]:
    """Remove a wrapper prefix that every key carries (DataParallel, a training wrapper, torch.compile)."""
    removed = ""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                removed += prefix
                changed = True
    return state_dict, removed


def to_float32(state_dict: dict) -> tuple[dict, bool]:
    """Cast fp16/bf16 tensors to float32, keeping tensors that shared storage shared."""
    out, memo, changed = {}, {}, False
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.dtype in (torch.float16, torch.bfloat16):
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
            if ident not in memo:
                memo[ident] = value.float()
            out[key] = memo[ident]
            changed = True
        else:
            out[key] = value
    return out, changed


def dedupe_shared(state_dict: dict) -> tuple[dict, dict]:
    """Split a state_dict into unique tensors and ``{alias_key: kept_key}`` for keys sharing the same tensor.

    DALLE-pytorch repeats shared modules (``shared_attn_ids``) once per use site and adds
    ``text_emb.linear.*`` / ``image_emb.linear.*`` aliases; safetensors refuses such duplicates.
    """
    unique, aliases, seen = {}, {}, {}
    for key, value in state_dict.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                 value.dtype) if value.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
        else:
            if ident is not None:
                seen[ident] = key
            unique[key] = value
    return unique, aliases


def expand_shared(unique: dict, aliases: dict) -> dict:
    """Inverse of `dedupe_shared`: every alias key points at the tensor of the key it repeats."""
    out = dict(unique)
    for alias, kept in aliases.items():
        out[alias] = unique[kept]
    return out


def fmap_size_from_keys(state_dict: dict, text_seq_len: int | None) -> int | None:
    """The image token grid side F implied by the position embeddings, or None if they do not say."""
    weights0 = state_dict.get("image_pos_emb.weights.0", state_dict.get("image_pos_emb.weights_0"))
    if weights0 is not None and weights0.dim() == 4:
        return int(weights0.shape[1])
    pos_emb = state_dict.get("transformer.pos_emb")
    if pos_emb is not None and text_seq_len is not None:
        rows = pos_emb.shape[-2]
        image_rows = rows - text_seq_len - (1 if pos_emb.dim() == 3 else 0)
        side = math.isqrt(max(image_rows, 0))
        if side * side == image_rows and side > 0:
            return side
    return None
