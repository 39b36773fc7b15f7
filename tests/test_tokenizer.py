"""Tokenizer: round trips on any text, BOS handling, injection safety, persistence, streaming decode."""

import json

import numpy as np
import pytest
import rustbpe
import torch
from hypothesis import given, settings, strategies as st

from poegpt.errors import PoEError
from poegpt.tokenizer import (
    SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_FILE, StreamDecoder, Tokenizer, clean_text, train_from_files,
)

VOCAB = 400

# A few KB of mixed scripts, so merges form inside Hangul, CJK, emoji and code as well as English.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're training tokenizers!",
    "Attention is all you need; experts multiply, they don't add.",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요. 한국어 토크나이저를 시험합니다.",
    "我们今天学习机器学习。深度学习模型需要大量的数据。你好，世界！",
    "こんにちは、世界。今日はいい天気ですね。トークナイザーのテストです。",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? ¡Olé!",
    "def forward(self, x):\n    return self.proj(torch.relu(x)) + x  # residual\n",
    "for i in range(10):\n\tprint(f\"{i:03d} -> {i * i}\")\n",
    "Emoji time 😀😃🎉🚀👍🏽 👨‍👩‍👧 ❤️ 🇰🇷 and more 😀🎉",
]
CORPUS = [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(3)) + f" #{i}" for i in range(12)]

MULTILINGUAL = [
    "안녕하세요 세계",
    "한국어와 English가 섞인 문장입니다.",
    "机器学习很有趣",
    "日本語のテキスト、カタカナとひらがな",
    "😀👍🏽👨‍👩‍👧🇰🇷",
    "x = {'a': [1, 2, 3]}\n\n\tif x: pass\r\n",
    "Ünïcödé çàfé naïve — “quotes” … ½ ∑ ∞",
    "",
    " ",
    "\n\n\n",
    "1234567890",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, VOCAB)


def test_train_sizes_and_special_ids(tok):
    assert tok.vocab_size == VOCAB
    n_ranks = VOCAB - len(SPECIAL_TOKENS)
    assert len(tok.mergeable_ranks) == n_ranks
    assert tok.bos_id == n_ranks  # specials come right after the ranks, bos first
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(n_ranks, VOCAB))
    assert tok.pattern == SPLIT_PATTERN
    with pytest.raises(PoEError):
        tok.special_id("<|nope|>")


def test_rustbpe_and_tiktoken_agree():
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(CORPUS), vocab_size=VOCAB - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    tok = Tokenizer({bytes(b): r for b, r in bpe.get_mergeable_ranks()})
    for text in CORPUS[:3] + MULTILINGUAL:
        assert bpe.encode(text) == tok.encode(text, add_special_tokens=False)


def test_too_small_vocab_raises():
    with pytest.raises(PoEError):
        Tokenizer.train(CORPUS, 256 + len(SPECIAL_TOKENS))  # no room for a single merge
    with pytest.raises(PoEError):
        Tokenizer.train(CORPUS, 100)
    with pytest.raises(PoEError):
        Tokenizer.train(["ab ab"], 5000)  # the text cannot support that many merges
    with pytest.raises(PoEError):
        Tokenizer.train("a single string", 300)


def test_merges_actually_learned(tok):
    # a trained tokenizer must compress its training text well below one token per byte
    text = CORPUS[0]
    assert len(tok.encode(text, add_special_tokens=False)) < 0.6 * len(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_any_text(tok, s):
    assert tok.decode(tok.encode(s)[1:]) == s
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == s


@pytest.mark.parametrize("s", MULTILINGUAL)
def test_roundtrip_multilingual(tok, s):
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_bos(tok):
    assert tok.encode("hello")[0] == tok.bos_id
    assert tok.encode("hello")[1:] == tok.encode("hello", add_special_tokens=False)
    assert tok.bos_id not in tok.encode("hello", add_special_tokens=False)
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_special_tokens=False) == []
    assert tok.decode(tok.encode("hi")) == "<|bos|>hi"


def test_special_token_text_is_not_special(tok):
    specials = set(range(tok.bos_id, tok.vocab_size))
    for s in SPECIAL_TOKENS:
        text = f"hi {s} there{s}"
        ids = tok.encode(text, add_special_tokens=False)
        assert not specials & set(ids)
        assert tok.decode(ids) == text


def test_lone_surrogates_become_replacement_char(tok):
    # documented: lone surrogates -> U+FFFD, an unjoined high+low pair -> its character
    assert clean_text("a\ud800b") == "a\ufffdb"
    assert clean_text("\udc80\ud800") == "\ufffd\ufffd"
    assert clean_text("\ud83d\ude00") == "😀"
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.decode(tok.encode("x\udfffy", add_special_tokens=False)) == "x\ufffdy"
    assert tok.encode_batch(["\ud800", "ok"]) == [tok.encode("\ufffd"), tok.encode("ok")]
    Tokenizer.train(CORPUS + ["bad \ud800 text"], VOCAB)  # training must not crash either


@settings(max_examples=50, deadline=None)
@given(st.lists(st.characters(categories=["Cs"]) | st.characters() | st.sampled_from("한😀a "), max_size=30).map("".join))
# category Cs = surrogates, which st.text() never generates on its own
def test_surrogate_text_never_crashes(tok, s):
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == clean_text(s)


