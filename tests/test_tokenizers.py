"""Tests for dalle_app.tokenizers.

The CLIP vocabulary file is not in the repository: the `clip_vocab_path` fixture takes it from $DALLE_APP_CLIP_VOCAB,
or downloads the DALLE-pytorch 1.6.6 wheel from PyPI with pip into a cache folder ($DALLE_APP_TEST_CACHE, default
~/.cache/dalle_app_tests) and extracts it; it skips when neither works. The youtokentome parity tests skip when
youtokentome is not installed.
"""

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dalle_app.tokenizers import (
    ChineseBertTokenizer,
    ClipBpeTokenizer,
    HfTokenizer,
    PureYttmEncoder,
    TextTooLongError,
    TokenizerError,
    YttmModel,
    YttmTokenizer,
    check_tokenizer_fits,
    find_tokenizer_file,
    infer_tokenizer_kind,
    load_tokenizer,
    train_yttm,
    youtokentome_available,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
CLIP_WHEEL = "dalle_pytorch-1.6.6-py3-none-any.whl"
CLIP_VOCAB_IN_WHEEL = "dalle_pytorch/data/bpe_simple_vocab_16e6.txt"


# ---------------------------------------------------------------------------------------------------------- CLIP BPE

@pytest.fixture(scope="session")
def clip_vocab_path() -> Path:
    """bpe_simple_vocab_16e6.txt from $DALLE_APP_CLIP_VOCAB or from the dalle-pytorch wheel on PyPI (cached)."""
    if os.environ.get("DALLE_APP_CLIP_VOCAB"):
        return Path(os.environ["DALLE_APP_CLIP_VOCAB"])
    cache = Path(os.environ.get("DALLE_APP_TEST_CACHE", Path.home() / ".cache" / "dalle_app_tests")) / "clip_bpe"
    vocab = cache / "bpe_simple_vocab_16e6.txt"
    if not vocab.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / CLIP_WHEEL).is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
                   "--disable-pip-version-check", "dalle-pytorch==1.6.6", "-d", str(cache)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            except subprocess.TimeoutExpired:
                pytest.skip("pip download of dalle-pytorch==1.6.6 (for the CLIP vocabulary) timed out")
            if proc.returncode != 0:
                last_line = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"pip could not download dalle-pytorch==1.6.6 (CLIP vocabulary): {last_line}")
        with zipfile.ZipFile(cache / CLIP_WHEEL) as wheel:
            vocab.write_bytes(wheel.read(CLIP_VOCAB_IN_WHEEL))
    return vocab


@pytest.fixture(scope="session")
def clip(clip_vocab_path) -> ClipBpeTokenizer:
    return ClipBpeTokenizer(clip_vocab_path)


@pytest.fixture(scope="session")
def clip_reference() -> dict:
    return json.loads((FIXTURES / "clip_reference_ids.json").read_text())


def test_clip_ids_match_dalle_pytorch(clip, clip_reference):
    assert clip.vocab_size == clip_reference["vocab_size"] == 49408
    cases = clip_reference["cases"]
    assert len(cases) >= 150
    mismatches = [c["text"] for c in cases if clip.encode(c["text"]) != c["ids"]]
    assert mismatches == []


def test_clip_decode_matches_reference_and_drops_special_ids(clip, clip_reference):
    for case in clip_reference["cases"]:
        if 49407 not in case["ids"]:  # the reference forgets to drop <|endoftext|> (it tests 40407)
            assert clip.decode(case["ids"]) == case["decoded"].strip()
    ids = clip.encode("a red circle")
    assert clip.decode([49406, *ids, 49407, 0, 0]) == "a red circle"
    assert clip.decode(torch.tensor(ids + [0, 0])) == "a red circle"
    assert clip.decode(ids + [49408, 49409], pad_tokens=range(49408, 49408 + 64)) == "a red circle"


