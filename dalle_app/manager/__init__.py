"""Model manager: model references, Hub downloads, checkpoint formats, model building and caching.

    from dalle_app.manager import ModelManager
    model = ModelManager().load("owner/name")        # or a local folder / dalle.pt
    model.dalle, model.vae, model.clip, model.tokenizer, model.device, model.dtype, model.info()
"""

from .catalog import BUILTIN_ENTRY, BUILTIN_MODEL_DIR, BUILTIN_MODEL_NAME, Catalog, CatalogEntry
from .checkpoints import DalleCheckpoint, VaeCheckpoint, read_checkpoint, safe_torch_load
from .errors import ModelLoadError
from .hub import HubFile, HubOptions, hub_download, hub_list_files
from .manager import LoadedModel, ModelManager, build_model, default_device, default_dtype
from .pretrained import convert_checkpoint, read_pretrained, recommended_sampling, save_pretrained, write_pretrained
from .references import ModelReference, default_allowed_roots, parse_reference
from .remap import rotary_table
from .resolve import FileRecord, ResolvedModel, resolve
from .vae_registry import build_vae, register_vae_kind, vae_kinds


def load_pretrained(reference: str, **kwargs) -> LoadedModel:
    """Load a model (project format or any DALLE-pytorch checkpoint) with a one-off ModelManager.

    Keyword arguments: device, dtype, hub_options, allowed_roots (for the manager) and tokenizer,
    vae, hparams (for the model).
    """
    manager_keys = {"device", "dtype", "hub_options", "allowed_roots", "memory_budget"}
    manager = ModelManager(**{k: v for k, v in kwargs.items() if k in manager_keys})
    return manager.load(reference, **{k: v for k, v in kwargs.items() if k not in manager_keys})


__all__ = [
    "BUILTIN_ENTRY", "BUILTIN_MODEL_DIR", "BUILTIN_MODEL_NAME", "Catalog", "CatalogEntry", "DalleCheckpoint",
    "FileRecord", "HubFile", "HubOptions", "LoadedModel", "ModelLoadError", "ModelManager", "ModelReference",
    "ResolvedModel", "VaeCheckpoint", "build_model", "build_vae", "convert_checkpoint", "default_allowed_roots",
    "default_device", "default_dtype", "hub_download", "hub_list_files", "load_pretrained", "parse_reference",
    "read_checkpoint", "read_pretrained", "register_vae_kind", "resolve", "rotary_table", "safe_torch_load",
    "save_pretrained", "vae_kinds", "write_pretrained",
]
