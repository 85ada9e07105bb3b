"""DALLE hyper-parameters: old-release defaults, inference from weights, and shape cross-checks.

Every mismatch between hparams and weights is reported as one sentence naming the hparam to fix
(the "size mismatch" errors users hit most, DALLE-pytorch issue #398).
"""

from __future__ import annotations

import re

from . import remap
from .errors import ModelLoadError

VAE_KINDS = ("DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE")

# Keyword arguments of DALLE-pytorch 1.6.6's DALLE (without `vae`).
DALLE_KWARGS = (
    "dim", "num_text_tokens", "text_seq_len", "depth", "heads", "dim_head", "reversible", "attn_dropout",
    "ff_dropout", "sparse_attn", "attn_types", "loss_img_weight", "stable", "sandwich_norm", "shift_tokens",
    "rotary_emb", "shared_attn_ids", "shared_ff_ids", "share_input_output_emb", "optimize_for_inference",
)
# Defaults for keys that older checkpoints do not store (spec 5.5): the train_dalle.py CLI defaults.
OLD_DEFAULTS = {
    "shift_tokens": False,
    "rotary_emb": False,
    "attn_types": ("full",),
    "stable": False,
    "reversible": False,
    "shared_attn_ids": None,
    "shared_ff_ids": None,
    "share_input_output_emb": False,
}


def parse_version(version: str | None) -> tuple[int, int, int] | None:
    """'1.6.6' -> (1, 6, 6); None or an unreadable string -> None."""
    if not version:
        return None
    numbers = re.findall(r"\d+", str(version))[:3]
    if not numbers:
        return None
    return tuple(int(n) for n in numbers + ["0"] * (3 - len(numbers)))


