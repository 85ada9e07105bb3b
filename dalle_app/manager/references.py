"""Model references: a local path or a Hugging Face Hub reference, parsed and checked.

Accepted forms::

    ./weights/my-model            a folder (project format, DALLE-pytorch files, DeepSpeed `-ds-cp` folder)
    /data/dalle.pt                a checkpoint file: .pt / .pth / .ckpt / .bin / .safetensors
    owner/name                    a Hub repository (its default branch)
    owner/name:path/in/repo       one file or folder inside the repository
    owner/name@revision           a branch, tag or commit
    owner/name:path@revision      both
    hf://owner/name...            forces the Hub reading even if a local folder has the same name

A string that names an existing local file or folder is read as a local path (like
`from_pretrained` does). Local paths must lie inside an allowed root: the project's `weights/`
folder, the current directory and the folders listed in ``DALLE_APP_MODEL_DIRS`` (separated by
``os.pathsep``), so a web UI cannot be used to read arbitrary files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = PROJECT_ROOT / "weights"
MODEL_DIRS_ENV = "DALLE_APP_MODEL_DIRS"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")

_HUB_PREFIX = "hf://"
# owner/name, then an optional ":path" (no "@"), then an optional "@revision" (may contain "/").
_HUB_RE = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)"
    r"(?::(?P<path>[^@]+))?"
    r"(?:@(?P<revision>[^@\s]+))?"
)


@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference: either ``local`` (with ``path``) or ``hub`` (with ``repo_id``)."""

    kind: str  # "local" or "hub"
    path: Path | None = None
    repo_id: str | None = None
    path_in_repo: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind == "hub"

    def __str__(self) -> str:
        if self.kind == "local":
            return str(self.path)
        text = self.repo_id
        if self.path_in_repo:
            text += f":{self.path_in_repo}"
        if self.revision:
            text += f"@{self.revision}"
        return text


def default_allowed_roots() -> list[Path]:
    """The folders local model paths may live in: `weights/`, the current directory and `DALLE_APP_MODEL_DIRS`."""
    roots = [WEIGHTS_DIR, Path.cwd()]
    for item in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep):
        if item.strip():
            roots.append(Path(item.strip()).expanduser())
    return roots


def _resolve(path: Path) -> Path:
    return path.expanduser().resolve()


def check_allowed(path: Path, allowed_roots: list[Path] | None = None, given: str | None = None) -> Path:
    """Return `path` resolved, or raise ModelLoadError when it lies outside every allowed root.

    The message names the path as `given` (default: as passed), never its resolved form: that may be a server
    folder outside the allowed ones (e.g. the target of a symlink)."""
    resolved = _resolve(path)
    roots = [_resolve(r) for r in (allowed_roots if allowed_roots is not None else default_allowed_roots())]
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    folders = ", ".join(str(r) for r in roots)
    raise ModelLoadError(
        f"The local path {given or path} is outside the allowed model folders ({folders}); move it into one of them "
        f"or add its folder to the {MODEL_DIRS_ENV} environment variable."
    )


def _looks_local(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", "\\"))
        or text in (".", "..")
        or bool(re.match(r"^[A-Za-z]:[\\/]", text))  # Windows drive
        or text.lower().endswith(CHECKPOINT_SUFFIXES) and ":" not in text
    )


def parse_reference(text: str | os.PathLike, allowed_roots: list[Path] | None = None,
                    suffixes: tuple[str, ...] | None = CHECKPOINT_SUFFIXES) -> ModelReference:
    """Parse a model reference string into a ModelReference, checking local paths against the allowed roots.

    `suffixes` are the file endings a local file may have (None: any, e.g. for tokenizer files).
    """
    if isinstance(text, ModelReference):
        return text
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    text = str(text).strip()
    if not text:
        raise ModelLoadError("The model reference is empty; give a local path or a Hub reference like owner/name.")

    force_hub = text.startswith(_HUB_PREFIX)
    if force_hub:
        text = text[len(_HUB_PREFIX):]
    elif Path(text).expanduser().exists() or _looks_local(text):
        return _local_reference(Path(text), allowed_roots, suffixes, text)

    match = _HUB_RE.fullmatch(text)
    if match is None:
        raise ModelLoadError(
            f"'{text}' is neither an existing local path nor a Hub reference; use owner/name, "
            "owner/name:path/in/repo, owner/name@revision, or a path to a folder or .pt/.safetensors file."
        )
    path_in_repo = match["path"].strip("/") if match["path"] else None
    if path_in_repo and any(part in ("", ".", "..") for part in path_in_repo.split("/")):
        raise ModelLoadError(f"The path '{match['path']}' in the Hub reference '{text}' must be a plain relative path.")
    return ModelReference(kind="hub", repo_id=match["repo"], path_in_repo=path_in_repo, revision=match["revision"])


def _local_reference(path: Path, allowed_roots: list[Path] | None, suffixes, given: str) -> ModelReference:
    resolved = check_allowed(path, allowed_roots, given)
    if not resolved.exists():
        raise ModelLoadError(f"No file or folder exists at {given}; check the path.")
    if resolved.is_file() and suffixes and not resolved.name.lower().endswith(suffixes):
        raise ModelLoadError(
            f"{resolved.name} is not a model file; give a folder or a file ending in {', '.join(suffixes)}."
        )
    return ModelReference(kind="local", path=resolved)
