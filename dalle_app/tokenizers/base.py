"""The interface every text tokenizer of dalle_app follows.

DALLE-pytorch models see text as `text_seq_len` integer ids, padded with 0 (the model remaps id 0 to per-position
padding ids), and no tokenizer adds start or end tokens. `Tokenizer.tokenize` implements that layout once for all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or does not fit the model."""


class TextTooLongError(TokenizerError):
    """A text has more tokens than the model's text context and truncation was not asked for."""


def ids_to_list(ids) -> list[int]:
    """Return token ids given as a list, tuple, numpy array or 1-d tensor as a list of Python ints."""
    if torch.is_tensor(ids):
        ids = ids.tolist()
    elif hasattr(ids, "tolist"):  # numpy arrays and scalars
        ids = ids.tolist()
    return [int(i) for i in ids]


def _preview(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tokenizer:
    """Base class: subclasses set `kind`, `name` and `vocab_size` and implement `encode` and `decode`."""

    kind: str = "base"  # short identifier: "clip", "yttm", "hf" or "chinese"
    name: str = "tokenizer"  # human readable, for the UI and `info` output
    vocab_size: int = 0

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`, without padding and without start/end tokens."""
        raise NotImplementedError

    def decode(self, ids, pad_tokens: Iterable[int] = frozenset()) -> str:
        """Return the text for `ids`, leaving out id 0 (padding) and any id in `pad_tokens`."""
        raise NotImplementedError

    def tokenize(self, texts: str | Sequence[str], context_length: int, truncate_text: bool = False) -> torch.Tensor:
        """Encode `texts` into a zero-padded LongTensor of shape (len(texts), context_length).

        A text longer than `context_length` tokens raises `TextTooLongError` (a ValueError) unless `truncate_text`
        is set, in which case it is cut to its first `context_length` tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise TokenizerError(f"context_length must be at least 1, got {context_length}.")
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                if not truncate_text:
                    raise TextTooLongError(
                        f"The text {_preview(text)!r} is {len(ids)} tokens long but the model reads at most "
                        f"{context_length} text tokens; shorten it or pass truncate_text=True."
                    )
                ids = ids[:context_length]
            if ids:
                result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result

    def _ignored_ids(self, pad_tokens: Iterable[int]) -> set[int]:
        ignored = {0}
        ignored.update(int(i) for i in pad_tokens)
        return ignored

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
