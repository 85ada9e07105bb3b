"""Pick and load the tokenizer of a model: what the user names, else what the model folder holds,
else the built-in choice for the vocabulary size (CLIP BPE 49408, bert-base-chinese 21128).

The CLIP vocabulary file and bert-base-chinese's vocab.txt are fetched like model files: from the
reference in ``DALLE_APP_CLIP_VOCAB`` / ``DALLE_APP_CHINESE_VOCAB`` (a local path or a Hub reference
``owner/name:file``); the Chinese one defaults to the Hub's bert-base-chinese.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import ModelLoadError
from .hub import HubOptions, hub_download
from .references import parse_reference
from .resolve import FileRecord

DEFAULT_VOCAB_REFERENCES = {
    "chinese": "google-bert/bert-base-chinese:vocab.txt",
    "clip": None,  # no canonical Hub copy of bpe_simple_vocab_16e6.txt; set DALLE_APP_CLIP_VOCAB or pass the file
}
VOCAB_ENV = {"clip": "DALLE_APP_CLIP_VOCAB", "chinese": "DALLE_APP_CHINESE_VOCAB"}


def _fetch_reference(text: str, allowed_roots, hub_options: HubOptions) -> tuple[Path, list[FileRecord]]:
    ref = parse_reference(text, allowed_roots, suffixes=None)
    if not ref.is_hub:
        return ref.path, [FileRecord(path=ref.path, filename=ref.path.name)]
    if not ref.path_in_repo:
        raise ModelLoadError(f"Name the tokenizer file inside '{ref.repo_id}', e.g. {ref.repo_id}:tokenizer.json.")
    got = hub_download(ref.repo_id, ref.path_in_repo, ref.revision, hub_options)
    return got.local_path, [FileRecord(path=got.local_path, filename=ref.path_in_repo, repo_id=ref.repo_id,
                                       revision=got.revision, commit=got.commit)]


def choose_tokenizer(num_text_tokens: int, *, requested: str | None, found_kind: str | None, found_file: Path | None,
                     allowed_roots=None, hub_options: HubOptions | None = None, name: str = "the model"):
    """Return (tokenizer, kind, file or None, file records); raise ModelLoadError with one sentence."""
    from dalle_app.tokenizers import TOKENIZER_CLASSES, TokenizerError, check_tokenizer_fits, infer_tokenizer_kind
    from dalle_app.tokenizers import load_tokenizer
    from dalle_app.tokenizers.loading import normalize_kind

    hub_options = hub_options or HubOptions()
    records: list[FileRecord] = []
    kind, path = found_kind, found_file
    try:
        if requested:
            try:
                kind, path = normalize_kind(requested), None
            except TokenizerError:  # not a kind name: a file reference, optionally "kind:path"
                prefix, _, rest = requested.partition("=")
                forced = None
                if rest and prefix.lower() in TOKENIZER_CLASSES:
                    forced, requested = prefix.lower(), rest
                path, records = _fetch_reference(requested, allowed_roots, hub_options)
                try:
                    kind = forced or infer_tokenizer_kind(None, [PurePosixPath(path.name).as_posix()])
                except TokenizerError:
                    raise ModelLoadError(
                        f"Cannot tell the tokenizer kind of {path.name} from its name; write it as KIND=PATH "
                        f"with KIND one of {', '.join(TOKENIZER_CLASSES)}."
                    ) from None
            if kind == found_kind and path is None:
                path = found_file
        if kind is None:
            kind = infer_tokenizer_kind(num_text_tokens, [])
        if path is None:
            env = VOCAB_ENV.get(kind)
            default = os.environ.get(env) if env else None
            default = default or DEFAULT_VOCAB_REFERENCES.get(kind)
            if default is None:
                raise ModelLoadError(
                    f"{name} uses the {kind} tokenizer but no tokenizer file was found next to it; pass the file "
                    f"(tokenizer=PATH)" + (f" or set {env}." if env else ".")
                )
            # configured by whoever runs the app, so not limited to the model folders
            path, more = _fetch_reference(default, [Path(os.path.abspath(os.sep))], hub_options)
            records += more
        tokenizer = load_tokenizer(kind, path)
        check_tokenizer_fits(tokenizer, num_text_tokens)
    except TokenizerError as exc:
        raise ModelLoadError(str(exc)) from exc
    return tokenizer, kind, path, records
