"""From a model reference to the files that make up the model (no networks are built here).

A reference points at a folder or a file, locally or in a Hub repository. In a folder we look for,
in order: the project format (config.json + model.safetensors), a DeepSpeed checkpoint (``latest`` /
``mp_rank_00_model_states.pt``), then one DALLE-pytorch checkpoint file; next to it a hparams.json,
a tokenizer file, a separate VAE (vae.pt, a VQGAN .ckpt and its .yaml) when the DALLE file has none.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from .checkpoints import DEEPSPEED_MODEL_FILE, DalleCheckpoint, VaeCheckpoint, read_checkpoint
from .errors import ModelLoadError
from .hub import HubOptions, hub_download, hub_list_files
from .pretrained import CONFIG_FILE, MODEL_FILE, read_pretrained
from .references import CHECKPOINT_SUFFIXES, ModelReference, parse_reference

PREFERRED_CHECKPOINTS = ("dalle.pt", "dalle-final.pt", "dalle_final.pt", "model_state.pt", "dalle.safetensors",
                         "model.pt", "pytorch_model.bin")
IGNORED_WORDS = ("optimizer", "optim", "scheduler", "auxiliary", "training_args", "expected")
VAE_WORDS = ("vae", "vqgan", "dvae", "taming")
HPARAMS_FILES = ("hparams.json", "dalle_hparams.json", CONFIG_FILE)
_SCAN_LIMIT = 2000


@dataclass(frozen=True)
class FileRecord:
    """A file the model was read from: local path and, for Hub files, repo, path in repo and commit."""

    path: Path
    filename: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def to_json(self) -> dict:
        size = self.path.stat().st_size if self.path.exists() else None
        return {"path": str(self.path), "filename": self.filename, "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit, "size": size}


class LocalSource:
    """Files of a local folder, named by their path relative to it."""

    def __init__(self, root: Path, depth: int = 3):
        self.root, self.depth = root, depth
        self.records: list[FileRecord] = []

    def names(self) -> list[str]:
        """Files up to `depth` levels down (hidden ones skipped), without walking deeper."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            rel = Path(folder).relative_to(self.root)
            level = len(rel.parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level + 1 < self.depth else []
            found.extend((rel / f).as_posix() for f in sorted(files) if not f.startswith("."))
            if len(found) >= _SCAN_LIMIT:
                break
        return sorted(found)

    def fetch(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; copy the whole model folder.")
        self.records.append(FileRecord(path=path, filename=name))
        return path


class HubSource:
    """Files of a Hub repository at one revision, fetched through the Hub cache."""

    def __init__(self, repo_id: str, revision: str | None, options: HubOptions):
        self.repo_id, self.revision, self.options = repo_id, revision, options
        self.commit, self._names = hub_list_files(repo_id, revision, options)
        self.records: list[FileRecord] = []

    def names(self) -> list[str]:
        return list(self._names)

    def fetch(self, name: str) -> Path:
        got = hub_download(self.repo_id, name, self.revision, self.options)
        self.records.append(FileRecord(path=got.local_path, filename=name, repo_id=self.repo_id,
                                       revision=got.revision, commit=got.commit))
        return got.local_path


@dataclass
class ResolvedModel:
    """Everything read for one reference, before networks are built."""

    reference: str
    checkpoint: DalleCheckpoint
    vae: VaeCheckpoint | None = None  # separate VAE weights (override or found next to the checkpoint)
    vae_config_file: Path | None = None
    clip_params: dict | None = None
    clip_weights: dict | None = None
    tokenizer_kind: str | None = None
    tokenizer_file: Path | None = None
    files: list[FileRecord] = field(default_factory=list)
    format: str = "dalle_pytorch"


def _in_dir(names: list[str], base: str) -> list[str]:
    """Names directly inside folder `base` ("" = top level), as full names."""
    return [n for n in names if str(PurePosixPath(n).parent) == (base or ".")]


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _is_checkpoint_name(name: str) -> bool:
    lower = PurePosixPath(name).name.lower()
    return lower.endswith(CHECKPOINT_SUFFIXES) and not any(w in lower for w in IGNORED_WORDS)


def _is_vae_name(name: str) -> bool:
    return any(w in PurePosixPath(name).name.lower() for w in VAE_WORDS)


def choose_checkpoint(names: list[str], base: str, where: str, hub: bool = False) -> str:
    """The DALLE checkpoint among the files of folder `base`: a preferred name, else the only candidate."""
    candidates = [n for n in _in_dir(names, base) if _is_checkpoint_name(n) and not _is_vae_name(n)]
    for preferred in PREFERRED_CHECKPOINTS:
        if _join(base, preferred) in candidates:
            return _join(base, preferred)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(
            f"{where} holds no model files (config.json + model.safetensors, or a .pt/.ckpt/.safetensors checkpoint); "
            "point the reference at the folder or file that has them."
        )
    shown = ", ".join(PurePosixPath(c).name for c in candidates[:6])
    how = f"name one, e.g. {where}:{candidates[0]}" if hub else "give the path of the one to load"
    raise ModelLoadError(f"{where} holds several checkpoints ({shown}); {how}.")


def _deepspeed_model_file(names: list[str], base: str, fetch) -> str | None:
    latest = _join(base, "latest")
    if latest in names:
        tag = Path(fetch(latest)).read_text().strip()
        name = _join(base, f"{tag}/{DEEPSPEED_MODEL_FILE}")
        if name not in names:
            raise ModelLoadError(f"The DeepSpeed folder's 'latest' names '{tag}' but {name} is missing; copy that folder too.")
        return name
    direct = _join(base, DEEPSPEED_MODEL_FILE)
    if direct in names:
        return direct
    steps = [n for n in names if re.fullmatch(re.escape(_join(base, "")) + r"global_step(\d+)/" + DEEPSPEED_MODEL_FILE, n)]
    if steps:
        return max(steps, key=lambda n: int(re.search(r"global_step(\d+)", n)[1]))
    return None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} ({path.name}) is not valid JSON; fix or remove it.") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} ({path.name}) must hold a JSON object of DALLE hparams.")
    return data


