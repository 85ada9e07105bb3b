"""Tokenizers backed by the Hugging Face `tokenizers` package: any `tokenizer.json`, and BERT WordPiece (Chinese)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from .base import Tokenizer, TokenizerError, ids_to_list

CHINESE_BERT_VOCAB_SIZE = 21128  # bert-base-chinese's vocab.txt

# CJK ideographs (the ranges BERT splits into single characters) and CJK / full-width punctuation.
_CJK = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
    "\u3000-\u303f\uff00-\uffef"
)
_SPACE_NEXT_TO_CJK = re.compile(f"(?<=[{_CJK}]) (?=\\S)|(?<=\\S) (?=[{_CJK}])")


def _find_types(node, wanted: str) -> list[dict]:
    """Return every dict with "type" == wanted inside a tokenizer.json component (which may be a Sequence)."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == wanted:
            found.append(node)
        for value in node.values():
            found.extend(_find_types(value, wanted))
    elif isinstance(node, list):
        for value in node:
            found.extend(_find_types(value, wanted))
    return found


def _default_decoder(config: dict):
    """Pick a decoder for a tokenizer.json that has none, so decode gives text instead of raw pieces (Ġ, ▁, ##)."""
    from tokenizers import decoders

    model = config.get("model") or {}
    if _find_types(config.get("pre_tokenizer"), "ByteLevel"):
        return decoders.ByteLevel()
    metaspace = _find_types(config.get("pre_tokenizer"), "Metaspace")
    if metaspace:
        return decoders.Metaspace(replacement=metaspace[0].get("replacement", "▁"))
    if model.get("type") == "WordPiece":
        return decoders.WordPiece(prefix=model.get("continuing_subword_prefix", "##"))
    if model.get("type") == "BPE" and model.get("end_of_word_suffix"):
        return decoders.BPEDecoder(suffix=model["end_of_word_suffix"])
    return None


class HfTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, used as DALLE-pytorch's HugTokenizer does (no added special tokens)."""

    kind = "hf"

    def __init__(self, tokenizer_json_path: str | Path):
        from tokenizers import Tokenizer as _HfTokenizer
        from tokenizers.processors import ByteLevel

        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise TokenizerError(f"Tokenizer file {str(path)!r} does not exist; pass the path to its tokenizer.json.")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            tokenizer = _HfTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise TokenizerError(f"{str(path)!r} is not a valid Hugging Face tokenizer.json ({e}).") from None
        # As in DALLE-pytorch: replace the post-processor so no [CLS]/<s>-style tokens are added.
        tokenizer.post_processor = ByteLevel(trim_offsets=True)
        if tokenizer.decoder is None:
            decoder = _default_decoder(config)
            if decoder is not None:
                tokenizer.decoder = decoder
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.name = f"Hugging Face tokenizer ({path.name})"

    def encode(self, text: str) -> list[int]:
        """Return the ids of `text`."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids, pad_tokens: Iterable[int] = frozenset()) -> str:
        """Return the text of `ids`, leaving out padding (id 0), `pad_tokens` and special tokens."""
        ignored = self._ignored_ids(pad_tokens)
        ids = [i for i in ids_to_list(ids) if i not in ignored]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class ChineseBertTokenizer(Tokenizer):
    """BERT WordPiece from a `vocab.txt` (bert-base-chinese: 21128 ids), encoding without [CLS]/[SEP].

    Lower-casing follows `do_lower_case` of a `tokenizer_config.json` next to the vocabulary when there is one, else
    `lowercase` (default False, bert-base-chinese's setting).
    """

    kind = "chinese"

    def __init__(self, vocab_txt_path: str | Path, lowercase: bool | None = None):
        from tokenizers import BertWordPieceTokenizer

        path = Path(vocab_txt_path)
        if not path.is_file():
            raise TokenizerError(
                f"BERT vocabulary {str(path)!r} does not exist; pass the path to bert-base-chinese's vocab.txt."
            )
        if lowercase is None:
            lowercase = _read_do_lower_case(path.parent / "tokenizer_config.json")
        try:
            self.tokenizer = BertWordPieceTokenizer(str(path), lowercase=lowercase)
        except Exception as e:
            raise TokenizerError(f"{str(path)!r} is not a valid BERT vocab.txt ({e}).") from None
        self.lowercase = lowercase
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.name = f"BERT WordPiece ({path.name}, {self.vocab_size} tokens)"

    def encode(self, text: str) -> list[int]:
        """Return the WordPiece ids of `text` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, pad_tokens: Iterable[int] = frozenset()) -> str:
        """Return the text of `ids` with padding, `pad_tokens` and special tokens left out, and no spaces around CJK."""
        ignored = self._ignored_ids(pad_tokens)
        ids = [i for i in ids_to_list(ids) if i not in ignored]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return _SPACE_NEXT_TO_CJK.sub("", text).strip()


def _read_do_lower_case(config_path: Path) -> bool:
    if config_path.is_file():
        try:
            return bool(json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case", False))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return False