def _as_tuple(value):
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _infer_heads(inner: int, pos_emb_width: int | None, given_dim_head: int | None) -> tuple[int, int] | None:
    """(heads, dim_head) with heads * dim_head == inner, matching the rotary width when known; prefer 64."""
    candidates = [given_dim_head] if given_dim_head else [64, 32, 128, 16, 96, 48, 80, 256]
    candidates += [d for d in range(8, inner + 1) if inner % d == 0 and d not in candidates]
    for dim_head in candidates:
        if dim_head and inner % dim_head == 0:
            if pos_emb_width is None or 6 * (dim_head // 3 // 2) == pos_emb_width:
                return inner // dim_head, dim_head
    return None


def normalize_hparams(hparams: dict, state_dict: dict, notes: list, name: str, explicit: set) -> dict:
    """Complete DALLE hparams: drop the legacy `vae` entry and unknown keys, apply old defaults, infer sizes."""
    h = dict(hparams)
    if "vae" in h:
        h.pop("vae")
        notes.append("dropped the legacy 'vae' entry of hparams")
    unknown = sorted(k for k in h if k not in DALLE_KWARGS)
    for key in unknown:
        h.pop(key)
    if unknown:
        notes.append(f"ignored unknown hparams: {', '.join(unknown)}")

    if "rotary_emb" not in h:
        h["rotary_emb"] = "transformer.pos_emb" in state_dict
    if "shift_tokens" not in h:
        inferred = remap.infer_shift_tokens(state_dict)
        h["shift_tokens"] = bool(inferred) if inferred is not None else False
    if "sandwich_norm" not in h and any(".fn.norm_out." in k for k in state_dict):
        h["sandwich_norm"] = True
    for key, value in OLD_DEFAULTS.items():
        h.setdefault(key, value)
    for key in ("attn_types", "shared_attn_ids", "shared_ff_ids"):
        h[key] = _as_tuple(h[key])

    # Sizes the weights determine.
    text_emb = state_dict.get("text_emb.weight")
    logits_norm = state_dict.get("to_logits.0.weight")
    if "dim" not in h and (text_emb is not None or logits_norm is not None):
        h["dim"] = int(text_emb.shape[1] if text_emb is not None else logits_norm.shape[0])
    if "depth" not in h and remap.layer_count(state_dict):
        h["depth"] = remap.layer_count(state_dict)
    text_pos = state_dict.get("text_pos_emb.weight")
    if "text_seq_len" not in h and text_pos is not None:
        h["text_seq_len"] = int(text_pos.shape[0]) - 1
    if "num_text_tokens" not in h and text_emb is not None and "text_seq_len" in h:
        h["num_text_tokens"] = int(text_emb.shape[0]) - h["text_seq_len"]
    qkv = next((v for k, v in state_dict.items() if k.endswith("to_qkv.weight")), None)
    if qkv is not None and ("heads" not in h or "dim_head" not in h):
        pos_emb = state_dict.get("transformer.pos_emb")
        found = _infer_heads(int(qkv.shape[0]) // 3, int(pos_emb.shape[-1]) if pos_emb is not None else None,
                             h.get("dim_head"))
        if found is not None:
            if "heads" not in h and "dim_head" not in h:
                notes.append(f"guessed heads={found[0]}, dim_head={found[1]} from the attention weights")
            h.setdefault("heads", found[0])
            h.setdefault("dim_head", found[1])

    missing = [k for k in ("dim", "depth", "num_text_tokens", "text_seq_len", "heads", "dim_head") if k not in h]
    if missing:
        raise ModelLoadError(
            f"{name} does not store {', '.join(missing)} and its weights cannot tell them; pass them as hparams "
            "(e.g. a hparams.json next to the file)."
        )
    inferred = sorted(set(h) - explicit - set(OLD_DEFAULTS))
    if inferred:
        notes.append(f"derived from the weights: {', '.join(f'{k}={h[k]}' for k in inferred)}")
    return h


def infer_vae_kind(state_dict: dict, vae_params: dict | None) -> str | None:
    """VAE class from the ``vae.*`` keys of a DALLE state_dict (spec 5.5 step 3)."""
    keys = [k for k in state_dict if k.startswith("vae.")]
    if any(k.startswith("vae.enc.blocks.") or k.startswith("vae.dec.blocks.") for k in keys):
        return "OpenAIDiscreteVAE"
    if any(k.startswith("vae.model.") for k in keys):
        return "VQGanVAE"
    if any(k.startswith(("vae.codebook.", "vae.encoder.")) for k in keys) or vae_params:
        return "DiscreteVAE"
    return None


def discrete_vae_params_from_keys(state_dict: dict, fmap_size: int | None) -> dict:
    """DiscreteVAE kwargs read off its weights (image_size only when the token grid side is known)."""
    try:
        codebook = state_dict["codebook.weight"]
        first = state_dict["encoder.0.0.weight"]
    except KeyError as exc:
        raise ModelLoadError(f"The DiscreteVAE weights lack {exc.args[0]}; they are not a DALLE-pytorch DiscreteVAE.") from exc
    num_layers = sum(1 for k, v in state_dict.items() if re.fullmatch(r"encoder\.\d+\.0\.weight", k) and v.shape[-1] == 4)
    resblocks = {m[1] for k in state_dict if (m := re.fullmatch(r"encoder\.(\d+)\.net\.0\.weight", k))}
    params = {
        "num_tokens": int(codebook.shape[0]),
        "codebook_dim": int(codebook.shape[1]),
        "num_layers": num_layers,
        "num_resnet_blocks": len(resblocks),
        "hidden_dim": int(first.shape[0]),
        "channels": int(first.shape[1]),
    }
    if fmap_size:
        params["image_size"] = fmap_size * 2 ** num_layers
    return params


def _fail(message: str):
    raise ModelLoadError(message)


def check_dalle_shapes(h: dict, sd: dict, name: str) -> None:
    """Check hparams against the transformer/embedding shapes; raise one sentence naming the hparam to fix."""
    dim, text_len, vocab = h["dim"], h["text_seq_len"], h["num_text_tokens"]
    text_emb = sd.get("text_emb.weight")
    if text_emb is not None:
        if text_emb.shape[1] != dim:
            _fail(f"{name}: text_emb.weight is {text_emb.shape[1]} wide but hparams say dim={dim}; set dim={text_emb.shape[1]}.")
        if text_emb.shape[0] != vocab + text_len:
            _fail(
                f"{name}: text_emb.weight has {text_emb.shape[0]} rows = num_text_tokens + text_seq_len, but hparams "
                f"give {vocab} + {text_len}; fix num_text_tokens (the tokenizer's vocabulary size) or text_seq_len."
            )
    text_pos = sd.get("text_pos_emb.weight")
    if text_pos is not None and text_pos.shape[0] != text_len + 1:
        _fail(f"{name}: text_pos_emb.weight has {text_pos.shape[0]} rows but hparams say text_seq_len={text_len}; "
              f"set text_seq_len={text_pos.shape[0] - 1}.")
    if h["rotary_emb"] != ("transformer.pos_emb" in sd):
        stored = "transformer.pos_emb" in sd
        _fail(f"{name}: the weights were trained with rotary_emb={stored} but hparams say rotary_emb={h['rotary_emb']}; "
              f"set rotary_emb={stored}.")
    pos_emb = sd.get("transformer.pos_emb")
    if pos_emb is not None and pos_emb.shape[-1] != 6 * (h["dim_head"] // 3 // 2):
        _fail(f"{name}: transformer.pos_emb is {pos_emb.shape[-1]} wide, which does not fit dim_head={h['dim_head']}; "
              "fix dim_head in hparams.")
    depth = remap.layer_count(sd)
    if depth and depth != h["depth"]:
        _fail(f"{name}: the weights hold {depth} transformer layers but hparams say depth={h['depth']}; set depth={depth}.")
    qkv = next((v for k, v in sd.items() if k.endswith("to_qkv.weight")), None)
    if qkv is not None and qkv.shape[0] != 3 * h["heads"] * h["dim_head"]:
        _fail(f"{name}: to_qkv.weight has {qkv.shape[0]} rows = 3 x heads x dim_head, but hparams give heads={h['heads']}, "
              f"dim_head={h['dim_head']}; fix heads or dim_head.")


def check_vae_match(h: dict, sd: dict, vae_tokens: int, vae_fmap: int, vae_desc: str, name: str) -> None:
    """Check the DALLE weights against the VAE it will run with (codebook size and token grid)."""
    image_emb = sd.get("image_emb.weight")
    if image_emb is not None and image_emb.shape[0] != vae_tokens:
        _fail(
            f"{name}: image_emb.weight has {image_emb.shape[0]} rows but the VAE ({vae_desc}) has {vae_tokens} codes; "
            f"use the VAE the model was trained with (one with {image_emb.shape[0]} codes)."
        )
    logits = sd.get("to_logits.1.weight")
    total = h["num_text_tokens"] + h["text_seq_len"] + vae_tokens
    if logits is not None and logits.shape[0] != total:
        _fail(f"{name}: to_logits.1.weight has {logits.shape[0]} rows but num_text_tokens + text_seq_len + VAE codes = "
              f"{total}; fix num_text_tokens or use the VAE the model was trained with.")
    fmap = remap.fmap_size_from_keys(sd, h["text_seq_len"])
    if fmap is not None and fmap != vae_fmap:
        _fail(
            f"{name}: the position embeddings are for a {fmap}x{fmap} token grid but the VAE ({vae_desc}) makes "
            f"{vae_fmap}x{vae_fmap}; fix the VAE's image_size / num_layers or use the VAE the model was trained with."
        )
