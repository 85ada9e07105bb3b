"""The project's own model format: a folder (or Hub repo) that loads without any pickle.

    config.json        {"format": "dalle_app", "format_version": 1, "dalle": {...DALLE-pytorch 1.6.6 kwargs},
                        "conv_like_window": ..., "vae": {"kind", "params", "file"}, "clip": {...} | null,
                        "tokenizer": {"kind", "file"}, "tied": {...}, "source": {...}}
    model.safetensors  transformer and embeddings (DALLE-pytorch 1.6.6 keys, no "vae.*"; repeated tensors once)
    vae.safetensors    the VAE's own state_dict
    clip.safetensors   optional CLIP reranker
    <tokenizer file>   copied under its own name (e.g. tokenizer.json, cc12m.bpe, bpe_simple_vocab_16e6.txt.gz)
    README.md          optional model card

`save_pretrained` writes it from loaded models, `write_pretrained` from plain state_dicts, and
`convert_checkpoint` from any DALLE-pytorch checkpoint (`python -m dalle_app convert`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import remap
from .checkpoints import DalleCheckpoint, VaeCheckpoint, _load_safetensors, read_checkpoint
from .errors import ModelLoadError

FORMAT_NAME = "dalle_app"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
VAE_FILE = "vae.safetensors"
CLIP_FILE = "clip.safetensors"


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def recommended_sampling(config: dict, **chosen) -> dict:
    """The sampling a model was trained for, from its config (or a loaded model's info, which carries the same
    `source`): {"cond_scale": float, "top_k": int, "temperature": float}; guidance off, top-k 64 and temperature 1
    where it recommends nothing. `chosen`: values the user gave (None = not given), which take precedence."""
    given = (config.get("source") or {}).get("recommended_sampling") or {}
    recommended = {"cond_scale": float(given.get("cond_scale", 1.0)), "top_k": int(given.get("top_k", 64)),
                   "temperature": float(given.get("temperature", 1.0))}
    return {**recommended, **{k: v for k, v in chosen.items() if v is not None}}


def is_pretrained_config(config: dict) -> bool:
    """True for a config.json written by this module."""
    return isinstance(config, dict) and config.get("format") == FORMAT_NAME


def _save_tensors(state_dict: dict, path: Path) -> dict:
    """Write unique tensors to `path` (contiguous, CPU); return the alias map for the repeated ones."""
    unique, aliases = remap.dedupe_shared(state_dict)
    save_file({k: v.detach().cpu().contiguous() for k, v in unique.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; a published model folder should be readable
    return aliases


def write_pretrained(folder: str | Path, *, hparams: dict, dalle_weights: dict, vae_kind: str, vae_params: dict | None,
                     vae_weights: dict, conv_like_window: str = "above_left", clip_params: dict | None = None,
                     clip_weights: dict | None = None, tokenizer_kind: str | None = None,
                     tokenizer_file: str | Path | None = None, source: dict | None = None,
                     card: str | None = None) -> Path:
    """Write the project format from state_dicts (DALLE weights without ``vae.*``; the VAE's own weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = {"model": _save_tensors(dalle_weights, folder / MODEL_FILE),
            "vae": _save_tensors(vae_weights, folder / VAE_FILE)}
    clip = None
    if clip_weights is not None:
        tied["clip"] = _save_tensors(clip_weights, folder / CLIP_FILE)
        clip = {"params": _jsonable(clip_params or {}), "file": CLIP_FILE}
    tokenizer = None
    if tokenizer_kind is not None or tokenizer_file is not None:
        name = None
        if tokenizer_file is not None:
            tokenizer_file = Path(tokenizer_file)
            name = tokenizer_file.name
            if tokenizer_file.resolve() != (folder / name).resolve():
                shutil.copyfile(tokenizer_file, folder / name)
        tokenizer = {"kind": tokenizer_kind, "file": name}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dalle": _jsonable(hparams),
        "conv_like_window": conv_like_window,
        "vae": {"kind": vae_kind, "params": _jsonable(vae_params), "file": VAE_FILE},
        "clip": clip,
        "tokenizer": tokenizer,
        "tied": {k: v for k, v in tied.items() if v},
        "source": _jsonable(source or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if card:
        (folder / "README.md").write_text(card)
    return folder


def save_pretrained(folder: str | Path, dalle=None, clip=None, tokenizer_file: str | Path | None = None,
                    card: str | None = None, *, config: dict | None = None, model=None) -> Path:
    """Save models to the project format.

    Pass a `LoadedModel` as `model` (everything is taken from it), or `dalle` (a DALLE module whose
    ``state_dict()`` has DALLE-pytorch 1.6.6 keys) with `config` = ``{"dalle": hparams, "vae": {"kind",
    "params"}, "conv_like_window", "clip": {"params"}, "tokenizer": {"kind"}}``.
    """
    if model is not None:
        dalle, clip, config = model.dalle, model.clip, model.config
        if tokenizer_file is None and model.tokenizer_file is not None:
            tokenizer_file = model.tokenizer_file
    if dalle is None or config is None:
        raise ValueError("save_pretrained needs model=LoadedModel, or dalle=... together with config=....")
    state = dalle.state_dict()
    vae_cfg = config.get("vae") or {}
    return write_pretrained(
        folder,
        hparams=config["dalle"],
        dalle_weights={k: v for k, v in state.items() if not k.startswith("vae.")},
        vae_kind=vae_cfg.get("kind"),
        vae_params=vae_cfg.get("params"),
        vae_weights={k[4:]: v for k, v in state.items() if k.startswith("vae.")},
        conv_like_window=config.get("conv_like_window", "above_left"),
        clip_params=(config.get("clip") or {}).get("params"),
        clip_weights=clip.state_dict() if clip is not None else None,
        tokenizer_kind=(config.get("tokenizer") or {}).get("kind"),
        tokenizer_file=tokenizer_file,
        source=config.get("source"),
        card=card,
    )


def replace_clip(folder: str | Path, out: str | Path, clip, source_update: dict | None = None) -> Path:
    """Write `clip`'s weights as the CLIP of the project-format model in `folder`, into `out` (a copy of `folder`
    unless it is the same), in the dtype the folder stores (its source's `stored_dtype`, else float32); record
    `source_update` in the config's `source`. The networks' other files are left as they are."""
    folder, out = Path(folder), Path(out)
    if folder.resolve() != out.resolve():
        shutil.copytree(folder, out, dirs_exist_ok=True)
    config = json.loads((out / CONFIG_FILE).read_text())
    if not config.get("clip"):
        raise ValueError(f"{folder} has no CLIP to replace.")
    dtype = getattr(torch, (config.get("source") or {}).get("stored_dtype", "float32"))
    aliases = _save_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in clip.state_dict().items()},
                            out / config["clip"]["file"])
    config.setdefault("tied", {}).pop("clip", None)
    if aliases:
        config["tied"]["clip"] = aliases
    config["source"] = {**(config.get("source") or {}), **_jsonable(source_update or {})}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_pretrained(folder: str | Path, fetch=None) -> tuple[dict, DalleCheckpoint, dict | None]:
    """Read a project-format folder: (config, DalleCheckpoint with ``vae.*`` keys, CLIP weights or None).

    `fetch(name) -> Path` gets a file of the folder (default: ``folder / name``), so the same code reads Hub repos.
    """
    folder = Path(folder)
    fetch = fetch or (lambda name: folder / name)
    config_path = fetch(CONFIG_FILE)
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE} of {folder} cannot be read as JSON; download or copy it again.") from exc
    if not is_pretrained_config(config):
        raise ModelLoadError(f"{CONFIG_FILE} in {folder} is not a dalle_app model config (no \"format\": \"dalle_app\").")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} uses dalle_app format version {config['format_version']}, newer than this app reads "
            f"({FORMAT_VERSION}); update dalle_app."
        )
    tied = config.get("tied") or {}
    weights = remap.expand_shared(_load_safetensors(Path(fetch(MODEL_FILE))), tied.get("model", {}))
    vae_cfg = config.get("vae") or {}
    if vae_cfg.get("file"):
        vae_weights = remap.expand_shared(_load_safetensors(Path(fetch(vae_cfg["file"]))), tied.get("vae", {}))
        weights.update({"vae." + k: v for k, v in vae_weights.items()})
    clip_weights = None
    if config.get("clip"):
        clip_weights = remap.expand_shared(_load_safetensors(Path(fetch(config["clip"]["file"]))), tied.get("clip", {}))
    hparams = dict(config["dalle"])
    for key in ("attn_types", "shared_attn_ids", "shared_ff_ids"):
        if hparams.get(key) is not None:
            hparams[key] = tuple(hparams[key])
    source = config.get("source") or {}
    checkpoint = DalleCheckpoint(
        hparams=hparams, vae_kind=vae_cfg.get("kind"), vae_params=vae_cfg.get("params"),
        version=source.get("dalle_pytorch_version"), state_dict=weights,
        conv_like_window=config.get("conv_like_window", "above_left"), source_format=FORMAT_NAME,
        image_fmap_size=remap.fmap_size_from_keys(weights, hparams.get("text_seq_len")),
        recommended_sampling=dict(source.get("recommended_sampling") or {}),
    )
    return config, checkpoint, clip_weights


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, tokenizer_file: str | Path | None = None,
                       tokenizer_kind: str | None = None, hparams: dict | None = None, vae: str | Path | None = None,
                       card: str | None = None) -> Path:
    """Convert a DALLE-pytorch checkpoint (any supported vintage) into the project format in `out_dir`.

    `vae` is a separate VAE checkpoint (vae.pt or a taming .ckpt) for DALLE files saved without VAE weights.
    The tokenizer kind is inferred from `tokenizer_file` or the vocabulary size when not given.
    """
    from .vae_registry import vae_params_from_weights

    ckpt = read_checkpoint(checkpoint, hparams=hparams)
    if not isinstance(ckpt, DalleCheckpoint):
        raise ModelLoadError(f"{Path(checkpoint).name} is a VAE checkpoint, not a DALLE one; convert the dalle.pt instead.")
    vae_kind, vae_params, vae_weights = ckpt.vae_kind, ckpt.vae_params, ckpt.vae_weights()
    if vae is not None:
        vae_ckpt = read_checkpoint(vae)
        if not isinstance(vae_ckpt, VaeCheckpoint):
            raise ModelLoadError(f"{Path(vae).name} is not a VAE checkpoint.")
        vae_kind, vae_params, vae_weights = vae_ckpt.kind, vae_ckpt.params, vae_ckpt.state_dict
    if not vae_weights:
        raise ModelLoadError(
            f"{Path(checkpoint).name} holds no VAE weights; pass the VAE it was trained with (vae.pt or a VQGAN .ckpt)."
        )
    if vae_params is None:
        vae_params = vae_params_from_weights(vae_kind, vae_weights, ckpt.image_fmap_size)

    if tokenizer_kind is None:
        from dalle_app.tokenizers import TokenizerError, infer_tokenizer_kind

        try:
            tokenizer_kind = infer_tokenizer_kind(ckpt.hparams["num_text_tokens"],
                                                  [Path(tokenizer_file).name] if tokenizer_file else [])
        except TokenizerError:
            tokenizer_kind = None  # recorded as unknown; loading will ask for a tokenizer
    source = {"checkpoint": Path(checkpoint).name, "format": ckpt.source_format,
              "dalle_pytorch_version": ckpt.version, "notes": ckpt.notes}
    return write_pretrained(out_dir, hparams=ckpt.hparams, dalle_weights=ckpt.dalle_weights(), vae_kind=vae_kind,
                            vae_params=vae_params, vae_weights=vae_weights, conv_like_window=ckpt.conv_like_window,
                            tokenizer_kind=tokenizer_kind, tokenizer_file=tokenizer_file, source=source, card=card)
