"""YouTokenToMe (`.bpe`) tokenizers, with or without the `youtokentome` package.

`youtokentome` cannot be built by a plain `pip install` (it needs Cython before its build starts), so this module also
holds a pure-Python reader and encoder of its model files that produces the same ids. What the format and the encoder
do, as read from youtokentome 1.0.6's C++ source:

* A `.bpe` file is whitespace-separated integers: `n m`, then `n` lines `codepoint id` (the alphabet), then `m` lines
  `x y z` (rule i merges token x followed by token y into token z), then `unk_id pad_id bos_id eos_id` (-1 = unused).
* Encoding drops trailing spaces and splits the text into words at ASCII whitespace (the C-locale `isspace` set) and at
  U+2581 '▁'. Each word becomes '▁' followed by its characters; a run of consecutive characters outside the alphabet
  becomes one unknown token (encoded as unk_id) that never merges.
* Inside a word, the applicable rule with the lowest index is applied first, at its leftmost position, repeatedly,
  until no adjacent pair has a rule. Words are encoded independently.
* Decoding turns a leading '▁' of each token into a space, writes special ids as <UNK>, <PAD>, <BOS>, <EOS>, and drops
  the space at the very start of the text.
"""

from __future__ import annotations

import heapq
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .base import Tokenizer, TokenizerError, ids_to_list

SPACE_CHAR = "\u2581"  # '▁', youtokentome's word-start marker
_WORD_SEPARATORS = re.compile("[\t\n\x0b\x0c\r \u2581]+")
_SURROGATES = re.compile("[\ud800-\udfff]")  # not encodable as UTF-8; youtokentome's C++ side skips them
_UNKNOWN = -1  # placeholder token for a run of characters outside the alphabet
_DEAD = 0  # youtokentome marks a node consumed by a merge with token id 0


def youtokentome_available() -> bool:
    """Return True when the compiled `youtokentome` package can be imported."""
    try:
        import youtokentome  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class YttmModel:
    """The contents of a YouTokenToMe `.bpe` model file."""

    char_to_id: dict[str, int]
    rules: list[tuple[int, int, int]]
    unk_id: int = 1
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    @property
    def special_ids(self) -> dict[int, str]:
        names = {self.unk_id: "<UNK>", self.pad_id: "<PAD>", self.bos_id: "<BOS>", self.eos_id: "<EOS>"}
        return {i: name for i, name in names.items() if i != -1}

    @property
    def vocab_size(self) -> int:
        return len(self.rules) + len(self.char_to_id) + len(self.special_ids)

    @classmethod
    def from_file(cls, path: str | Path) -> "YttmModel":
        """Parse a `.bpe` file, raising TokenizerError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"YouTokenToMe model file {str(path)!r} does not exist; pass the path to its .bpe file."
            )
        not_bpe = f"{str(path)!r} is not a YouTokenToMe .bpe model file; pass the .bpe file the model was trained with."
        try:
            numbers = [int(x) for x in path.read_text(encoding="ascii").split()]
        except (UnicodeDecodeError, ValueError):
            raise TokenizerError(not_bpe) from None
        if len(numbers) < 2:
            raise TokenizerError(not_bpe)
        n, m = numbers[0], numbers[1]
        if n < 0 or m < 0 or len(numbers) < 2 + 2 * n + 3 * m + 4:
            raise TokenizerError(not_bpe)
        pos = 2
        char_to_id = {}
        for _ in range(n):
            codepoint, token_id = numbers[pos], numbers[pos + 1]
            if not 0 <= codepoint < 0x110000:
                raise TokenizerError(not_bpe)
            char_to_id[chr(codepoint)] = token_id
            pos += 2
        rules = [tuple(numbers[pos + 3 * i : pos + 3 * i + 3]) for i in range(m)]
        unk_id, pad_id, bos_id, eos_id = numbers[pos + 3 * m : pos + 3 * m + 4]
        if SPACE_CHAR not in char_to_id:
            raise TokenizerError(f"{str(path)!r} has no '▁' token, so it is not a usable YouTokenToMe model.")
        return cls(char_to_id, rules, unk_id=unk_id, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)


class PureYttmEncoder:
    """Encode and decode like youtokentome.BPE (without dropout, bos/eos or reverse), in plain Python."""

    def __init__(self, model: YttmModel):
        self.model = model
        self.rule_index = {}
        for index, (x, y, _) in enumerate(model.rules):
            self.rule_index[(x, y)] = index  # a repeated pair keeps its last index, as in youtokentome
        self.pieces = {token_id: char for char, token_id in model.char_to_id.items()}
        for x, y, z in model.rules:
            self.pieces[z] = self.pieces.get(x, "") + self.pieces.get(y, "")
        self.space_id = model.char_to_id[SPACE_CHAR]
        self.encode_word = lru_cache(maxsize=100_000)(self._encode_word)

    def encode(self, text: str) -> list[int]:
        """Return the ids of `text`."""
        text = _SURROGATES.sub("", text)
        ids = []
        for word in _WORD_SEPARATORS.split(text):
            if word:
                ids.extend(self.encode_word(word))
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        # initial tokens: '▁', then one token per known character or per run of unknown characters
        tokens = [self.space_id]
        for char in word:
            token = self.model.char_to_id.get(char, _UNKNOWN)
            if token == _UNKNOWN and tokens[-1] == _UNKNOWN:
                continue  # extend the current unknown run
            tokens.append(token)
        # a doubly linked list over positions, merged in (rule index, position) order as youtokentome does
        prev = list(range(-1, len(tokens) - 1))
        next_ = list(range(1, len(tokens) + 1))
        next_[-1] = -1
        rules, rule_index = self.model.rules, self.rule_index
        queue = []

        def push(pos: int) -> None:
            index = rule_index.get((tokens[pos], tokens[next_[pos]]))
            if index is not None:
                heapq.heappush(queue, (index, pos))

        for pos in range(len(tokens) - 1):
            push(pos)
        while queue:
            index, pos1 = heapq.heappop(queue)
            pos2 = next_[pos1]
            x, y, z = rules[index]
            if tokens[pos1] != x or pos2 == -1 or tokens[pos2] != y:
                continue  # stale event: one of the two tokens was merged away meanwhile
            pos0, pos3 = prev[pos1], next_[pos2]
            tokens[pos2], prev[pos2], next_[pos2] = _DEAD, -1, -1
            tokens[pos1], next_[pos1] = z, pos3
            if pos3 != -1:
                prev[pos3] = pos1
            if pos0 != -1:
                push(pos0)
            if pos3 != -1:
                push(pos1)
        out = []
        pos = next(i for i, t in enumerate(tokens) if t != _DEAD)
        while pos != -1:
            out.append(self.model.unk_id if tokens[pos] == _UNKNOWN else tokens[pos])
            pos = next_[pos]
        return tuple(out)

    def decode(self, ids: Sequence[int], ignore_ids: Iterable[int] = ()) -> str:
        """Return the text of `ids` exactly as youtokentome's decode does, skipping `ignore_ids`."""
        ignore_ids = set(ignore_ids)
        special = self.model.special_ids
        text = ""
        first = True
        for i in ids:
            if i in ignore_ids:
                continue
            if not 0 <= i < self.model.vocab_size or (i not in special and i not in self.pieces):
                raise TokenizerError(
                    f"Token id {i} is outside this YouTokenToMe vocabulary (0..{self.model.vocab_size - 1})."
                )
            piece = special.get(i) or self.pieces[i]
            if i not in special and piece.startswith(SPACE_CHAR):
                piece = " " + piece[1:]
            text += piece
            if first and text.startswith(" "):
                text = text[1:]
            first = False
        return text