def resolve(reference: str | ModelReference, *, hub_options: HubOptions | None = None,
            allowed_roots: list[Path] | None = None, hparams: dict | None = None,
            vae: str | None = None) -> ResolvedModel:
    """Find and read the files of a model reference (see the module docstring)."""
    ref = parse_reference(reference, allowed_roots)
    hub_options = hub_options or HubOptions()
    if ref.is_hub:
        source = HubSource(ref.repo_id, ref.revision, hub_options)
        names = source.names()
        target = ref.path_in_repo or ""
        if target and target not in names and not any(n.startswith(target + "/") for n in names):
            raise ModelLoadError(
                f"'{target}' is neither a file nor a folder of the Hub repository '{ref.repo_id}'"
                + (f" at revision '{ref.revision}'" if ref.revision else "") + "; check the path after the ':'."
            )
        is_file = target in names
        where = ref.repo_id
    else:
        is_file = ref.path.is_file()
        source = LocalSource(ref.path.parent, depth=1) if is_file else LocalSource(ref.path)
        names = source.names()
        target = ref.path.name if is_file else ""
        where = str(ref.path)
    base = str(PurePosixPath(target).parent) if is_file else target
    base = "" if base == "." else base
    folder_names = _in_dir(names, base)

    if not is_file and _join(base, CONFIG_FILE) in names and _join(base, MODEL_FILE) in names:
        resolved = _resolve_pretrained(source, base, where)
    else:
        if is_file:
            ckpt_name = target
        else:
            ckpt_name = _deepspeed_model_file(names, base, source.fetch) or choose_checkpoint(names, base, where, ref.is_hub)
        user_hparams = dict(hparams or {})
        hp_name = next((n for n in (_join(base, h) for h in HPARAMS_FILES) if n in folder_names), None)
        if hp_name is not None:
            stored = _read_json(source.fetch(hp_name), "The hparams file")
            stored = stored.get("dalle", stored.get("hparams", stored))
            user_hparams = {**stored, **user_hparams}
        ckpt = read_checkpoint(source.fetch(ckpt_name), hparams=user_hparams or None)
        if isinstance(ckpt, VaeCheckpoint):
            raise ModelLoadError(f"{ckpt_name} is a VAE checkpoint ({ckpt.kind}); load a DALLE checkpoint and pass "
                                 "this file as its VAE.")
        resolved = ResolvedModel(reference=str(ref), checkpoint=ckpt)
        if not ckpt.vae_weights() and vae is None:
            _attach_sibling_vae(resolved, source, folder_names, ckpt_name)
        _attach_tokenizer_files(resolved, source, folder_names)

    if vae is not None:
        resolved.vae = _read_vae_reference(vae, allowed_roots, hub_options, resolved)
    resolved.reference = str(ref)
    resolved.files = list(source.records) + resolved.files
    return resolved


