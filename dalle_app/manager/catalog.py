"""The catalog of known models the UI lists: the built-in default first, then user-added references.

User entries are kept in a JSON file (``DALLE_APP_CATALOG``, default ``~/.cache/dalle_app/catalog.json``)
when a path is given, so they survive restarts.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelLoadError
from .references import WEIGHTS_DIR, parse_reference

BUILTIN_MODEL_NAME = "shapes-dalle"
BUILTIN_MODEL_DIR = WEIGHTS_DIR / BUILTIN_MODEL_NAME  # the built-in model (project format), the default
DEFAULT_CATALOG_PATH = Path.home() / ".cache" / "dalle_app" / "catalog.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One model the UI can offer: a display name, its reference, and a short description."""

    name: str
    reference: str
    description: str = ""
    builtin: bool = False


BUILTIN_ENTRY = CatalogEntry(
    name=BUILTIN_MODEL_NAME,
    reference=str(BUILTIN_MODEL_DIR),
    description="Built-in model trained on the synthetic shapes world (small, runs on CPU).",
    builtin=True,
)


class Catalog:
    """Known models; `add` checks the reference's syntax (and local paths' allowed roots) before storing it."""

    def __init__(self, path: str | Path | None = None, allowed_roots: list[Path] | None = None):
        self.path = Path(path) if path is not None else None
        self.allowed_roots = allowed_roots
        self._user: list[CatalogEntry] = []
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self._user = [CatalogEntry(**{**e, "builtin": False}) for e in data.get("models", [])]
            except (ValueError, TypeError, OSError) as exc:
                raise ModelLoadError(f"The model catalog {self.path} is not valid JSON; fix or delete it.") from exc

    @classmethod
    def default(cls) -> "Catalog":
        """The catalog stored at ``DALLE_APP_CATALOG`` (or ~/.cache/dalle_app/catalog.json)."""
        return cls(os.environ.get("DALLE_APP_CATALOG") or DEFAULT_CATALOG_PATH)

    def entries(self) -> list[CatalogEntry]:
        """All entries, the built-in default first."""
        with self._lock:
            return [BUILTIN_ENTRY, *self._user]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def get(self, name_or_reference: str) -> str:
        """The reference of a catalog name; anything else is returned unchanged (it may be a reference)."""
        for entry in self.entries():
            if entry.name == name_or_reference:
                return entry.reference
        return name_or_reference

    def add(self, reference: str, name: str | None = None, description: str = "") -> CatalogEntry:
        """Add (or replace by name) a user model; returns the stored entry."""
        parsed = parse_reference(reference, self.allowed_roots)
        entry = CatalogEntry(name=name or str(parsed), reference=str(parsed), description=description)
        if entry.name == BUILTIN_MODEL_NAME:
            raise ModelLoadError(f"'{BUILTIN_MODEL_NAME}' is the built-in model's name; choose another name.")
        with self._lock:
            self._user = [e for e in self._user if e.name != entry.name] + [entry]
            self._save()
        return entry

    def remove(self, name: str) -> None:
        """Remove a user entry by name (the built-in one stays)."""
        with self._lock:
            self._user = [e for e in self._user if e.name != name]
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": [asdict(e) for e in self._user]}, indent=2) + "\n")
        tmp.replace(self.path)
