"""OpenAI CLIP's byte-level BPE, the default text tokenizer of DALLE-pytorch (vocabulary of 49408 ids).

Gives the same ids as DALLE-pytorch's `SimpleTokenizer`. The vocabulary file `bpe_simple_vocab_16e6.txt` (or its
gzipped form) is not bundled: pass a local copy or let the model manager fetch it.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from .base import Tokenizer, TokenizerError, ids_to_list

CLIP_VOCAB_FILENAMES = ("bpe_simple_vocab_16e6.txt", "bpe_simple_vocab_16e6.txt.gz")
CLIP_VOCAB_SIZE = 49408
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894: CLIP uses only the first merges of the file

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_END_OF_WORD = "</w>"
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other-symbol runs.
_PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character (GPT-2/CLIP byte-level BPE convention).

    Printable Latin-1 bytes map to themselves; the others map to code points 256, 257, ... in byte order. The dict
    order (printable bytes first) is also the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def read_clip_merges(path: str | Path) -> list[tuple[str, str]]:
    """Read the first NUM_MERGES merge rules from a CLIP BPE vocabulary file (.txt or .txt.gz)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(
            f"CLIP BPE vocabulary file {str(path)!r} does not exist; pass the path to bpe_simple_vocab_16e6.txt."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"Could not read CLIP BPE vocabulary file {str(path)!r} ({e}); is it the right file?")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is '#version: 0.2'
    if len(merges) < NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(
            f"{str(path)!r} is not a CLIP BPE vocabulary file (it needs {NUM_MERGES} merge lines of two symbols "
            f"after a version line); use bpe_simple_vocab_16e6.txt from OpenAI CLIP or DALLE-pytorch."
        )
    return merges


def _whitespace_clean(text: str, regex) -> str:
    return regex.sub(r"\s+", " ", text).strip()


class ClipBpeTokenizer(Tokenizer):
    """CLIP byte-level BPE with DALLE-pytorch's text cleaning: ftfy, html-unescape twice, collapse spaces, lowercase."""

    kind = "clip"

    def __init__(self, vocab_path: str | Path):
        import ftfy
        import regex

        self._ftfy, self._regex = ftfy, regex
        merges = read_clip_merges(vocab_path)
        self.vocab_path = str(vocab_path)
        self.name = f"CLIP BPE ({Path(vocab_path).name})"

        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL_TOKENS)
        self.token_to_id = {token: i for i, token in enumerate(vocab)}
        self.id_to_token = vocab
        self.vocab_size = len(vocab)  # 49408
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self._pretokenize = regex.compile(_PRETOKENIZE, regex.IGNORECASE)
        self._bpe = lru_cache(maxsize=100_000)(self._bpe_uncached)

    def normalize(self, text: str) -> str:
        """Clean text the way CLIP does before tokenizing: fix mojibake, unescape html twice, squeeze, lowercase."""
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        return _whitespace_clean(text, self._regex).lower()

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Split one byte-encoded pre-token into vocabulary symbols by applying merges, lowest rank first."""
        if word in _SPECIAL_TOKENS:
            return (word,)
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self.merge_rank.get(pair, len(self.merge_rank)), pair) for pair in zip(symbols, symbols[1:])]
            rank, (first, second) = min(ranked)
            if rank == len(self.merge_rank):
                break  # no applicable merge left
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Return the CLIP BPE ids of `text` (no start/end tokens)."""
        ids = []
        for piece in self._pretokenize.findall(self.normalize(text)):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.token_to_id[symbol] for symbol in self._bpe(word))
        return ids

    def decode(self, ids, pad_tokens: Iterable[int] = frozenset()) -> str:
        """Return the (lowercased, cleaned) text of `ids`, dropping padding, pad_tokens and start/end tokens."""
        ignored = self._ignored_ids(pad_tokens) | {START_OF_TEXT_ID, END_OF_TEXT_ID}
        ids = [i for i in ids_to_list(ids) if i not in ignored]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"Token id {i} is outside the CLIP BPE vocabulary (0..{self.vocab_size - 1}).")
        data = bytes(self.byte_decoder[c] for i in ids for c in self.id_to_token[i])
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()
