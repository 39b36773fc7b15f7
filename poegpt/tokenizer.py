"""Byte-level BPE tokenizer: trained with rustbpe, encoded with tiktoken.

This is nanochat's tokenizer. A GPT-4-style split regex (numbers in groups of 1-2 digits) cuts text
into chunks, and BPE merges bytes inside each chunk. The 256 single bytes are always in the
vocabulary, so every string round-trips. Training uses rustbpe (fast, streaming) and encoding uses
tiktoken (fast, multithreaded); both apply the same pattern and the same merge ranks, so they give
identical ids. Nine special tokens get the ids right after the merge ranks, `<|bos|>` first.

Choices worth knowing:
- `encode(text)` prepends `<|bos|>`: every document the model sees starts with it.
- Special-token text inside the input ("<|bos|>" typed by a user) is encoded as ordinary text, never
  as the special id, so chat markup cannot be injected through the input.
- Surrogates: a Python str can hold surrogate code points that no UTF-8 text can ("\\ud800").
  Before encoding (and training) the text goes through its UTF-16 form: each lone surrogate becomes
  U+FFFD (as in HF tokenizers), and a high+low pair that Python left unjoined becomes the character
  it stands for. This is what tiktoken does internally; we do it explicitly in `clean_text` so that
  rustbpe (which would raise) and a future HF export can apply exactly the same rule.
- Decoding joins the tokens' bytes and decodes UTF-8 with errors="replace": ids that split a
  character in the middle give U+FFFD rather than an exception. `StreamDecoder` instead holds back
  an incomplete character until its last byte arrives.
- Saved as plain JSON (no pickle): the ranks as base64 bytes, the pattern, the special tokens.
"""

import base64
import codecs
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import rustbpe
import tiktoken

from poegpt.errors import PoEError
from poegpt.fileio import write_json_atomic

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with this
    "<|user_start|>", "<|user_end|>",  # chat turns
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # tool use: code the assistant writes...
    "<|output_start|>", "<|output_end|>",  # ...and what running it printed
]
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_FILE = "tokenizer_bpe.json"

FORMAT_NAME = "poegpt-bpe"
FORMAT_VERSION = 1
N_BYTES = 256  # the base vocabulary: one token per byte value


