"""ModelManager: turn a model reference into a ready, placed `LoadedModel`, and keep recent ones cached.

* Device: CUDA when available, else MPS, else CPU (env ``DALLE_APP_DEVICE`` or ``device=`` overrides).
* dtype: bf16 on CUDA (fp16 where bf16 is unsupported), float32 elsewhere (``DALLE_APP_DTYPE`` / ``dtype=``).
* Cache: loaded models are kept in LRU order within a memory budget (``DALLE_APP_MEMORY_BUDGET``, e.g. "6GB").
  Concurrent requests for one model load it once (a lock per cache key); the manager-wide lock is only
  held for dictionary updates, so loading one model never blocks callers using another.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError
from .hparams import check_vae_match
from .hub import HubOptions
from .policy import VisitorPolicy, visitor_message
from .references import default_allowed_roots, parse_reference
from .resolve import FileRecord, ResolvedModel, resolve
from .tokenizer_choice import choose_tokenizer
from .vae_registry import build_vae, vae_geometry, vae_params_from_weights

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def default_device() -> torch.device:
    """``DALLE_APP_DEVICE`` if set, else CUDA, else MPS, else CPU."""
    if os.environ.get("DALLE_APP_DEVICE"):
        return torch.device(os.environ["DALLE_APP_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' (and long names) -> torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"Unknown dtype '{value}'; use bf16, fp16 or fp32.") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """``DALLE_APP_DTYPE`` if set, else bf16 on CUDA (fp16 without bf16 support), else float32."""
    if os.environ.get("DALLE_APP_DTYPE"):
        return parse_dtype(os.environ["DALLE_APP_DTYPE"])
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_size(text: str) -> int:
    """'6GB' / '512MB' / '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([\d.e+]+)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"Cannot read the size '{text}'; write e.g. 6GB or 512MB.")
    unit = (m[2] or "b").rstrip("b").rstrip("i")
    return int(float(m[1]) * 1024 ** " kmgt".index(unit or " "))


def default_memory_budget(device: torch.device) -> int:
    """Bytes of weights to keep loaded: env override, else 80% of GPU memory or 50% of RAM."""
    if os.environ.get("DALLE_APP_MEMORY_BUDGET"):
        return parse_size(os.environ["DALLE_APP_MEMORY_BUDGET"])
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024 ** 3


