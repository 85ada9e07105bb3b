"""Text tokenizers for DALLE-pytorch family models: CLIP BPE, YouTokenToMe, Hugging Face tokenizer.json, BERT Chinese.

All follow `Tokenizer`: `vocab_size`, `encode(text)`, `decode(ids, pad_tokens)`, `tokenize(texts, context_length)`.
"""

from .base import TextTooLongError, Tokenizer, TokenizerError
from .clip_bpe import CLIP_VOCAB_FILENAMES, CLIP_VOCAB_SIZE, ClipBpeTokenizer
from .hf import CHINESE_BERT_VOCAB_SIZE, ChineseBertTokenizer, HfTokenizer
from .loading import (
    TOKENIZER_CLASSES,
    check_tokenizer_fits,
    find_tokenizer_file,
    infer_tokenizer_kind,
    load_tokenizer,
)
from .yttm import PureYttmEncoder, YttmModel, YttmTokenizer, train_yttm, youtokentome_available

__all__ = [
    "CHINESE_BERT_VOCAB_SIZE",
    "CLIP_VOCAB_FILENAMES",
    "CLIP_VOCAB_SIZE",
    "TOKENIZER_CLASSES",
    "ChineseBertTokenizer",
    "ClipBpeTokenizer",
    "HfTokenizer",
    "PureYttmEncoder",
    "TextTooLongError",
    "Tokenizer",
    "TokenizerError",
    "YttmModel",
    "YttmTokenizer",
    "check_tokenizer_fits",
    "find_tokenizer_file",
    "infer_tokenizer_kind",
    "load_tokenizer",
    "train_yttm",
    "youtokentome_available",
]