def clean_text(text: str) -> str:
    """Make `text` valid Unicode: lone surrogates -> U+FFFD, unjoined surrogate pairs -> their char."""
    try:
        text.encode("utf-8")  # fast path: almost every string is already fine
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """BPE ranks + special tokens, wrapped around a tiktoken Encoding."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise PoEError(f"BPE ranks must be exactly 0..{n - 1} with no gaps; retrain the tokenizer")
        if any(bytes([b]) not in mergeable_ranks for b in range(N_BYTES)):
            raise PoEError("BPE ranks must contain all 256 single bytes (byte fallback); retrain the tokenizer")
        self._ranks = dict(mergeable_ranks)
        self._pattern = pattern
        self._special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name=FORMAT_NAME,
            pat_str=pattern,
            mergeable_ranks=self._ranks,
            special_tokens=self._special,
            explicit_n_vocab=n + len(SPECIAL_TOKENS),
        )
        self._byte_lengths = None  # computed on first use

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train on `texts` so that the result has exactly `vocab_size` ids, specials included."""
        if isinstance(texts, (str, bytes)):
            raise PoEError("Tokenizer.train wants an iterable of strings, not one string; wrap it in a list")
        n_ranks = int(vocab_size) - len(SPECIAL_TOKENS)
        if n_ranks < N_BYTES + 1:
            raise PoEError(
                f"vocab_size={vocab_size} is too small: it needs 256 byte tokens, at least one merge and "
                f"{len(SPECIAL_TOKENS)} special tokens; use vocab_size >= {N_BYTES + 1 + len(SPECIAL_TOKENS)}"
            )
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator((clean_text(t) for t in texts), vocab_size=n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        if len(ranks) < n_ranks:
            # rustbpe stops early when no pair occurs twice; a smaller vocabulary than asked for would
            # silently disagree with the model's embedding size, so refuse instead.
            raise PoEError(
                f"the training text only supports {len(ranks) - N_BYTES} merges but vocab_size={vocab_size} "
                f"needs {n_ranks - N_BYTES}; give more text or use vocab_size <= {len(ranks) + len(SPECIAL_TOKENS)}"
            )
        return cls(ranks, pattern=SPLIT_PATTERN)

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> Path:
        """Write directory/TOKENIZER_FILE as JSON, atomically (a crash never leaves half a file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        ranks = sorted(self._ranks.items(), key=lambda kv: kv[1])
        state = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self._pattern,
            "mergeable_ranks": [[base64.b64encode(b).decode("ascii"), r] for b, r in ranks],
            "special_tokens": dict(self._special),
        }
        write_json_atomic(path, state, indent=None, ensure_ascii=True)
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load from a directory holding TOKENIZER_FILE, or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise PoEError(f"no tokenizer at {file}; train one first or pass the directory that holds {TOKENIZER_FILE}")
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
            if state.get("format") != FORMAT_NAME or state.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {state.get('format')!r} v{state.get('version')!r}")
            raw = state["mergeable_ranks"]
            pairs = raw.items() if isinstance(raw, dict) else raw
            ranks = {base64.b64decode(b, validate=True): int(r) for b, r in pairs}
            if len(ranks) != len(pairs):
                raise ValueError("duplicate tokens in mergeable_ranks")
            tok = cls(ranks, pattern=str(state["pattern"]))
        except PoEError as e:
            raise PoEError(f"corrupt tokenizer file {file}: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise PoEError(f"corrupt tokenizer file {file} ({type(e).__name__}: {e}); retrain or re-copy it") from None
        if state.get("special_tokens") != tok._special:
            raise PoEError(f"corrupt tokenizer file {file}: its special tokens differ from {SPECIAL_TOKENS}; retrain it")
        return tok

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self._ranks) + len(self._special)

    @property
    def bos_id(self) -> int:
        return self._special["<|bos|>"]

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> id for the byte-level BPE part (a copy; ids 0..n_ranks-1)."""
        return dict(self._ranks)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (a copy; ids n_ranks..vocab_size-1, bos first)."""
        return dict(self._special)

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise PoEError(f"unknown special token {name!r}; known ones are {SPECIAL_TOKENS}")
        return self._special[name]

    def is_special(self, id: int) -> bool:
        return id >= len(self._ranks)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token; for a special token, its text."""
        id = int(id)
        if not 0 <= id < self.vocab_size:
            raise PoEError(f"token id {id} is outside the vocabulary [0, {self.vocab_size}); check the ids")
        return self._enc.decode_single_token_bytes(id)

    def token_byte_lengths(self) -> list[int]:
        """Per id, how many bytes of text it stands for; 0 for specials, which stand for no text.
        Summing this over a sequence's ids gives its UTF-8 length, the denominator of bits-per-byte."""
        if self._byte_lengths is None:
            lengths = [0] * self.vocab_size
            for b, r in self._ranks.items():
                lengths[r] = len(b)
            self._byte_lengths = lengths
        return list(self._byte_lengths)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise PoEError(f"encode wants a str, got {type(text).__name__}; use encode_batch for a list")
        ids = self._enc.encode_ordinary(clean_text(text))  # "ordinary": special-token text stays text
        return [self.bos_id] + ids if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, num_threads: int = 8) -> list[list[int]]:
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise PoEError("encode_batch wants a list of str; use encode for a single string")
        batch = self._enc.encode_ordinary_batch([clean_text(t) for t in texts], num_threads=num_threads)
        if add_special_tokens:
            batch = [[self.bos_id] + ids for ids in batch]
        return batch

    def _as_id_list(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PoEError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}); check the ids")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = self._as_id_list(ids)
        if skip_special_tokens:
            n = len(self._ranks)
            ids = [i for i in ids if i < n]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, n_ranks={len(self._ranks)})"


class StreamDecoder:
    """Decode ids one at a time for streaming generation without ever emitting half a character.

    A multi-byte UTF-8 character is often split across tokens; the incremental decoder keeps its first
    bytes until the rest arrive. The concatenation of all push() results and flush() equals
    `tokenizer.decode(ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""
        token_id = int(token_id)
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _read_chunks(paths: list[str], max_chars: int | None, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Yield the files' text in ~1M-char pieces cut at line ends, stopping after max_chars."""
    left = max_chars
    for p in paths:
        try:
            f = open(p, encoding="utf-8", errors="replace")
        except OSError as e:
            raise PoEError(f"cannot read training text {p}: {e.strerror}; check the path") from None
        with f:
            buf, size = [], 0
            for line in f:
                if left is not None:
                    line = line[:left]
                    left -= len(line)
                buf.append(line)
                size += len(line)
                if size >= chunk_chars or left == 0:
                    yield "".join(buf)
                    buf, size = [], 0
                if left == 0:
                    return
            if buf:
                yield "".join(buf)


def train_from_files(paths: list[str], vocab_size: int, max_chars: int | None = None) -> Tokenizer:
    """Train a tokenizer on UTF-8 text files (bad bytes read as U+FFFD), at most max_chars of them."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise PoEError("no training files given; pass at least one text file")
    if max_chars is not None and max_chars <= 0:
        raise PoEError(f"max_chars={max_chars} must be positive (or None for all text)")
    chunks = (c for c in _read_chunks([str(p) for p in paths], max_chars) if c)
    first = next(chunks, None)  # peek, so empty input gets its own message rather than "too few merges"
    if first is None:
        raise PoEError(f"no text in {', '.join(map(str, paths))}; give files with some text")

    def all_chunks():
        yield first
        yield from chunks

    return Tokenizer.train(all_chunks(), vocab_size)