def _unique_numel_and_bytes(*modules) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers), counting tensors shared between modules once."""
    seen, numel, nbytes = set(), 0, 0
    for module in modules:
        if module is None:
            continue
        tensors = [(t, True) for t in module.parameters()] + [(t, False) for t in module.buffers()]
        for tensor, is_param in tensors:
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            numel += tensor.numel() if is_param else 0
            nbytes += tensor.numel() * tensor.element_size()
    return numel, nbytes


@dataclass
class LoadedModel:
    """A model ready to generate with: networks on `device` in `dtype`, its tokenizer and where it came from."""

    dalle: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module | None
    tokenizer: object
    config: dict  # the project-format config (see pretrained.py): dalle hparams, vae, clip, tokenizer, source
    device: torch.device
    dtype: torch.dtype
    files: list[FileRecord] = field(default_factory=list)
    reference: str = ""
    tokenizer_file: Path | None = None
    nbytes: int = 0

    @property
    def hparams(self) -> dict:
        return self.config["dalle"]

    @property
    def image_size(self) -> int:
        return vae_geometry(self.vae)[2]

    @property
    def image_fmap_size(self) -> int:
        return vae_geometry(self.vae)[1]

    @property
    def image_tokens(self) -> int:
        return self.image_fmap_size ** 2

    def parameter_counts(self) -> dict:
        """Unique parameters (shared tensors once) of the transformer, the VAE and CLIP."""
        total = _unique_numel_and_bytes(self.dalle)[0]
        vae = _unique_numel_and_bytes(self.vae)[0]
        clip = _unique_numel_and_bytes(self.clip)[0]
        return {"dalle": total - vae, "vae": vae, "clip": clip, "total": total + clip}

    def info(self) -> dict:
        """JSON-ready description (what `python -m dalle_app info` prints)."""
        tok = self.tokenizer
        return {
            "reference": self.reference,
            "format": self.config.get("source", {}).get("format"),
            "hparams": self.hparams,
            "conv_like_window": self.config.get("conv_like_window"),
            "vae": {**self.config["vae"], "num_tokens": int(self.vae.num_tokens)},
            "image": {"size": self.image_size, "fmap_size": self.image_fmap_size, "tokens": self.image_tokens},
            "tokenizer": {"kind": getattr(tok, "kind", None), "name": getattr(tok, "name", type(tok).__name__),
                          "vocab_size": getattr(tok, "vocab_size", None),
                          "file": str(self.tokenizer_file) if self.tokenizer_file else None},
            "clip": self.config.get("clip"),
            "parameters": self.parameter_counts(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "files": [f.to_json() for f in self.files],
            "source": self.config.get("source", {}),
        }


def _load_weights(module, state_dict: dict, what: str, name: str) -> None:
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        text = str(exc)
        m = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)) from "
                      r"checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", text)
        if m:
            raise ModelLoadError(
                f"{name}: {m[1]} has shape {m[2][11:-1]} in the checkpoint but {m[3][11:-1]} in the {what} built "
                "from its hparams; fix the hparams (or VAE) to match the weights."
            ) from exc
        missing = re.findall(r'Missing key\(s\) in state_dict: ((?:"[^"]+",? ?){1,3})', text)
        unexpected = re.findall(r'Unexpected key\(s\) in state_dict: ((?:"[^"]+",? ?){1,3})', text)
        detail = "; ".join(x for x in (f"missing {missing[0].strip(', ')}" if missing else "",
                                      f"unexpected {unexpected[0].strip(', ')}" if unexpected else "") if x)
        raise ModelLoadError(
            f"{name}: the weights do not fit the {what} ({detail or type(exc).__name__}); the checkpoint's layout "
            "or hparams are not what this app expects."
        ) from exc


def build_model(resolved: ResolvedModel, *, device: torch.device, dtype: torch.dtype,
                tokenizer: str | None = None, allowed_roots=None, hub_options: HubOptions | None = None) -> LoadedModel:
    """Build and place the networks of a resolved model and load its tokenizer."""
    from dalle_app.models import CLIP, DALLE

    ckpt = resolved.checkpoint
    name = resolved.reference
    if resolved.vae is not None:
        vae_kind, vae_params, vae_weights = resolved.vae.kind, resolved.vae.params, resolved.vae.state_dict
    else:
        vae_kind, vae_params, vae_weights = ckpt.vae_kind, ckpt.vae_params, ckpt.vae_weights()
    if not vae_weights:
        raise ModelLoadError(
            f"{name} holds no VAE weights; pass the VAE it was trained with (vae.pt or a VQGAN .ckpt) as vae=."
        )
    if vae_params is None and resolved.vae_config_file is not None and vae_kind == "VQGanVAE":
        from dalle_app.models.vqgan import parse_taming_yaml

        vae_params = parse_taming_yaml(resolved.vae_config_file.read_text())
    if vae_params is None:
        vae_params = vae_params_from_weights(vae_kind, vae_weights, ckpt.image_fmap_size)
    vae = build_vae(vae_kind, vae_params)
    _load_weights(vae, vae_weights, f"{vae_kind} VAE", name)
    tokens, fmap, _ = vae_geometry(vae)
    check_vae_match(ckpt.hparams, ckpt.state_dict, tokens, fmap, f"{vae_kind}, {tokens} codes", name)

    try:
        dalle = DALLE(vae=vae, conv_like_window=ckpt.conv_like_window, **ckpt.hparams)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{name}: DALLE cannot be built from hparams {ckpt.hparams}: {exc}") from exc
    weights = ckpt.dalle_weights()
    weights.update({"vae." + k: v for k, v in vae.state_dict().items()})
    _load_weights(dalle, weights, "DALLE", name)

    clip = None
    if resolved.clip_weights is not None:
        clip = CLIP(**(resolved.clip_params or {}))
        _load_weights(clip, resolved.clip_weights, "CLIP", name)

    tok, tok_kind, tok_file, tok_records = choose_tokenizer(
        ckpt.hparams["num_text_tokens"], requested=tokenizer, found_kind=resolved.tokenizer_kind,
        found_file=resolved.tokenizer_file, allowed_roots=allowed_roots, hub_options=hub_options, name=name)

    for module in (dalle, clip):
        if module is not None:
            module.eval().requires_grad_(False)
            module.to(device=device, dtype=dtype)
    to_config = getattr(vae, "to_config", None)
    config = {
        "dalle": ckpt.hparams,
        "conv_like_window": ckpt.conv_like_window,
        "vae": {"kind": vae_kind, "params": to_config() if callable(to_config) else vae_params},
        "clip": {"params": resolved.clip_params} if clip is not None else None,
        "tokenizer": {"kind": tok_kind, "file": tok_file.name if tok_file else None},
        "source": {"format": ckpt.source_format, "dalle_pytorch_version": ckpt.version, "notes": ckpt.notes,
                   **({"recommended_sampling": ckpt.recommended_sampling} if ckpt.recommended_sampling else {})},
    }
    nbytes = _unique_numel_and_bytes(dalle, clip)[1]
    return LoadedModel(dalle=dalle, vae=dalle.vae if hasattr(dalle, "vae") else vae, clip=clip, tokenizer=tok,
                       config=config, device=device, dtype=dtype, files=resolved.files + tok_records,
                       reference=name, tokenizer_file=tok_file, nbytes=nbytes)


class ModelManager:
    """Loads models by reference and caches them (LRU within a memory budget); thread-safe.

    visitor_policy: what references typed by the app's visitors may name (`load(..., visitor=True)`); default from
    DALLE_APP_HUB / DALLE_APP_ALLOWED_REPOS (see policy.py), which allow everything when unset."""

    def __init__(self, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 memory_budget: int | str | None = None, hub_options: HubOptions | None = None,
                 allowed_roots: list[Path] | None = None, visitor_policy: VisitorPolicy | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype) if dtype is not None else default_dtype(self.device)
        if isinstance(memory_budget, str):
            memory_budget = parse_size(memory_budget)
        self.memory_budget = memory_budget if memory_budget is not None else default_memory_budget(self.device)
        self.hub_options = hub_options or HubOptions()
        self.allowed_roots = allowed_roots
        self.visitor_policy = visitor_policy or VisitorPolicy.from_env()
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self.loads = 0  # number of real (uncached) loads, for tests and the UI

    def _key(self, reference, tokenizer, vae, hparams, device, dtype) -> tuple:
        canonical = str(parse_reference(reference, self.allowed_roots))  # './m' and 'm' are one model
        hp = tuple(sorted((k, repr(v)) for k, v in (hparams or {}).items()))
        return (canonical, tokenizer, vae, hp, str(device), str(dtype))

    def load(self, reference: str, *, tokenizer: str | None = None, vae: str | None = None,
             hparams: dict | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, visitor: bool = False) -> LoadedModel:
        """Return the model for `reference` (loading it if needed); raises ModelLoadError with one sentence.

        visitor=True: the reference was typed by a visitor of the app: `visitor_policy` applies, and the error
        message shows the reference as given, without server paths outside the allowed model folders."""
        if visitor:
            given, ref = str(reference).strip(), None
            try:
                ref = parse_reference(given, self.allowed_roots)
                self.visitor_policy.check(ref, given)
                return self.load(given, tokenizer=tokenizer, vae=vae, hparams=hparams, device=device, dtype=dtype)
            except ModelLoadError as exc:
                roots = self.allowed_roots if self.allowed_roots is not None else default_allowed_roots()
                raise ModelLoadError(visitor_message(str(exc), given, ref, roots)) from exc
        device = torch.device(device) if device is not None else self.device
        dtype = parse_dtype(dtype) if dtype is not None else (self.dtype if device == self.device
                                                                else default_dtype(device))
        key = self._key(reference, tokenizer, vae, hparams, device, dtype)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            model = self._load_uncached(reference, tokenizer=tokenizer, vae=vae, hparams=hparams,
                                        device=device, dtype=dtype)
            with self._lock:
                self.loads += 1
                self._cache[key] = model
                self._evict_over_budget(keep=key)
                self._key_locks.pop(key, None)
        return model

    def resolve(self, reference: str, *, vae: str | None = None, hparams: dict | None = None) -> ResolvedModel:
        """Read a model's files without building networks (see resolve.resolve)."""
        return resolve(reference, hub_options=self.hub_options, allowed_roots=self.allowed_roots,
                       hparams=hparams, vae=vae)

    def _load_uncached(self, reference, *, tokenizer, vae, hparams, device, dtype) -> LoadedModel:
        resolved = self.resolve(reference, vae=vae, hparams=hparams)
        return build_model(resolved, device=device, dtype=dtype, tokenizer=tokenizer,
                           allowed_roots=self.allowed_roots, hub_options=self.hub_options)

    def _evict_over_budget(self, keep: tuple) -> None:
        total = sum(m.nbytes for m in self._cache.values())
        for key in list(self._cache):
            if total <= self.memory_budget:
                break
            if key == keep:
                continue
            total -= self._cache.pop(key).nbytes
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def loaded(self) -> list[str]:
        """References of the cached models, least recently used first."""
        with self._lock:
            return [key[0] for key in self._cache]

    def unload(self, reference: str) -> None:
        """Drop every cached model of `reference` (running generations keep their own reference to it)."""
        canonical = str(parse_reference(reference, self.allowed_roots))
        with self._lock:
            for key in [k for k in self._cache if k[0] == canonical]:
                del self._cache[key]

    def clear(self) -> None:
        """Drop all cached models."""
        with self._lock:
            self._cache.clear()