def _resolve_pretrained(source, base: str, where: str) -> ResolvedModel:
    config, ckpt, clip_weights = read_pretrained(_join(where, base) if base else where,
                                                 fetch=lambda name: source.fetch(_join(base, name)))
    resolved = ResolvedModel(reference="", checkpoint=ckpt, format="dalle_app",
                             clip_params=(config.get("clip") or {}).get("params"), clip_weights=clip_weights)
    tokenizer = config.get("tokenizer") or {}
    resolved.tokenizer_kind = tokenizer.get("kind")
    if tokenizer.get("file"):
        resolved.tokenizer_file = source.fetch(_join(base, tokenizer["file"]))
    return resolved


def _attach_sibling_vae(resolved: ResolvedModel, source, folder_names: list[str], ckpt_name: str) -> None:
    candidates = [n for n in folder_names if n != ckpt_name and _is_checkpoint_name(n) and _is_vae_name(n)]
    if len(candidates) == 1:
        vae_ckpt = read_checkpoint(source.fetch(candidates[0]))
        if isinstance(vae_ckpt, VaeCheckpoint):
            resolved.vae = vae_ckpt
    yaml = [n for n in folder_names if n.lower().endswith((".yaml", ".yml"))]
    if len(yaml) == 1:
        resolved.vae_config_file = source.fetch(yaml[0])


def _attach_tokenizer_files(resolved: ResolvedModel, source, folder_names: list[str]) -> None:
    from dalle_app.tokenizers import TokenizerError, find_tokenizer_file, infer_tokenizer_kind

    num_text_tokens = resolved.checkpoint.hparams["num_text_tokens"]
    candidates = [n for n in folder_names if not n.lower().endswith((".json",)) or fnmatch(n.lower(), "*tokenizer.json")]
    try:
        kind = infer_tokenizer_kind(num_text_tokens, candidates)
    except TokenizerError:
        return  # decided later: the user may name a tokenizer
    resolved.tokenizer_kind = kind
    name = find_tokenizer_file(kind, candidates)
    if name is not None:
        resolved.tokenizer_file = source.fetch(name)


def _read_vae_reference(vae: str, allowed_roots, hub_options: HubOptions, resolved: ResolvedModel) -> VaeCheckpoint:
    """A separate VAE given by the user: a local or Hub reference to vae.pt / a VQGAN .ckpt / a VAE folder."""
    ref = parse_reference(vae, allowed_roots)
    if ref.is_hub:
        source = HubSource(ref.repo_id, ref.revision, hub_options)
        if not ref.path_in_repo:
            names = [n for n in source.names() if _is_checkpoint_name(n)]
            if len(names) != 1:
                raise ModelLoadError(f"Name the VAE file in '{ref.repo_id}' as {ref.repo_id}:path/to/vae.pt.")
            name = names[0]
        else:
            name = ref.path_in_repo
        path = source.fetch(name)
        yaml = [n for n in source.names() if n.lower().endswith((".yaml", ".yml"))
                and PurePosixPath(n).parent == PurePosixPath(name).parent]
        if len(yaml) == 1:
            resolved.vae_config_file = source.fetch(yaml[0])
        resolved.files.extend(source.records)
    else:
        path = ref.path
        if path.is_dir():
            names = [p for p in sorted(path.iterdir()) if p.is_file() and _is_checkpoint_name(p.name)]
            if len(names) != 1:
                raise ModelLoadError(f"Give the VAE file itself, not the folder {path}.")
            yaml = [p for p in sorted(path.iterdir()) if p.suffix in (".yaml", ".yml")]
            if len(yaml) == 1:
                resolved.vae_config_file = yaml[0]
            path = names[0]
        resolved.files.append(FileRecord(path=path, filename=path.name))
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, VaeCheckpoint):
        raise ModelLoadError(f"{path.name} is a DALLE checkpoint, not a VAE; pass the VAE's own file.")
    return ckpt
