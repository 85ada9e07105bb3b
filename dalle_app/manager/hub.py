"""Hugging Face Hub access: download files through the Hub cache, with one-sentence errors.

Everything goes through `huggingface_hub`, so its environment variables work as users expect:
``HF_ENDPOINT`` (mirror or local Hub), ``HF_HOME`` / ``HF_HUB_CACHE`` (cache location),
``HF_HUB_OFFLINE=1`` (cache only) and ``HF_TOKEN`` or a stored ``hf auth login`` token.
`HubOptions` overrides any of them per call. A file that was downloaded once is found in the
cache on the next start even with no network, because `hf_hub_download` falls back to the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

from .errors import ModelLoadError

try:  # huggingface_hub 2.x uses httpx2, 1.x uses httpx; only needed to recognise network exceptions
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubOptions:
    """Per-call overrides; None means "what huggingface_hub would use" (its environment variables)."""

    endpoint: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    offline: bool | None = None
    etag_timeout: float = 10.0

    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        # constants.HF_HUB_OFFLINE is read at import; also honour a variable set later in this process.
        value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
        return constants.HF_HUB_OFFLINE or value in ("1", "true", "yes", "on")

    def endpoint_url(self) -> str:
        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    def cache_path(self) -> Path:
        return Path(self.cache_dir if self.cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


@dataclass(frozen=True)
class HubFile:
    """One file fetched from the Hub: where it came from (commit included) and where it lies in the cache."""

    repo_id: str
    filename: str
    revision: str
    commit: str
    local_path: Path


def _describe(repo_id: str, revision: str | None) -> str:
    return f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")


def _translate(exc: Exception, repo_id: str, filename: str | None, revision: str | None,
               options: HubOptions) -> ModelLoadError:
    """Turn a huggingface_hub/httpx exception into one actionable sentence."""
    where = options.endpoint_url()
    what = f"'{filename}' from {_describe(repo_id, revision)}" if filename else f"the file list of {_describe(repo_id, revision)}"
    if isinstance(exc, GatedRepoError):
        return ModelLoadError(
            f"The Hub repository '{repo_id}' is gated; accept its terms on the Hub and log in (hf auth login) or set HF_TOKEN."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelLoadError(
            f"The Hub repository '{repo_id}' was not found at {where}; check the name, or log in (hf auth login) "
            "or set HF_TOKEN if it is private."
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelLoadError(
            f"The revision '{revision}' does not exist in the Hub repository '{repo_id}'; use a branch, tag or "
            "commit that exists."
        )
    if isinstance(exc, LocalEntryNotFoundError) or isinstance(exc, OfflineModeIsEnabled):
        if options.is_offline():  # the cache's folder is not named: messages may reach the app's visitors
            return ModelLoadError(
                f"Offline mode is on (HF_HUB_OFFLINE) and {what} is not in the Hub cache; "
                "turn offline mode off or download the model once while online."
            )
        return ModelLoadError(
            f"Cannot reach the Hub at {where} and {what} is not in the Hub cache; check the network "
            "connection (or HF_ENDPOINT) and try again."
        )
    if isinstance(exc, EntryNotFoundError):
        return ModelLoadError(
            f"The file '{filename}' does not exist in the Hub repository {_describe(repo_id, revision)}; "
            "check the path after the ':' in the reference."
        )
    if isinstance(exc, HFValidationError):
        return ModelLoadError(f"'{repo_id}' is not a valid Hub repository id; use the form owner/name.")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an"
        if status == 401:
            return ModelLoadError(
                f"The Hub at {where} refused access to '{repo_id}' (401); log in (hf auth login) or set HF_TOKEN."
            )
        return ModelLoadError(
            f"The Hub at {where} answered with HTTP {status} while fetching {what}; try again later."
        )
    if isinstance(exc, (_http.TransportError, OSError)):
        return ModelLoadError(
            f"The download of {what} was interrupted ({type(exc).__name__}); run the same request again to resume it."
        )
    return ModelLoadError(f"Fetching {what} failed ({type(exc).__name__}: {exc}).")


def _commit_from_path(local_path: str, filename: str) -> str:
    """The snapshot folder name (a commit hash) of a path ``.../snapshots/<commit>/<filename>``."""
    parts = Path(local_path).parts
    return parts[-(len(filename.split("/")) + 1)]


def hub_download(repo_id: str, filename: str, revision: str | None = None,
                 options: HubOptions | None = None, tqdm_class=None) -> HubFile:
    """Download one file (or find it in the Hub cache) and return where it lies and from which commit."""
    options = options or HubOptions()
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=options.cache_dir,
            endpoint=options.endpoint,
            token=options.token,
            local_files_only=options.is_offline(),
            etag_timeout=options.etag_timeout,
            tqdm_class=tqdm_class,
            library_name="dalle_app",
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence
        raise _translate(exc, repo_id, filename, revision, options) from exc
    return HubFile(repo_id, filename, revision or DEFAULT_REVISION, _commit_from_path(path, filename), Path(path))


def cached_file_list(repo_id: str, revision: str | None, options: HubOptions) -> tuple[str, list[str]] | None:
    """(commit, files) of the cached snapshot for this revision, or None when nothing is cached."""
    storage = options.cache_path() / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or DEFAULT_REVISION
    if REGEX_COMMIT_HASH.fullmatch(revision):
        commit = revision
    else:
        ref_file = storage / "refs" / revision
        if not ref_file.is_file():
            return None
        commit = ref_file.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return commit, files


def hub_list_files(repo_id: str, revision: str | None = None,
                   options: HubOptions | None = None) -> tuple[str, list[str]]:
    """Return (commit, list of file paths) of a Hub repository, from the Hub or, offline, from the cache.

    Offline, only the files downloaded before are listed, which is what a second start needs.
    """
    options = options or HubOptions()
    if not options.is_offline():
        try:
            info = HfApi(endpoint=options.endpoint, token=options.token, library_name="dalle_app").model_info(
                repo_id, revision=revision, timeout=options.etag_timeout
            )
            return info.sha, sorted(s.rfilename for s in (info.siblings or []))
        except (_http.ConnectError, _http.TimeoutException, OfflineModeIsEnabled) as exc:
            cached = cached_file_list(repo_id, revision, options)
            if cached is not None:
                return cached
            raise _translate(LocalEntryNotFoundError(str(exc)), repo_id, None, revision, options) from exc
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc, repo_id, None, revision, options) from exc
    cached = cached_file_list(repo_id, revision, options)
    if cached is None:
        raise _translate(LocalEntryNotFoundError("offline"), repo_id, None, revision, options)
    return cached