def test_clip_reads_gzipped_vocab_and_rejects_other_files(clip, clip_vocab_path, tmp_path):
    import gzip

    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress(clip_vocab_path.read_bytes()))
    text = "An armchair in the shape of an avocado, 3 pieces!"
    assert ClipBpeTokenizer(gz).encode(text) == clip.encode(text)
    bad = tmp_path / "notes.txt"
    bad.write_text("#version: 0.2\ni n\n")
    with pytest.raises(TokenizerError, match="not a CLIP BPE vocabulary"):
        ClipBpeTokenizer(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        ClipBpeTokenizer(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------- YouTokenToMe, hand-made model

def write_tiny_bpe(path: Path) -> Path:
    """A .bpe model written by hand: alphabet ▁ a b c d (ids 4..8), three rules, specials unk=1 pad=0 bos=2 eos=3."""
    lines = ["5 3", "9601 4", "97 5", "98 6", "99 7", "100 8",
             "5 6 9",    # rule 0: a b -> ab
             "4 5 10",   # rule 1: ▁ a -> ▁a
             "10 6 11",  # rule 2: ▁a b -> ▁ab
             "1 0 2 3"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_yttm(tmp_path) -> YttmTokenizer:
    return YttmTokenizer(write_tiny_bpe(tmp_path / "tiny.bpe"), backend="python")


def test_pure_yttm_follows_rule_priority_spaces_and_unknown_runs(tiny_yttm):
    assert tiny_yttm.vocab_size == 3 + 5 + 4
    # rule 0 (a b) outranks rule 1 (▁ a), so "ab" ends as ▁ + ab and rule 2 never applies
    assert tiny_yttm.encode("ab") == [4, 9]
    assert tiny_yttm.encode("a") == [10]
    assert tiny_yttm.encode("cab") == [4, 7, 9]
    # a run of unknown characters is one <UNK>; whitespace and '▁' separate words; trailing spaces vanish
    assert tiny_yttm.encode("xyz ab") == [4, 1, 4, 9]
    assert tiny_yttm.encode("axa") == [10, 1, 5]
    assert tiny_yttm.encode("  a \t\n b   ") == [10, 4, 6]
    assert tiny_yttm.encode("a\u2581b") == [10, 4, 6]
    assert tiny_yttm.encode("") == [] and tiny_yttm.encode("   ") == []


def test_pure_yttm_decode(tiny_yttm):
    assert tiny_yttm.decode([4, 9]) == "ab"
    assert tiny_yttm.decode([10, 1, 5]) == "a<UNK>a"
    assert tiny_yttm.decode([10, 4, 6, 0, 0]) == "a b"
    assert tiny_yttm.decode(torch.tensor([11, 10, 7]), pad_tokens={7}) == "ab a"
    assert tiny_yttm.decode([]) == ""
    with pytest.raises(TokenizerError, match="outside"):
        tiny_yttm.decode([12])


def test_yttm_rejects_files_that_are_not_bpe_models(tmp_path):
    bad = tmp_path / "model.bpe"
    bad.write_text("this is not a model\n")
    with pytest.raises(TokenizerError, match="not a YouTokenToMe"):
        YttmTokenizer(bad)
    bad.write_text("5 3\n9601 4\n")  # truncated
    with pytest.raises(TokenizerError, match="not a YouTokenToMe"):
        YttmTokenizer(bad)


# --------------------------------------------------------------------------------------- padding and truncation

def test_tokenize_pads_with_zeros(tiny_yttm):
    tokens = tiny_yttm.tokenize(["ab", "a b c", ""], context_length=5)
    assert tokens.dtype == torch.long and tokens.shape == (3, 5)
    assert tokens.tolist() == [[4, 9, 0, 0, 0], [10, 4, 6, 4, 7], [0, 0, 0, 0, 0]]
    assert tiny_yttm.tokenize("ab", 3).tolist() == [[4, 9, 0]]


def test_tokenize_too_long_raises_unless_truncating(tiny_yttm):
    with pytest.raises(TextTooLongError) as info:
        tiny_yttm.tokenize(["a", "a b c d"], context_length=4)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "7 tokens" in message and "at most 4" in message and "truncate_text=True" in message
    assert tiny_yttm.tokenize(["a b c d"], 4, truncate_text=True).tolist() == [[10, 4, 6, 4]]


# ---------------------------------------------------------------------------- YouTokenToMe parity with the C++ code

SCRIPTS = {
    "latin": "the a red blue green yellow circle square triangle star big small left right above below of and with",
    "accents": "café naïve über straße façade résumé crème brûlée São Paulo İstanbul ĳssel",
    "cjk": "東京 猫 犬 红色 圆形 左边 の が 한국어 문장",
    "cyrillic_greek": "привет мир красный круг γειά κόσμε κύκλος",
    "rtl": "مرحبا بالعالم שלום עולם",
    "numbers": "0 1 7 12 42 100 2024 3.14 1,000 -5 +8 50% $9.99 1st 2nd",
    "punct": ", . ! ? ... ; : ' \" ( ) [ ] - -- — & @ # * / \\ don't it's O'Neil",
}
# words never seen in training; the last ones are whitespace to Python's str.split but not to youtokentome
UNSEEN = "🐱 🐶 ❤️ ☃ ∑ √ ∞ ½ ² Ⅷ ʕ•ᴥ•ʔ ﬁ ⅓ ẞ Ω 𝔘 ภาษาไทย हिन्दी ქართული Ꭰ ␣".split() + [
    "\x00", "a\x1cb", "\x1f", "\x85", "x\xa0y", "\u3000", "\u2028", "\u200b"]


def make_sentences(n: int, seed: int, extra_words: tuple[str, ...] = ()) -> list[str]:
    """Seeded varied sentences: several scripts, digits, punctuation, glued words, repeated and odd whitespace."""
    rng = random.Random(seed)
    words = " ".join(SCRIPTS.values()).split() + list(extra_words)
    separators = [" "] * 8 + ["  ", "   ", "\t", " \n ", "", "\u2581"]
    sentences = []
    for _ in range(n):
        count = rng.randint(1, 14)
        text = "".join(rng.choice(words) + rng.choice(separators) for _ in range(count))
        if rng.random() < 0.2:
            text = rng.choice(["", " ", "  "]) + text.upper() if rng.random() < 0.5 else text + "   "
        sentences.append(text)
    return sentences


def random_char_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdeéü東京🐱 \t\n\r\x0b\x0c\u2581.,!?0123456789'x☃\x00\x1c\x85\xa0\u3000"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


NO_YTTM = "youtokentome is not installed (pip install Cython, then pip install --no-build-isolation youtokentome)"
needs_youtokentome = pytest.mark.skipif(not youtokentome_available(), reason=NO_YTTM)


@pytest.fixture(scope="module", params=[(1000, 1.0), (300, 0.995)], ids=["vocab1000", "vocab300-coverage0.995"])
def trained_yttm(request, tmp_path_factory):
    if not youtokentome_available():
        pytest.skip(NO_YTTM)
    vocab_size, coverage = request.param
    corpus = make_sentences(3000, seed=0)
    path = tmp_path_factory.mktemp("yttm") / "captions.bpe"
    train_yttm(corpus, vocab_size, path, coverage=coverage)
    return path, corpus


@needs_youtokentome
def test_pure_yttm_gives_youtokentome_ids(trained_yttm):
    import youtokentome

    path, corpus = trained_yttm
    reference = youtokentome.BPE(model=str(path), n_threads=1)
    pure = PureYttmEncoder(YttmModel.from_file(path))
    texts = (corpus + make_sentences(3000, seed=1, extra_words=UNSEEN) + random_char_strings(2000, seed=2)
             + ["", " ", "\u2581", "a\u2581\u2581b", " x ", "\t\n", "🐱🐱🐱", "ab\x00cd"])
    assert len(texts) >= 8000
    expected = reference.encode(texts, output_type=youtokentome.OutputType.ID)
    mismatches = [t for t, ids in zip(texts, expected) if pure.encode(t) != ids]
    assert mismatches == []
    assert pure.model.vocab_size == reference.vocab_size()
    assert any(1 in ids for ids in expected)  # the sample does exercise unknown characters


@needs_youtokentome
def test_pure_yttm_decode_matches_youtokentome(trained_yttm):
    import youtokentome

    path, _ = trained_yttm
    reference = youtokentome.BPE(model=str(path), n_threads=1)
    pure = PureYttmEncoder(YttmModel.from_file(path))
    rng = random.Random(3)
    vocab_size = reference.vocab_size()
    for _ in range(2000):
        ids = [rng.randrange(1, vocab_size) for _ in range(rng.randint(1, 20))]
        ignore = {0, rng.randrange(vocab_size)}
        assert pure.decode(ids, ignore) == reference.decode(ids, ignore_ids=ignore)[0]


@needs_youtokentome
def test_yttm_tokenizer_backends_agree(trained_yttm):
    path, corpus = trained_yttm
    compiled = YttmTokenizer(path, backend="youtokentome")
    python = YttmTokenizer(path, backend="python")
    assert compiled.vocab_size == python.vocab_size
    texts = corpus[:50] + ["a \ud800 lone surrogate", "🐱 unseen"]
    assert torch.equal(compiled.tokenize(texts, 64, truncate_text=True), python.tokenize(texts, 64, truncate_text=True))
    for text in corpus[:50]:
        ids = python.encode(text)
        assert compiled.decode(ids) == python.decode(ids)
        if 1 not in ids:  # without unknown characters, decoding gives the text back up to whitespace
            assert python.decode(ids).split() == text.replace("\u2581", " ").split()


# ------------------------------------------------------------------------------------------ Hugging Face and BERT

def make_bytelevel_tokenizer_json(path: Path, with_template: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"])
    tok.train_from_iterator(make_sentences(300, seed=4), trainer)
    if with_template:
        specials = [("<s>", 1), ("</s>", 2)]
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=specials)
    tok.save(str(path))  # no decoder: DALLE-pytorch's HugTokenizer would print 'Ġ' markers
    return path


def test_hf_tokenizer_ids_and_clean_decode(tmp_path):
    from tokenizers import Tokenizer

    path = make_bytelevel_tokenizer_json(tmp_path / "tokenizer.json", with_template=True)
    hf = HfTokenizer(path)
    raw = Tokenizer.from_file(str(path))
    text = "a red circle, café 東京"
    assert raw.encode(text).ids[0] == 1  # the raw file adds <s> ...
    assert hf.encode(text) == raw.encode(text).ids[1:-1]  # ... the DALLE tokenizer adds nothing
    assert hf.vocab_size == raw.get_vocab_size()
    ids = hf.encode(text)
    assert hf.decode(ids + [0, 0]) == text
    assert "Ġ" not in hf.decode(ids)
    assert hf.decode(ids + [hf.vocab_size + 3], pad_tokens={hf.vocab_size + 3}) == text


def test_hf_tokenizer_rejects_bad_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        HfTokenizer(bad)


CHINESE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "你", "好", "，", "世", "界", "红", "色", "的", "圆",
                 "hello", "he", "##llo", "##l", "!", "3", "##0"]


def write_vocab(folder: Path, lowercase: bool | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(CHINESE_VOCAB) + "\n", encoding="utf-8")
    if lowercase is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    return folder / "vocab.txt"


def test_chinese_bert_encodes_without_special_tokens(tmp_path):
    bert = ChineseBertTokenizer(write_vocab(tmp_path))
    assert bert.vocab_size == len(CHINESE_VOCAB)
    v = {token: i for i, token in enumerate(CHINESE_VOCAB)}
    assert bert.encode("你好，世界") == [v["你"], v["好"], v["，"], v["世"], v["界"]]
    assert bert.encode("红色的圆 hello!") == [v["红"], v["色"], v["的"], v["圆"], v["hello"], v["!"]]
    assert bert.encode("hel 30") == [v["he"], v["##l"], v["3"], v["##0"]]
    assert bert.encode("猫") == [v["[UNK]"]]
    assert bert.encode("HELLO") == [v["[UNK]"]]  # bert-base-chinese does not lowercase
    assert bert.decode(bert.encode("你好，世界") + [0, 0]) == "你好，世界"
    assert bert.decode(bert.encode("红色的圆 hello!")) == "红色的圆hello!"
    assert bert.tokenize("你好", 4).tolist() == [[v["你"], v["好"], 0, 0]]


def test_chinese_bert_reads_lowercase_setting(tmp_path):
    bert = ChineseBertTokenizer(write_vocab(tmp_path / "lower", lowercase=True))
    assert bert.encode("HELLO") == [CHINESE_VOCAB.index("hello")]


# ------------------------------------------------------------------------------------------ choosing a tokenizer

def test_infer_tokenizer_kind_from_files_then_vocab_size():
    assert infer_tokenizer_kind(5000, ["config.json", "captions.bpe", "dalle.pt"]) == "yttm"
    assert infer_tokenizer_kind(None, ["tokenizer.json", "vocab.txt"]) == "hf"
    assert infer_tokenizer_kind(7, ["cc12m_tokenizer.json"]) == "hf"
    assert infer_tokenizer_kind(49408, ["sub/bpe_simple_vocab_16e6.txt.gz"]) == "clip"
    assert infer_tokenizer_kind(21128, ["vocab.txt"]) == "chinese"
    assert infer_tokenizer_kind(49408, ["dalle.pt"]) == "clip"
    assert infer_tokenizer_kind(21128, []) == "chinese"
    with pytest.raises(TokenizerError, match="num_text_tokens=7777") as info:
        infer_tokenizer_kind(7777, ["dalle.pt", "tokenizer_config.json"])
    assert ".bpe" in str(info.value) and "tokenizer.json" in str(info.value)


def test_find_and_load_tokenizer_from_folder(tmp_path):
    (tmp_path / "model").mkdir()
    write_tiny_bpe(tmp_path / "model" / "tiny.bpe")
    assert find_tokenizer_file("yttm", ["a.txt", "tiny.bpe"]) == "tiny.bpe"
    assert find_tokenizer_file("clip", ["tiny.bpe"]) is None
    tok = load_tokenizer("yttm", tmp_path / "model", backend="python")
    assert isinstance(tok, YttmTokenizer) and tok.encode("ab") == [4, 9]
    assert load_tokenizer("youtokentome", tmp_path / "model" / "tiny.bpe").vocab_size == 12
    with pytest.raises(TokenizerError, match="holds no hf tokenizer"):
        load_tokenizer("hf", tmp_path / "model")
    with pytest.raises(TokenizerError, match="pass its path"):
        load_tokenizer("clip")
    with pytest.raises(TokenizerError, match="Unknown tokenizer kind"):
        load_tokenizer("sentencepiece", tmp_path)


def test_check_tokenizer_fits(tiny_yttm):
    check_tokenizer_fits(tiny_yttm, 12)
    with pytest.raises(TokenizerError, match="num_text_tokens=49408 but the tokenizer .* has 12; pass the tokenizer"):
        check_tokenizer_fits(tiny_yttm, 49408)
