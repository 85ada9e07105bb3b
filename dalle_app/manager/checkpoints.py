"""Read DALLE-pytorch checkpoints of every vintage without unpickling code, and normalise them.

Formats (spec section 5):

* ``train_dalle.py`` dicts: ``hparams``, ``vae_params``, ``weights``, ``version``, ``vae_class_name``
  (older ones lack some keys; the oldest file is a bare state_dict);
* DeepSpeed ``mp_rank_00_model_states.pt`` (``module`` + the client keys) and ``*-ds-cp`` folders with ``latest``;
* a bare state_dict (also with a ``model.`` / ``module.`` prefix) plus hparams given separately;
* ``train_vae.py`` ``vae.pt`` dicts and taming (Lightning) VQGAN ``.ckpt`` files;
* ``.safetensors`` state_dicts.

`read_checkpoint` returns a `DalleCheckpoint` (hparams with old-release defaults, VAE kind and params,
version, conv_like window, state_dict in DALLE-pytorch 1.6.6 layout, float32) or a `VaeCheckpoint`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import remap
from .errors import ModelLoadError
from .hparams import (
    VAE_KINDS,
    check_dalle_shapes,
    discrete_vae_params_from_keys,
    infer_vae_kind,
    normalize_hparams,
    parse_version,
)

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclass
class DalleCheckpoint:
    """A DALLE checkpoint brought to the DALLE-pytorch 1.6.6 layout."""

    hparams: dict
    vae_kind: str | None
    vae_params: dict | None
    version: str | None
    state_dict: dict
    conv_like_window: str
    source_format: str
    image_fmap_size: int | None = None
    notes: list = field(default_factory=list)
    # sampling settings the model was trained for (project format: config.json source.recommended_sampling)
    recommended_sampling: dict = field(default_factory=dict)

    def dalle_weights(self) -> dict:
        """Transformer/embedding tensors (no ``vae.*``)."""
        return {k: v for k, v in self.state_dict.items() if not k.startswith("vae.")}

    def vae_weights(self) -> dict:
        """The VAE tensors stored inside the DALLE checkpoint, without the ``vae.`` prefix."""
        return {k[4:]: v for k, v in self.state_dict.items() if k.startswith("vae.")}


@dataclass
class VaeCheckpoint:
    """A VAE on its own: ``train_vae.py`` output, a taming VQGAN checkpoint or a VAE state_dict."""

    kind: str
    params: dict | None
    state_dict: dict
    source_format: str
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------ file reading
def _refusal(path: Path, exc: Exception) -> ModelLoadError:
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    name = match[1] if match else "an object type outside the allowed list"
    return ModelLoadError(
        f"{path.name} contains a pickled Python object ({name}) that could run code when loaded, so it is refused; "
        "re-save only tensors and plain values (e.g. the state_dict and hparams dict) in an environment you trust."
    )


def safe_torch_load(path: str | Path):
    """`torch.load` with ``weights_only=True`` on CPU, turning every failure into one clear sentence."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot read {path.name} ({exc.strerror or exc}); check that the file exists and is readable."
        ) from exc
    if not magic:
        raise ModelLoadError(f"{path.name} is empty; download or copy it again.")
    is_zip = magic.startswith(b"PK")
    if is_zip and not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path.name} is truncated or damaged (its archive index is missing); download or copy it again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence
        if re.search(r"GLOBAL|Can only (create|build)|allowlisted", str(exc)):
            raise _refusal(path, exc) from exc
        if is_zip:
            raise ModelLoadError(
                f"{path.name} is truncated or damaged ({type(exc).__name__}); download or copy it again."
            ) from exc
        raise ModelLoadError(
            f"{path.name} is not a PyTorch checkpoint (or is truncated); give a .pt file written by torch.save."
        ) from exc


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid safetensors file (or is truncated); download it again.") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def resolve_deepspeed_folder(folder: Path) -> Path:
    """The ``mp_rank_00_model_states.pt`` of a DeepSpeed checkpoint folder (``*-ds-cp`` with ``latest``)."""
    if (folder / DEEPSPEED_MODEL_FILE).is_file():
        return folder / DEEPSPEED_MODEL_FILE
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        candidate = folder / tag / DEEPSPEED_MODEL_FILE
        if candidate.is_file():
            return candidate
        raise ModelLoadError(
            f"{folder.name}/latest names '{tag}', but {tag}/{DEEPSPEED_MODEL_FILE} is missing; copy that folder too."
        )
    steps = sorted(folder.glob(f"global_step*/{DEEPSPEED_MODEL_FILE}"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    if steps:
        return steps[-1]
    raise ModelLoadError(f"{folder} is not a DeepSpeed checkpoint folder (no 'latest' file or {DEEPSPEED_MODEL_FILE}).")


# ------------------------------------------------------------------------------------------ top level
def read_checkpoint(path: str | Path, hparams: dict | None = None, vae_params: dict | None = None,
                    vae_kind: str | None = None) -> DalleCheckpoint | VaeCheckpoint:
    """Read any supported checkpoint file or DeepSpeed folder.

    `hparams` (DALLE kwargs) override / complete the stored ones; they are required for a bare
    state_dict whose shapes do not tell everything. `vae_params` / `vae_kind` do the same for the VAE.
    """
    path = Path(path)
    if path.is_dir():
        path = resolve_deepspeed_folder(path)
    obj = _load_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path)
    return interpret(obj, path.name, hparams=hparams, vae_params=vae_params, vae_kind=vae_kind)


def interpret(obj, name: str, hparams: dict | None = None, vae_params: dict | None = None,
              vae_kind: str | None = None) -> DalleCheckpoint | VaeCheckpoint:
    """Classify a loaded checkpoint object and normalise it (see `read_checkpoint`)."""
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict or state_dict.")

    if "module" in obj and _is_state_dict(obj.get("module")):  # DeepSpeed model states
        return _dalle_from_parts(obj["module"], obj, "deepspeed", name, hparams, vae_params, vae_kind)

    weights = obj.get("weights")
    if isinstance(weights, str):  # DeepSpeed auxiliary.pt
        raise ModelLoadError(
            f"{name} holds only hparams (DeepSpeed auxiliary file); load the '-ds-cp' folder next to it instead."
        )
    if _is_state_dict(weights):
        if _looks_like_dalle(weights):
            return _dalle_from_parts(weights, obj, "train_dalle", name, hparams, vae_params, vae_kind)
        return _vae_from_state_dict(weights, obj.get("hparams"), "train_vae", name, vae_kind)

    if _is_state_dict(obj.get("state_dict")):  # PyTorch-Lightning, e.g. a taming VQGAN .ckpt
        return _vae_from_state_dict(obj["state_dict"], None, "lightning", name, vae_kind)

    if _is_state_dict(obj):
        stripped, _ = remap.strip_common_prefix(obj)
        if _looks_like_dalle(stripped):
            return _dalle_from_parts(obj, {}, "state_dict", name, hparams, vae_params, vae_kind)
        return _vae_from_state_dict(obj, None, "state_dict", name, vae_kind)

    raise ModelLoadError(
        f"{name} is a dict without model weights (keys: {', '.join(sorted(map(str, obj))[:8])}); "
        "give a dalle.pt / vae.pt written by DALLE-pytorch or a state_dict."
    )


def _looks_like_dalle(state_dict: dict) -> bool:
    return any(k.startswith(("text_emb.", "to_logits.", "transformer.")) for k in state_dict)


# ------------------------------------------------------------------------------------------ DALLE
def _dalle_from_parts(raw: dict, meta: dict, source: str, name: str, user_hparams: dict | None,
                      user_vae_params: dict | None, user_vae_kind: str | None) -> DalleCheckpoint:
    notes: list[str] = []
    state_dict, prefix = remap.strip_common_prefix(dict(raw))
    if prefix:
        notes.append(f"removed the '{prefix}' key prefix")
    state_dict, n_loss = remap.strip_vqgan_loss(state_dict)
    if n_loss:
        notes.append(f"dropped {n_loss} VQGAN loss tensors (vae.model.loss.*)")
    state_dict, renamed = remap.rename_axial_keys(state_dict)
    if renamed:
        notes.append("renamed image_pos_emb.weights_0/_1 to weights.0/.1")

    stored = meta.get("hparams")
    if stored is not None and not isinstance(stored, dict):
        raise ModelLoadError(f"{name} has an 'hparams' entry that is not a dict; pass the hparams separately.")
    version = meta.get("version")
    version = str(version) if version is not None else None
    hparams = normalize_hparams({**(stored or {}), **(user_hparams or {})}, state_dict, notes, name,
                                explicit=set(stored or {}) | set(user_hparams or {}))

    # Wrapper depth: the keys tell whether shift_tokens was on; the hparams must agree.
    key_shift = remap.infer_shift_tokens(state_dict)
    if key_shift is not None and key_shift != hparams["shift_tokens"]:
        raise ModelLoadError(
            f"The layer keys of {name} were saved with shift_tokens={key_shift} but the hparams say "
            f"shift_tokens={hparams['shift_tokens']}; set shift_tokens={key_shift} in hparams."
        )
    before = set(state_dict)
    state_dict = remap.remap_layer_keys(state_dict, hparams["shift_tokens"])
    if set(state_dict) != before:
        notes.append("moved layer keys to the 1.4.0+ wrapper depth")
    state_dict, added = remap.add_missing_layer_scale(state_dict, hparams["dim"])
    if added:
        notes.append("added LayerScale scale=1 for layers saved without it")

    # VAE kind and params.
    vae_params = user_vae_params if user_vae_params is not None else meta.get("vae_params")
    vae_kind = user_vae_kind or meta.get("vae_class_name") or infer_vae_kind(state_dict, vae_params)
    if vae_kind is not None and vae_kind not in VAE_KINDS:
        raise ModelLoadError(f"{name} names an unknown VAE class '{vae_kind}'; expected one of {', '.join(VAE_KINDS)}.")

    fmap = remap.fmap_size_from_keys(state_dict, hparams["text_seq_len"])
    pos_emb = state_dict.get("transformer.pos_emb")
    if pos_emb is not None and pos_emb.dim() == 4:
        if fmap is None:
            raise ModelLoadError(f"Cannot size the image grid of {name}; pass text_seq_len in hparams.")
        state_dict["transformer.pos_emb"] = remap.extend_rotary_table(pos_emb, hparams["text_seq_len"], fmap)
        notes.append("extended the 1.0.x rotary table by its last row")

    if vae_kind == "DiscreteVAE" and vae_params is None and any(k.startswith("vae.") for k in state_dict):
        vae_params = discrete_vae_params_from_keys(
            {k[4:]: v for k, v in state_dict.items() if k.startswith("vae.")}, fmap_size=fmap)
        notes.append("rebuilt vae_params from the VAE weights")

    state_dict, cast = remap.to_float32(state_dict)
    if cast:
        notes.append("cast fp16/bf16 tensors to float32")
    check_dalle_shapes(hparams, state_dict, name)

    parsed = parse_version(version)
    window = "centered" if parsed is None or parsed < (1, 5, 0) else "above_left"
    return DalleCheckpoint(hparams=hparams, vae_kind=vae_kind, vae_params=vae_params, version=version,
                           state_dict=state_dict, conv_like_window=window, source_format=source,
                           image_fmap_size=fmap, notes=notes)


# ------------------------------------------------------------------------------------------ VAE
def _vae_from_state_dict(raw: dict, params, source: str, name: str, user_kind: str | None) -> VaeCheckpoint:
    """A VAE's own state_dict, in the key layout of DALLE-pytorch's VAE classes (VQGAN weights under ``model.``)."""
    notes: list[str] = []
    state_dict, prefix = remap.strip_common_prefix(dict(raw), prefixes=("module.", "model.", "vae."))
    if prefix:
        notes.append(f"removed the '{prefix}' key prefix")
    if any(k.startswith("loss.") for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
        notes.append("dropped the VQGAN loss tensors (loss.*)")
    taming = any(k.startswith(("quantize.", "quant_conv.", "post_quant_conv.")) for k in state_dict)
    if taming:  # taming VQModel keys; DALLE-pytorch's VQGanVAE keeps them under `model.`
        state_dict = {"model." + k: v for k, v in state_dict.items()}
    kind = user_kind or infer_vae_kind({"vae." + k: v for k, v in state_dict.items()}, params)
    if kind is None:
        raise ModelLoadError(
            f"{name} is neither a DALLE nor a VAE checkpoint this app knows (no text_emb/transformer or VAE keys)."
        )
    if params is not None and not isinstance(params, dict):
        raise ModelLoadError(f"{name} has an 'hparams' entry that is not a dict.")
    if kind == "DiscreteVAE" and params is None:
        params = discrete_vae_params_from_keys(state_dict, fmap_size=None)
        notes.append("rebuilt DiscreteVAE params from the weights (image_size unknown)")
    state_dict, cast = remap.to_float32(state_dict)
    if cast:
        notes.append("cast fp16/bf16 tensors to float32")
    return VaeCheckpoint(kind=kind, params=dict(params) if params else params, state_dict=state_dict,
                         source_format=source, notes=notes)
