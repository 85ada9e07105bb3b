"""What visitors of a public app may load, and how their errors are worded.

A model reference typed by a visitor (the app's model panel, a request's `model=`) goes through
`ModelManager.load(..., visitor=True)`, which applies the deployment's `VisitorPolicy` before anything is read or
downloaded. The operator's own references (`--model`, the CLI) are not restricted. Environment variables:

    DALLE_APP_HUB=off                              visitors may not load Hub references (default: on)
    DALLE_APP_ALLOWED_REPOS=owner/a,owner/b,org/*  visitors may load only these Hub repositories (default: any)

Local paths stay limited to the allowed model folders (`references.py`) either way. Visitors' error messages show
the reference as they typed it, and absolute server paths outside the allowed model folders (the Hub cache, a
symlink's target, a tokenizer file configured by the operator) are cut to their file name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import ModelLoadError
from .references import ModelReference

HUB_ENV = "DALLE_APP_HUB"
ALLOWED_REPOS_ENV = "DALLE_APP_ALLOWED_REPOS"
_ON, _OFF = ("", "on", "1", "true", "yes"), ("off", "0", "false", "no")
_PATTERN = re.compile(r"[\w.\-*?]+/[\w.\-*?]+")
# an absolute POSIX path in a message: starts after a space, quote or bracket (not inside a URL), runs to a space
_ABSOLUTE = re.compile(r"(?<![\w.:/~])/[^\s'\"(),;]+")


@dataclass(frozen=True)
class VisitorPolicy:
    """hub: visitors may load Hub references at all. allowed_repos: if not None, the only repositories (patterns
    like owner/* allowed, compared case-insensitively) they may load."""

    hub: bool = True
    allowed_repos: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls) -> "VisitorPolicy":
        """The policy set by DALLE_APP_HUB and DALLE_APP_ALLOWED_REPOS; ValueError (one sentence) for bad values."""
        hub = os.environ.get(HUB_ENV, "").strip().lower()
        if hub not in _ON + _OFF:
            raise ValueError(f"{HUB_ENV} must be on or off, got '{os.environ[HUB_ENV]}'.")
        repos = tuple(r.strip() for r in os.environ.get(ALLOWED_REPOS_ENV, "").split(",") if r.strip())
        for repo in repos:
            if not _PATTERN.fullmatch(repo):
                raise ValueError(f"{ALLOWED_REPOS_ENV} holds '{repo}', which is not a Hub repository like owner/name "
                                 "(or owner/*); separate repositories with commas.")
        return cls(hub=hub in _ON, allowed_repos=repos or None)

    def check(self, ref: ModelReference, given: str) -> None:
        """Raise ModelLoadError (one sentence) when a visitor may not load `ref` (typed as `given`)."""
        if not ref.is_hub:
            return
        if not self.hub:
            raise ModelLoadError(f"Loading models from the Hugging Face Hub is turned off on this server, so '{given}' "
                                 "cannot be loaded; choose a catalog model or a local model instead.")
        if self.allowed_repos is not None and not any(fnmatchcase(ref.repo_id.lower(), pattern.lower())
                                                      for pattern in self.allowed_repos):
            raise ModelLoadError(f"The Hub repository '{ref.repo_id}' is not among the models this server allows "
                                 f"({', '.join(self.allowed_repos)}); choose one of those.")


def visitor_message(message: str, given: str, ref: ModelReference | None, allowed_roots: list[Path]) -> str:
    """`message` as a visitor may see it: the local reference's resolved path shown as `given`, and other absolute
    paths outside `allowed_roots` cut to their file name (the text the visitor typed is left as it is)."""
    given = str(given).strip()
    if ref is not None and ref.path is not None:
        message = message.replace(str(ref.path), given)
        if ref.path.is_file():
            parent = str(Path(given).parent)
            message = message.replace(str(ref.path.parent) + os.sep, "" if parent == "." else parent + "/")
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]

    def redact(match: re.Match) -> str:
        text = match.group(0)
        trimmed = text.rstrip(".:")
        path = Path(trimmed)
        if trimmed in (given, given.rstrip("/")) or any(path == r or path.is_relative_to(r) for r in roots):
            return text
        return (path.name or "a server folder") + text[len(trimmed):]

    return _ABSOLUTE.sub(redact, message)
