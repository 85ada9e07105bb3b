"""Choose and load the tokenizer a DALLE model was trained with.

DALLE-pytorch checkpoints do not record their tokenizer, only `num_text_tokens` (its vocabulary size), so the choice
comes from the files next to the model, from the user, or from the vocabulary size (49408 is CLIP's BPE, 21128 is
bert-base-chinese).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from .base import Tokenizer, TokenizerError
from .clip_bpe import CLIP_VOCAB_FILENAMES, CLIP_VOCAB_SIZE, ClipBpeTokenizer
from .hf import CHINESE_BERT_VOCAB_SIZE, ChineseBertTokenizer, HfTokenizer
from .yttm import YttmTokenizer

TOKENIZER_CLASSES = {
    "yttm": YttmTokenizer,
    "hf": HfTokenizer,
    "clip": ClipBpeTokenizer,
    "chinese": ChineseBertTokenizer,
}
# File name patterns per kind, in the order a model folder is searched.
TOKENIZER_FILE_PATTERNS = {
    "yttm": ("*.bpe",),
    "hf": ("tokenizer.json", "*tokenizer.json"),
    "clip": CLIP_VOCAB_FILENAMES,
    "chinese": ("vocab.txt",),
}
KIND_BY_VOCAB_SIZE = {CLIP_VOCAB_SIZE: "clip", CHINESE_BERT_VOCAB_SIZE: "chinese"}
_ALIASES = {"bpe": "yttm", "youtokentome": "yttm", "huggingface": "hf", "bert": "chinese", "simple": "clip"}

_WHAT_TO_PASS = (
    "a YouTokenToMe .bpe file, a Hugging Face tokenizer.json, CLIP's bpe_simple_vocab_16e6.txt (49408 tokens) "
    "or bert-base-chinese's vocab.txt (21128 tokens)"
)


def normalize_kind(kind: str) -> str:
    """Return the canonical tokenizer kind for `kind` (accepting a few aliases), or raise TokenizerError."""
    kind = _ALIASES.get(kind.lower(), kind.lower())
    if kind not in TOKENIZER_CLASSES:
        raise TokenizerError(f"Unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZER_CLASSES)}.")
    return kind


def find_tokenizer_file(kind: str, files_in_folder: Iterable[str]) -> str | None:
    """Return the first of `files_in_folder` (names or relative paths) that holds a tokenizer of `kind`, or None."""
    files = sorted(str(f) for f in files_in_folder)
    for pattern in TOKENIZER_FILE_PATTERNS[normalize_kind(kind)]:
        for f in files:
            if fnmatch(PurePosixPath(f.replace("\\", "/")).name, pattern):
                return f
    return None


def infer_tokenizer_kind(num_text_tokens: int | None, files_in_folder: Iterable[str] = ()) -> str:
    """Return the tokenizer kind for a model: from the tokenizer files it ships, else from its vocabulary size.

    Files win: `*.bpe` -> "yttm", `tokenizer.json` -> "hf", `bpe_simple_vocab_16e6.txt[.gz]` -> "clip",
    `vocab.txt` -> "chinese". Without any, 49408 tokens -> "clip" and 21128 -> "chinese"; otherwise TokenizerError.
    """
    files = list(files_in_folder)
    for kind in TOKENIZER_FILE_PATTERNS:
        if find_tokenizer_file(kind, files) is not None:
            return kind
    if num_text_tokens in KIND_BY_VOCAB_SIZE:
        return KIND_BY_VOCAB_SIZE[num_text_tokens]
    raise TokenizerError(
        f"This model has num_text_tokens={num_text_tokens} but ships no tokenizer file and no built-in tokenizer "
        f"has that size; pass the tokenizer it was trained with: {_WHAT_TO_PASS}."
    )


def load_tokenizer(kind: str, path: str | Path | None = None, **kwargs) -> Tokenizer:
    """Load a tokenizer of `kind` ("clip", "yttm", "hf" or "chinese") from its file or from a folder holding it.

    Extra keyword arguments go to the tokenizer class (e.g. `backend=` for yttm, `lowercase=` for chinese).
    """
    kind = normalize_kind(kind)
    if path is None:
        raise TokenizerError(
            f"The {kind} tokenizer needs its file ({' or '.join(TOKENIZER_FILE_PATTERNS[kind])}); pass its path."
        )
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer_file(kind, (str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
        if found is None:
            raise TokenizerError(
                f"Folder {str(path)!r} holds no {kind} tokenizer file ({' or '.join(TOKENIZER_FILE_PATTERNS[kind])}); "
                f"pass the file's path instead."
            )
        path = path / found
    return TOKENIZER_CLASSES[kind](path, **kwargs)


def check_tokenizer_fits(tokenizer: Tokenizer, num_text_tokens: int) -> None:
    """Raise TokenizerError unless `tokenizer`'s vocabulary size equals the model's `num_text_tokens`."""
    if tokenizer.vocab_size != num_text_tokens:
        raise TokenizerError(
            f"This model has num_text_tokens={num_text_tokens} but the tokenizer {tokenizer.name} has "
            f"{tokenizer.vocab_size}; pass the tokenizer it was trained with: {_WHAT_TO_PASS}."
        )