def test_encode_batch_matches_encode(tok):
    texts = MULTILINGUAL + CORPUS[:4]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [tok.encode(t, False) for t in texts]
    assert tok.encode_batch([]) == []


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("한국어 text 😀")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode(np.array(ids, dtype=np.int64)) == tok.decode(ids)
    with pytest.raises(PoEError):
        tok.decode([tok.vocab_size])


def test_decode_broken_utf8_is_replaced(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    first = bytes([list("😀".encode())[0]])
    broken = [tok.mergeable_ranks[first]]
    assert tok.decode(broken) == "\ufffd"
    assert tok.decode(ids + broken + ids) == "😀\ufffd😀"


def test_save_load_roundtrip(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / TOKENIZER_FILE
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle
    state = json.loads(raw)
    assert state["format"] == "poegpt-bpe" and state["version"] == 1
    assert state["special_tokens"]["<|bos|>"] == tok.bos_id
    assert [p.name for p in path.parent.iterdir()] == [TOKENIZER_FILE]  # no temp file left behind
    for where in (path.parent, path):
        tok2 = Tokenizer.load(where)
        assert tok2.vocab_size == tok.vocab_size
        assert tok2.mergeable_ranks == tok.mergeable_ranks
        assert tok2.special_tokens == tok.special_tokens
        for t in MULTILINGUAL + CORPUS:
            assert tok2.encode(t) == tok.encode(t)


def test_load_accepts_dict_ranks(tok, tmp_path):
    path = tok.save(tmp_path)
    state = json.loads(path.read_text())
    state["mergeable_ranks"] = dict(state["mergeable_ranks"])
    path.write_text(json.dumps(state))
    assert Tokenizer.load(tmp_path).encode("안녕 hi") == tok.encode("안녕 hi")


def test_load_missing_or_corrupt_raises(tok, tmp_path):
    with pytest.raises(PoEError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(PoEError, match="no tokenizer"):
        Tokenizer.load(tmp_path)  # directory without the file
    path = tok.save(tmp_path)
    good = path.read_text()
    corruptions = [
        "not json {",
        good[: len(good) // 2],
        "[]",
        json.dumps({**json.loads(good), "format": "pickle"}),
        json.dumps({**json.loads(good), "mergeable_ranks": [["@@@", 0]]}),
        json.dumps({**json.loads(good), "mergeable_ranks": json.loads(good)["mergeable_ranks"][:200]}),
        json.dumps({**json.loads(good), "special_tokens": {"<|bos|>": 0}}),
    ]
    for bad in corruptions:
        path.write_text(bad)
        with pytest.raises(PoEError, match="corrupt tokenizer file") as err:
            Tokenizer.load(tmp_path)
        assert str(path) in str(err.value)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PoEError):
        Tokenizer.load(path)


def test_token_bytes_and_byte_lengths(tok):
    assert tok.token_bytes(tok.bos_id) == b"<|bos|>"
    assert tok.token_bytes(tok.mergeable_ranks[b"a"]) == b"a"
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size
    assert all(lengths[i] == 0 for i in range(tok.bos_id, tok.vocab_size))
    assert all(lengths[i] == len(tok.token_bytes(i)) > 0 for i in range(tok.bos_id))
    for text in MULTILINGUAL + CORPUS:
        ids = tok.encode(text)
        assert sum(lengths[i] for i in ids) == len(text.encode())


def _stream(tok, ids, skip=True):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def test_stream_decoder_holds_back_split_characters(tok):
    text = "한국어 😀 中文 ✓"
    ids = tok.encode(text)
    # the test is only meaningful if some character really is split across tokens
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)
    pieces, tail = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == text
    assert tail == ""
    pieces, tail = _stream(tok, ids, skip=False)
    assert "".join(pieces) + tail == "<|bos|>" + text
    assert isinstance(tok.stream_decoder(), StreamDecoder)


def test_stream_decoder_flushes_incomplete_tail(tok):
    first = tok.mergeable_ranks[bytes(["😀".encode()[0]])]
    dec = tok.stream_decoder()
    assert dec.push(tok.mergeable_ranks[b"a"]) == "a"
    assert dec.push(first) == ""
    assert dec.flush() == "\ufffd"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("가나다한국어中文字日本語😀👍🏽🎉éñ ab\n") | st.characters(codec="utf-8")))
def test_stream_decoder_matches_decode(tok, s):
    ids = tok.encode(s)
    pieces, tail = _stream(tok, ids)
    for p in pieces:
        assert "\ufffd" not in p or "\ufffd" in s
        p.encode("utf-8")  # no broken or lone-surrogate characters
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == s


def test_train_from_files(tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"part{i}.txt"
        f.write_text("\n".join(CORPUS[i::3]) + "\n", encoding="utf-8")
        files.append(str(f))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe bytes\n" * 20)  # invalid UTF-8 is read, not fatal
    tok = train_from_files(files + [str(tmp_path / "bad.txt")], VOCAB)
    assert tok.vocab_size == VOCAB
    assert tok.decode(tok.encode(CORPUS[0])[1:]) == CORPUS[0]
    with pytest.raises(PoEError):
        train_from_files(files, VOCAB, max_chars=50)  # far too little text for 135 merges
    small = train_from_files(files, 256 + 1 + len(SPECIAL_TOKENS), max_chars=500)
    assert small.vocab_size == 266
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PoEError, match="no text"):
        train_from_files([str(empty)], VOCAB)
    with pytest.raises(PoEError):
        train_from_files([str(tmp_path / "missing.txt")], VOCAB)
    with pytest.raises(PoEError):
        train_from_files([], VOCAB)
