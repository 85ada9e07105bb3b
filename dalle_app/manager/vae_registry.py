"""VAE kinds, keyed by DALLE-pytorch's `vae_class_name`, built through one small registry.

Each kind names its class as "module:attribute" and is imported only when used, so a kind whose
module is missing (or broken) fails with one sentence and does not stop the others. A new kind is
one `register_vae_kind` call; nothing else in the manager changes.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable

from .errors import ModelLoadError
from .hparams import discrete_vae_params_from_keys


@dataclass(frozen=True)
class VaeKind:
    """How to build one kind of VAE: its class and how to read its params off its weights."""

    name: str
    target: str  # "package.module:ClassName"
    from_config: bool  # True: Class.from_config(params); False: Class(**params)
    params_from_weights: Callable[[dict, int | None], dict] | None = None


_REGISTRY: dict[str, VaeKind] = {}


def register_vae_kind(name: str, target: str, *, from_config: bool = False,
                      params_from_weights: Callable[[dict, int | None], dict] | None = None) -> None:
    """Add or replace a VAE kind; `params_from_weights(weights, fmap_size)` rebuilds params from a state_dict."""
    _REGISTRY[name] = VaeKind(name, target, from_config, params_from_weights)


def vae_kinds() -> list[str]:
    """Names of the registered VAE kinds."""
    return list(_REGISTRY)


def _kind(name: str | None) -> VaeKind:
    if name not in _REGISTRY:
        raise ModelLoadError(f"Unknown VAE kind '{name}'; this app knows {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def vae_class(name: str):
    """Import and return the class of a VAE kind."""
    kind = _kind(name)
    module_name, attr = kind.target.split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"The {name} VAE needs {kind.target.replace(':', '.')}, which cannot be imported ({exc}); "
            "install the missing part of dalle_app."
        ) from exc


def build_vae(name: str, params: dict | None):
    """Construct an untrained VAE of kind `name` from its params (weights are loaded by the caller)."""
    kind, cls = _kind(name), vae_class(name)
    params = dict(params or {})
    try:
        return cls.from_config(params) if kind.from_config else cls(**params)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"The {name} VAE cannot be built from params {params}: {exc}") from exc


def vae_params_from_weights(name: str, weights: dict, fmap_size: int | None) -> dict:
    """Params of a VAE read off its own state_dict; `fmap_size` (token grid side) fixes image_size when known."""
    kind = _kind(name)
    if kind.params_from_weights is None:
        raise ModelLoadError(f"The {name} VAE's params cannot be read off its weights; pass them explicitly.")
    try:
        return kind.params_from_weights(weights, fmap_size)
    except ValueError as exc:
        raise ModelLoadError(f"The {name} VAE weights do not fit its architecture: {exc}") from exc


def vae_geometry(vae) -> tuple[int, int, int]:
    """(codebook size, token grid side, image size) from the attributes every VAE kind exposes."""
    return int(vae.num_tokens), int(vae.image_size) // 2 ** int(vae.num_layers), int(vae.image_size)


# ------------------------------------------------------------------------------------------ built-in kinds
def _openai_params(weights: dict, fmap_size: int | None) -> dict:
    from dalle_app.models.openai_dvae import config_from_state_dict

    params = config_from_state_dict(weights)
    if fmap_size:
        params["image_size"] = fmap_size * 2 ** (params["group_count"] - 1)
    return params


def _vqgan_params(weights: dict, fmap_size: int | None) -> dict:
    from dalle_app.models.vqgan import infer_vqgan_config

    cfg = asdict(infer_vqgan_config(weights, prefix="model."))
    cfg["ch_mult"], cfg["attn_resolutions"] = list(cfg["ch_mult"]), list(cfg["attn_resolutions"])
    if fmap_size:
        cfg["image_size"] = fmap_size * 2 ** (len(cfg["ch_mult"]) - 1)
    return cfg


register_vae_kind("DiscreteVAE", "dalle_app.models:DiscreteVAE", params_from_weights=discrete_vae_params_from_keys)
register_vae_kind("OpenAIDiscreteVAE", "dalle_app.models.openai_dvae:OpenAIDiscreteVAE", from_config=True,
                  params_from_weights=_openai_params)
register_vae_kind("VQGanVAE", "dalle_app.models.vqgan:VQGanVAE", from_config=True, params_from_weights=_vqgan_params)