class YttmTokenizer(Tokenizer):
    """A YouTokenToMe BPE model; uses `youtokentome` when installed, else the pure-Python encoder (same ids)."""

    kind = "yttm"

    def __init__(self, model_path: str | Path, backend: str = "auto"):
        if backend not in ("auto", "youtokentome", "python"):
            raise TokenizerError(f"Unknown YouTokenToMe backend {backend!r}; use 'auto', 'youtokentome' or 'python'.")
        self.model_path = str(model_path)
        self.model = YttmModel.from_file(model_path)  # validates the file before the C++ code reads it
        if backend == "auto":
            backend = "youtokentome" if youtokentome_available() else "python"
        if backend == "youtokentome":
            if not youtokentome_available():
                raise TokenizerError(_INSTALL_HINT)
            import youtokentome

            self._bpe = youtokentome.BPE(model=str(model_path), n_threads=1)
            self.vocab_size = self._bpe.vocab_size()
        else:
            self._bpe = PureYttmEncoder(self.model)
            self.vocab_size = self.model.vocab_size
        self.backend = backend
        self.name = f"YouTokenToMe BPE ({Path(model_path).name})"

    def encode(self, text: str) -> list[int]:
        """Return the ids of `text` (no bos/eos)."""
        if self.backend == "python":
            return self._bpe.encode(text)
        return self._bpe.encode(_SURROGATES.sub("", text))

    def decode(self, ids, pad_tokens: Iterable[int] = frozenset()) -> str:
        """Return the text of `ids`, leaving out padding (id 0) and `pad_tokens`."""
        ids = ids_to_list(ids)
        ignored = self._ignored_ids(pad_tokens)
        if self.backend == "python":
            return self._bpe.decode(ids, ignored)
        if not any(i not in ignored for i in ids):
            return ""
        try:
            return self._bpe.decode(ids, ignore_ids=ignored)[0]
        except ValueError as e:
            raise TokenizerError(f"Could not decode ids with YouTokenToMe ({e}).") from None


_INSTALL_HINT = (
    "This needs the youtokentome package; install it with `pip install Cython` and then, as a separate command, "
    "`pip install --no-build-isolation youtokentome`."
)


def train_yttm(texts: Iterable[str], vocab_size: int, path: str | Path, coverage: float = 1.0,
               n_threads: int = 1) -> YttmTokenizer:
    """Train a YouTokenToMe BPE model on `texts`, save it to `path` (a .bpe file) and return it as a tokenizer.

    Uses pad id 0, unk 1, bos 2, eos 3 (youtokentome's defaults; 0 is DALLE's padding). The vocabulary can end up
    smaller than `vocab_size` when the texts offer fewer merges. Requires the `youtokentome` package.
    """
    if not youtokentome_available():
        raise TokenizerError(_INSTALL_HINT)
    import youtokentome

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, data_path = tempfile.mkstemp(suffix=".txt", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(_SURROGATES.sub("", text).replace("\n", " ") + "\n")
        youtokentome.BPE.train(data=data_path, model=str(path), vocab_size=vocab_size, coverage=coverage,
                               n_threads=n_threads, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    finally:
        os.unlink(data_path)
    return YttmTokenizer(path)
