"""Data pipeline: mixture recipes -> tokenised shards -> BOS-aligned, packed training batches.

Three pieces, each usable on its own:

1. **Recipes.** A `Mixture` is a declarative JSON recipe of named `Source`s (a Hugging Face dataset
   id or local txt/jsonl/parquet files), each with a text field, a share and a role. The card's
   Frontier V2 mix is `recipes/frontier_v2.json`; `recipes/sample.json` mixes the small corpus that
   ships in `assets/sample/` with code from Python's own stdlib, so everything runs offline.
2. **prepare().** Reads every source, tokenises documents (BOS first), holds out validation
   documents from `base` sources only, takes whole documents until each source's token budget is
   met, interleaves them in a seeded shuffle and writes flat uint16/uint32 shards plus a
   `manifest.json`. The output directory appears atomically: a crash never leaves half a dataset.
3. **TokenLoader.** Memory-maps the shards and streams (inputs, targets) batches. Train rows start
   at a document start and are packed full (nanochat's crop rule: no padding); train documents are
   shuffled per epoch and case-augmented (the card: p=0.15, lower or upper 50/50). The validation
   split is read once, in order, as one stream cut into consecutive rows, so every validation token
   is scored (cropping would drop most of each long document). The loader's position is a tiny
   dict, so resuming is exact, and every data-parallel rank derives its rows from the same global
   stream.

Share semantics: `base` shares are fractions of the base mix and sum to 1. `overlay` shares are extra
weight on top of it: an overlay with share 0.05 adds 5% of the base mix's train tokens (the card's
dialog overlay is train-only, so overlays never give validation documents).

Other per-source knobs: `repeat` (default 1) lets prepare cycle a small source's train documents
up to that many times to fill its share (the shipped sample corpus is hand-written and small);
`max_doc_chars` (default 20,000) splits longer documents at paragraph, line, sentence or word
boundaries, because the loader crops a document that overflows a row and drops its rest;
`fallback` (hf only) is another dataset id, or {"path", "config", "split", "text_field"}, tried
when the first one cannot be loaded (SlimOrca stores dialogs differently from OpenOrca).

Text-field rule (how a record becomes one document), used by jsonl, parquet and hf sources:
- `text_field: "text"`: the field's value. A string is used as is. A list of strings is joined with
  blank lines. A list of messages (dicts with role/content, or ShareGPT's from/value, as in
  UltraChat, OpenHermes and SlimOrca) is flattened to one `Role: content` paragraph per turn
  (user/human -> User, assistant/gpt -> Assistant, system -> System), turns separated by blank lines.
- `text_field: ["question", "response"]`: each field flattened as above, non-empty ones joined by
  blank lines.
- `text_field: {"system_prompt": "System", "question": "User", "response": "Assistant"}`: the same,
  but each value is labelled `Label: value` (for instruction datasets like OpenOrca).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from poegpt.errors import PoEError
from poegpt.fileio import atomic_directory_write, write_json_atomic

RECIPES_DIR = Path(__file__).parent / "recipes"
ASSETS_DIR = Path(__file__).parent / "assets"
KINDS = ("hf", "txt", "jsonl", "parquet")
ROLES = ("base", "overlay")
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
FORMAT_NAME = "poegpt-tokens"
FORMAT_VERSION = 1
DEFAULT_MAX_DOC_CHARS = 20_000
SHARE_TOLERANCE = 1e-6
# a directory given as a local path means these files under it (recursively); globs pick anything
DIR_PATTERNS = {"txt": ("*.txt", "*.md"), "jsonl": ("*.jsonl",), "parquet": ("*.parquet",)}
ROLE_NAMES = {"user": "User", "human": "User", "assistant": "Assistant", "gpt": "Assistant",
              "system": "System", "tool": "Tool", "function": "Tool"}

# -----------------------------------------------------------------------------
# Recipes


@dataclass
class Source:
    """One named source of documents in a mixture (see the module docstring for share and text_field)."""

    name: str
    kind: str  # "hf" | "txt" | "jsonl" | "parquet"
    path: str | list[str]  # HF dataset id, or local file(s) / dir(s) / glob(s)
    share: float
    role: str = "base"  # "base" | "overlay"
    config: str | None = None  # HF subset (e.g. "20231101.en", a CulturaX language code)
    split: str = "train"  # HF split
    text_field: str | list[str] | dict[str, str] = "text"
    fallback: str | dict | None = None  # hf only: another dataset id, or {"path", "config", "split", "text_field"}
    license: str = ""
    repeat: int = 1  # passes prepare may take over the source's train documents to fill its share
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS  # longer documents are split (see split_document)
    note: str = ""

    def __post_init__(self):
        # placeholders expand here so that a Source built in Python behaves like one from JSON
        if isinstance(self.path, str):
            self.path = expand_placeholders(self.path)
        elif isinstance(self.path, (list, tuple)):
            self.path = [expand_placeholders(p) if isinstance(p, str) else p for p in self.path]

    @property
    def is_local(self) -> bool:
        return self.kind != "hf"

    def patterns(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def files(self) -> list[Path]:
        """The local files this source reads, in a deterministic (sorted per pattern) order."""
        out, seen = [], set()
        for pattern in self.patterns():
            matches = _match_files(pattern, self.kind)
            if not matches:
                raise PoEError(f"source {self.name!r}: no files match {pattern!r}; fix the path in the recipe")
            for f in matches:
                if f not in seen:  # overlapping globs must not read a file twice
                    seen.add(f)
                    out.append(f)
        return out

    def validate(self) -> None:
        where = f"source {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise PoEError(f"a source has no name ({self.name!r}); give every source a unique name")
        if self.kind not in KINDS:
            raise PoEError(f"{where}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.role not in ROLES:
            raise PoEError(f"{where}: unknown role {self.role!r}; use 'base' or 'overlay'")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) \
                or not math.isfinite(self.share) or self.share <= 0:
            raise PoEError(f"{where}: share must be a number > 0, got {self.share!r}; fix the recipe")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise PoEError(f"{where}: repeat must be an integer >= 1, got {self.repeat!r}")
        if isinstance(self.max_doc_chars, bool) or not isinstance(self.max_doc_chars, int) or self.max_doc_chars < 1:
            raise PoEError(f"{where}: max_doc_chars must be an integer >= 1, got {self.max_doc_chars!r}")
        _check_text_field(self.text_field, where)
        patterns = self.patterns()
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise PoEError(f"{where}: path must be a non-empty string (or a list of them), got {self.path!r}")
        if self.kind == "hf":
            if not isinstance(self.path, str):
                raise PoEError(f"{where}: an hf source takes one dataset id as path, got {self.path!r}")
            _check_fallback(self.fallback, where)
        else:
            if self.fallback is not None:
                raise PoEError(f"{where}: fallback is for hf sources only; remove it or use kind 'hf'")
            self.files()  # raises on a missing path


@dataclass
class Mixture:
    """A named set of sources plus the fraction of base documents held out for validation."""

    name: str
    sources: list[Source]
    val_fraction: float = 0.01
    description: str = ""

    def __post_init__(self):
        self.validate()

    @property
    def base(self) -> list[Source]:
        return [s for s in self.sources if s.role == "base"]

    @property
    def overlays(self) -> list[Source]:
        return [s for s in self.sources if s.role == "overlay"]

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise PoEError(f"mixture {self.name!r} has no source {name!r}; it has {[s.name for s in self.sources]}")

    def validate(self) -> None:
        if not self.sources:
            raise PoEError(f"mixture {self.name!r} has no sources; add at least one base source")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PoEError(f"mixture {self.name!r}: duplicate source names {dupes}; names must be unique")
        for s in self.sources:
            s.validate()
        if not self.base:
            raise PoEError(f"mixture {self.name!r} has no base source; mark at least one source role 'base'")
        total = sum(s.share for s in self.base)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise PoEError(f"mixture {self.name!r}: base shares sum to {total:.6g}, not 1; rescale them")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
            raise PoEError(f"mixture {self.name!r}: val_fraction must be in [0, 1), got {vf!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def expand_placeholders(path: str) -> str:
    """`{stdlib}` -> Python's stdlib directory (code that is always there), `{assets}` -> poegpt/assets."""
    return path.replace("{stdlib}", sysconfig.get_paths()["stdlib"]).replace("{assets}", str(ASSETS_DIR))


def list_recipes() -> list[str]:
    """Names of the recipes bundled in poegpt/recipes/."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_mixture(path_or_name: str | os.PathLike) -> Mixture:
    """Load a recipe from a JSON file, or by name from the bundled recipes (e.g. "frontier_v2")."""
    path = Path(path_or_name)
    if not path.is_file():
        bundled = RECIPES_DIR / f"{path_or_name}.json"
        if path.suffix == ".json" or not bundled.is_file():
            raise PoEError(f"no recipe file or bundled recipe named {str(path_or_name)!r}; "
                           f"give a JSON path or one of {list_recipes()}")
        path = bundled
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoEError(f"cannot read recipe {path}: {e}; fix the JSON") from None
    return mixture_from_dict(recipe, base_dir=path.parent)


MIXTURE_KEYS = {"name", "sources", "val_fraction", "description"}
SOURCE_KEYS = {f for f in Source.__dataclass_fields__}


def mixture_from_dict(recipe: dict, base_dir: str | os.PathLike | None = None) -> Mixture:
    """Build a Mixture from a recipe dict; relative local paths resolve against `base_dir`."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sources"), list):
        raise PoEError("a recipe is a JSON object with a 'sources' list; fix the recipe")
    _check_keys(recipe, MIXTURE_KEYS, "the recipe")
    sources = []
    for i, entry in enumerate(recipe["sources"]):
        if not isinstance(entry, dict):
            raise PoEError(f"source #{i} is not a JSON object; write each source as {{\"name\": ..., ...}}")
        where = f"source {entry.get('name', f'#{i}')!r}"
        _check_keys(entry, SOURCE_KEYS, where)
        missing = [k for k in ("name", "kind", "path", "share") if k not in entry]
        if missing:
            raise PoEError(f"{where} lacks {missing}; every source needs name, kind, path and share")
        entry = dict(entry)
        if entry["kind"] != "hf" and base_dir is not None:
            entry["path"] = _resolve(entry["path"], Path(base_dir))
        sources.append(Source(**entry))
    return Mixture(name=recipe.get("name", "unnamed"), sources=sources,
                   val_fraction=recipe.get("val_fraction", 0.01), description=recipe.get("description", ""))


def _resolve(path, base_dir: Path):
    if isinstance(path, list):
        return [_resolve(p, base_dir) for p in path]
    if not isinstance(path, str):
        return path  # validate() reports the type error
    path = expand_placeholders(path)
    return path if os.path.isabs(path) else str(base_dir / path)


def _check_keys(d: dict, known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise PoEError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")


def _check_text_field(tf, where: str) -> None:
    ok = (isinstance(tf, str) and tf) \
        or (isinstance(tf, list) and tf and all(isinstance(f, str) and f for f in tf)) \
        or (isinstance(tf, dict) and tf and all(isinstance(k, str) and isinstance(v, str) for k, v in tf.items()))
    if not ok:
        raise PoEError(f"{where}: text_field must be a field name, a list of names or a {{name: label}} map, "
                       f"got {tf!r}")


def _check_fallback(fb, where: str) -> None:
    if fb is None or (isinstance(fb, str) and fb):
        return
    if isinstance(fb, dict) and isinstance(fb.get("path"), str) and fb["path"]:
        _check_keys(fb, {"path", "config", "split", "text_field"}, f"{where} fallback")
        if "text_field" in fb:
            _check_text_field(fb["text_field"], f"{where} fallback")
        return
    raise PoEError(f"{where}: fallback must be a dataset id or {{\"path\": id, ...}}, got {fb!r}")


def _match_files(pattern: str, kind: str) -> list[Path]:
    p = Path(pattern)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = {f for pat in DIR_PATTERNS[kind] for f in p.rglob(pat)
                 if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)}
        return sorted(found)
    if glob.has_magic(pattern):
        return sorted(Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    return []

# -----------------------------------------------------------------------------
# Readers: each yields the documents (non-empty str) of a source in a deterministic order


def read_documents(source: Source) -> Iterator[str]:
    """Every document of `source`, long ones split to at most source.max_doc_chars characters."""
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}[source.kind]
    for doc in reader(source):
        # long documents are split rather than left whole: the loader crops a document that does not
        # fit a row and drops its rest, so a 400K-character book would otherwise be mostly wasted
        for piece in split_document(doc, source.max_doc_chars):
            if piece.strip():
                yield piece


# where a long document may be cut, coarsest first: paragraphs, lines, sentences, words
CUT_PATTERNS = [re.compile(p) for p in (r"\n[ \t]*\n\s*", r"\n", r"[.!?]\s+|[。！？]\s*", r"\s+")]


def split_document(text: str, max_chars: int = DEFAULT_MAX_DOC_CHARS) -> list[str]:
    """Split `text` into pieces of <= max_chars, cutting at the coarsest boundary that keeps pieces
    at least half full (paragraph, then line, sentence, word; a hard cut only when there is none)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _best_cut(text, start, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    if len(pieces) == 1:
        return pieces
    return [p.rstrip() for p in pieces if p.strip()]


def _best_cut(text: str, start: int, end: int) -> int:
    for pattern in CUT_PATTERNS:
        cuts = [m.end() for m in pattern.finditer(text, start, end) if m.end() > start + (end - start) // 2]
        if cuts:
            return cuts[-1]
    return end


def _read_txt(source: Source) -> Iterator[str]:
    for path in source.files():
        # errors="replace": one stray byte in a big corpus should not stop the build; U+FFFD stays visible
        yield path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(source: Source) -> Iterator[str]:
    for path in source.files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PoEError(f"source {source.name!r}: {path}:{lineno} is not valid JSON ({e.msg}); "
                                   f"fix or remove that line") from None
                yield record_text(record, source.text_field, source.name)


def _read_parquet(source: Source) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PoEError(f"source {source.name!r}: pyarrow is not installed; pip install pyarrow "
                       f"(or pip install 'poegpt[data]')") from None
    columns = list(source.text_field) if not isinstance(source.text_field, str) else [source.text_field]
    for path in source.files():
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for files that are not parquet
            raise PoEError(f"source {source.name!r}: {path} is not a readable parquet file ({_one_line(e)}); "
                           f"fix or remove it") from None
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise PoEError(f"source {source.name!r}: {path} has no column(s) {missing} "
                           f"(it has {pf.schema_arrow.names}); set text_field")
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                yield record_text(record, source.text_field, source.name)


def _read_hf(source: Source) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise PoEError(f"source {source.name!r}: datasets is not installed; pip install 'poegpt[data]' "
                       f"or use local files (kind txt, jsonl or parquet)") from None
    attempts = [dict(path=source.path, config=source.config, split=source.split, text_field=source.text_field)]
    if source.fallback is not None:
        fb = {"path": source.fallback} if isinstance(source.fallback, str) else source.fallback
        attempts.append({**attempts[0], "config": None, **fb})  # a fallback dataset has its own subsets
    errors = []
    for a in attempts:
        try:
            stream = _open_stream(datasets, a["path"], a["config"], a["split"])
        except PoEError:
            raise
        except Exception as e:  # the hub raises many types (HTTP, connection, not found, gated)
            errors.append(f"{a['path']}: {_one_line(e)}")
            continue
        try:
            for record in stream:
                yield record_text(record, a["text_field"], source.name)
        except PoEError:
            raise
        except Exception as e:  # the connection can also drop mid-stream
            raise PoEError(f"source {source.name!r}: cannot reach the hub: reading {a['path']} failed "
                           f"({_one_line(e)}); check the network and run prepare again") from None
        return
    raise PoEError(f"source {source.name!r}: cannot reach the hub: {'; '.join(errors)}; "
                   f"connect to the network or point the source at local files")


def _open_stream(datasets, path: str, config: str | None, split: str):
    """A streaming iterable of records: from the hub by dataset id, or from a local copy of one.

    A local `path` may be a `save_to_disk` directory (a Dataset, or a DatasetDict whose `split` is
    taken) or a directory of parquet files (a hub dataset's parquet export); `config` then names a
    subdirectory, as the hub lays out subsets. Either way records stream (an IterableDataset), so a
    source is read only as far as its share needs, exactly as from the hub."""
    local = Path(path).expanduser()
    if not local.exists():
        return datasets.load_dataset(path, config, split=split, streaming=True)
    if config:
        local = local / config
        if not local.is_dir():
            raise PoEError(f"local dataset {path}: no subdirectory {config!r} for config {config!r}; "
                           f"lay subsets out as PATH/CONFIG/ or remove config")
    if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PoEError(f"local dataset {local}: no split {split!r} (it has {sorted(ds)}); set split")
            ds = ds[split]
        return ds.to_iterable_dataset()
    files = sorted(local.rglob(f"{split}-*.parquet")) or sorted(local.rglob(f"{split}/*.parquet")) \
        or sorted(local.rglob("*.parquet"))
    if not files:
        raise PoEError(f"local dataset {local}: neither a save_to_disk directory nor parquet files; "
                       f"save it with Dataset.save_to_disk or to_parquet")
    return datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split,
                                 streaming=True)


def _one_line(e: Exception, limit: int = 200) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:limit]


def record_text(record: dict, text_field, source_name: str = "?") -> str:
    """One document from one record, by the text-field rule in the module docstring."""
    if not isinstance(record, dict):
        raise PoEError(f"source {source_name!r}: a record is {type(record).__name__}, not an object; "
                       f"each jsonl line must be a JSON object")
    fields = {text_field: None} if isinstance(text_field, str) else \
        dict(text_field) if isinstance(text_field, dict) else {f: None for f in text_field}
    parts = []
    for name, label in fields.items():
        if name not in record:
            raise PoEError(f"source {source_name!r}: a record has no field {name!r} "
                           f"(it has {sorted(record)}); set text_field in the recipe")
        text = flatten_value(record[name]).strip()
        if text:
            parts.append(f"{label}: {text}" if label else text)
    return "\n\n".join(parts)


def flatten_value(value) -> str:
    """A field value as text: strings as is, lists of strings joined, message lists as `Role: content`."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _message_text(value)
    if isinstance(value, (list, tuple)):
        return "\n\n".join(t for t in (flatten_value(v).strip() for v in value) if t)
    return str(value)


def _message_text(msg: dict) -> str:
    role = msg.get("role", msg.get("from"))
    content = flatten_value(msg.get("content", msg.get("value", ""))).strip()
    if not content:
        return ""
    if role is None:
        return content
    label = ROLE_NAMES.get(str(role).lower(), str(role).capitalize())
    return f"{label}: {content}"

# -----------------------------------------------------------------------------
# prepare: documents -> token shards + manifest


DTYPES = {"uint16": "<u2", "uint32": "<u4"}  # shards are little-endian whatever the CPU


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return np.dtype(DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"])


def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from `parts`: stable across runs, machines and Python versions."""
    h = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


@dataclass
class _SourceTokens:
    """A source's tokenised documents, spilled to one flat file while prepare runs."""

    source: Source
    path: Path
    lengths: list[int] = field(default_factory=list)
    is_val: list[bool] = field(default_factory=list)
    bytes: int = 0

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def tokens(self, split: str) -> int:
        want_val = split == "val"
        return sum(n for n, v in zip(self.lengths, self.is_val) if v == want_val)


def prepare(mixture: Mixture | str, tokenizer, out_dir, max_tokens: int | None = None,
            shard_tokens: int = 2**24, seed: int = 0, batch_docs: int = 256, progress: bool = False) -> dict:
    """Tokenise `mixture` into shards under `out_dir` and return the manifest (also saved as manifest.json).

    The train token total is the largest one at which every base source fills its share (counting
    `repeat` passes), capped by `max_tokens`; with max_tokens set, a source is only read until it
    could fill share * max_tokens, so a streaming hub source is never read to its end.
    """
    if isinstance(mixture, (str, os.PathLike)):
        mixture = load_mixture(mixture)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise PoEError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise PoEError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    seed = int(seed)
    out_dir = Path(out_dir).resolve()  # so that "." or "data/" still has a name and a parent
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        # replacing is only safe for a directory that prepare made; never delete someone's files
        raise PoEError(f"{out_dir} exists and is not a prepared data directory; choose another out_dir")
    dtype = token_dtype(tokenizer.vocab_size)
    result = {}

    def write(tmp: Path) -> None:
        (tmp / "spill").mkdir()
        spilled = [_tokenize_source(s, i, tokenizer, tmp / "spill", dtype, mixture.val_fraction, seed,
                                    None if max_tokens is None else math.ceil(s.share * max_tokens),
                                    batch_docs, progress)
                   for i, s in enumerate(mixture.sources)]
        total = _train_total(spilled, max_tokens)
        train_items = [item for i, st in enumerate(spilled) for item in _take(st, i, st.source.share * total)]
        order = np.random.default_rng(seed).permutation(len(train_items))
        train_items = [train_items[j] for j in order]
        val_items = [(i, d) for i, st in enumerate(spilled) for d, v in enumerate(st.is_val) if v]
        shards = _write_split(tmp, "train", train_items, spilled, dtype, shard_tokens)
        shards += _write_split(tmp, "val", val_items, spilled, dtype, shard_tokens)
        result.update(_manifest(mixture, tokenizer, dtype, seed, max_tokens, shards, spilled, train_items, val_items))
        shutil.rmtree(tmp / "spill")
        write_json_atomic(tmp / MANIFEST, result)

    atomic_directory_write(out_dir, write)
    return result


def _tokenize_source(source: Source, index: int, tokenizer, spill_dir: Path, dtype, val_fraction: float,
                     seed: int, train_cap: int | None, batch_docs: int, progress: bool) -> _SourceTokens:
    st = _SourceTokens(source, spill_dir / f"{index:03d}.bin")
    bos = tokenizer.bos_id
    docs = read_documents(source)
    if progress:
        from tqdm import tqdm
        docs = tqdm(docs, desc=f"tokenizing {source.name}", unit="doc", leave=False)
    train_tokens = 0
    with open(st.path, "wb") as f:
        for batch in _batched(docs, batch_docs):
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                arr = _document_array(ids, bos, tokenizer.vocab_size, dtype)
                is_val = source.role == "base" and unit_hash(source.name, len(st.lengths), seed) < val_fraction
                arr.tofile(f)
                st.lengths.append(len(arr))
                st.is_val.append(is_val)
                st.bytes += len(text.encode("utf-8"))
                train_tokens += 0 if is_val else len(arr)
            if train_cap is not None and train_tokens >= train_cap:
                break  # enough for share * max_tokens: don't read (or stream) the rest
    if source.role == "base" and val_fraction > 0 and len(st.lengths) >= 2:
        rank = lambda d: unit_hash(source.name, d, seed)  # noqa: E731  (the same hash that chose val)
        if not any(st.is_val):  # every base source shows up in validation: its lowest-hash document
            st.is_val[min(range(len(st.lengths)), key=rank)] = True
        if all(st.is_val):  # ...and in training: its highest-hash document
            st.is_val[max(range(len(st.lengths)), key=rank)] = False
    elif len(st.lengths) == 1:
        st.is_val[0] = False  # a single document trains rather than leaving the source empty
    return st


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _document_array(ids: list[int], bos: int, vocab_size: int, dtype) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) == 0 or arr[0] != bos:
        arr = np.concatenate([[bos], arr])  # the loader finds documents by their BOS
    if (arr[1:] == bos).any():
        arr = np.concatenate([[bos], arr[1:][arr[1:] != bos]])  # a stray BOS would split the document
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise PoEError(f"the tokenizer produced id {int(arr.max())} outside its vocab_size {vocab_size}; "
                       f"the tokenizer is broken, retrain or reload it")
    return arr.astype(dtype)


def _train_total(spilled: list[_SourceTokens], max_tokens: int | None) -> float:
    """The largest train total at which every base source can fill its share (capped by max_tokens)."""
    total, limiting = math.inf if max_tokens is None else float(max_tokens), None
    for st in spilled:
        if st.source.role != "base":
            continue
        capacity = st.tokens("train") * st.source.repeat
        if capacity / st.source.share < total:
            total, limiting = capacity / st.source.share, st
    if total == 0:
        raise PoEError(f"source {limiting.source.name!r} gave no training documents, so the mixture is empty; "
                       f"check its path/text_field or give it more text")
    return total


def _take(st: _SourceTokens, index: int, budget: float) -> list[tuple[int, int]]:
    """Whole train documents in order (cycling up to `repeat` passes) until `budget` tokens are taken."""
    train_docs = [d for d, v in enumerate(st.is_val) if not v]
    taken, items = 0, []
    for _ in range(st.source.repeat):
        for d in train_docs:
            if taken >= budget:
                return items
            items.append((index, d))
            taken += st.lengths[d]
    return items


def _write_split(out: Path, split: str, items: list[tuple[int, int]], spilled: list[_SourceTokens],
                 dtype, shard_tokens: int) -> list[dict]:
    """Concatenate documents into shards; a shard closes once it holds >= shard_tokens tokens."""
    views = [np.memmap(st.path, dtype=dtype, mode="r") if st.lengths else None for st in spilled]
    offsets = [st.offsets() for st in spilled]
    shards, f, info = [], None, None
    for i, d in items:
        if f is None:
            info = {"file": f"{split}_{len(shards):05d}.bin", "split": split, "tokens": 0, "documents": 0}
            f, sha = open(out / info["file"], "wb"), hashlib.sha256()
        doc = views[i][offsets[i][d]:offsets[i][d + 1]]
        raw = doc.tobytes()
        f.write(raw)
        sha.update(raw)
        info["tokens"] += len(doc)
        info["documents"] += 1
        if info["tokens"] >= shard_tokens:
            f.close()
            shards.append({**info, "sha256": sha.hexdigest()})
            f = None
    if f is not None:
        f.close()
        shards.append({**info, "sha256": sha.hexdigest()})
    del views
    return shards


def _manifest(mixture, tokenizer, dtype, seed, max_tokens, shards, spilled, train_items, val_items) -> dict:
    train_tokens = [0] * len(spilled)
    train_docs = [0] * len(spilled)
    for i, d in train_items:
        train_tokens[i] += spilled[i].lengths[d]
        train_docs[i] += 1
    base_train = sum(t for t, st in zip(train_tokens, spilled) if st.source.role == "base")
    if base_train + sum(train_tokens) == 0:
        raise PoEError(f"mixture {mixture.name!r} produced no training documents; check its sources")
    sources = []
    for st, tt, td in zip(spilled, train_tokens, train_docs):
        s = st.source
        sources.append({
            "name": s.name, "role": s.role, "kind": s.kind, "share": s.share, "license": s.license,
            "documents": len(st.lengths), "tokens": int(sum(st.lengths)), "bytes": st.bytes,
            "train_documents": td, "train_tokens": tt,
            "val_documents": int(sum(st.is_val)), "val_tokens": st.tokens("val"),
        })
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "mixture": mixture.name,
        "seed": seed,
        "max_tokens": max_tokens,
        "val_fraction": mixture.val_fraction,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id},
        "dtype": dtype.name,
        "splits": {split: {"tokens": sum(s["tokens"] for s in shards if s["split"] == split),
                           "documents": sum(s["documents"] for s in shards if s["split"] == split)}
                   for split in SPLITS},
        "shards": shards,
        "sources": sources,
        # train tokens per source over the base mix's train tokens: compare with `share`
        "effective_shares": {s["name"]: s["train_tokens"] / max(base_train, 1) for s in sources},
        "recipe": mixture.to_dict(),
    }


# -----------------------------------------------------------------------------
# Loading prepared data


def read_manifest(data_dir) -> dict:
    """The manifest of a prepared data directory, checked for shape and shard sizes."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise PoEError(f"{data_dir} has no {MANIFEST}; run `poegpt prepare` to build the data first")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        ok = m.get("format") == FORMAT_NAME and isinstance(m.get("shards"), list) \
            and isinstance(m["tokenizer"]["vocab_size"], int) and isinstance(m["tokenizer"]["bos_id"], int)
        dtype = np.dtype(DTYPES[m["dtype"]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise PoEError(f"{path} is corrupt or not a poegpt manifest; run `poegpt prepare` again")
    if m.get("version") != FORMAT_VERSION:
        raise PoEError(f"{path} has format version {m.get('version')}, this poegpt reads {FORMAT_VERSION}; "
                       f"run `poegpt prepare` again")
    for shard in m["shards"]:
        f = data_dir / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise PoEError(f"shard {f} is missing or has the wrong size; run `poegpt prepare` again")
    return m


def verify_shards(data_dir, manifest: dict | None = None) -> None:
    """Check every shard's sha256 against the manifest (reads all the data once)."""
    data_dir = Path(data_dir)
    manifest = manifest or read_manifest(data_dir)
    for shard in manifest["shards"]:
        sha = hashlib.sha256()
        with open(data_dir / shard["file"], "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
        if sha.hexdigest() != shard["sha256"]:
            raise PoEError(f"shard {data_dir / shard['file']} fails its sha256 check; run `poegpt prepare` again")


class TokenLoader:
    """Streams (inputs, targets) LongTensors of shape (batch_size, seq_len) from prepared shards.

    The global stream is a sequence of rows of seq_len+1 tokens. A row starts at a document start;
    documents are packed into it greedily and the first one that does not fit is cropped to fill
    the row exactly (its rest is dropped), so every row is full. A step takes batch_size * world_size
    consecutive rows and rank r keeps rows [r*batch_size, (r+1)*batch_size): N ranks with batch B see
    the rows of one rank with batch N*B. Rows never carry a partial document over, so the position
    in the stream is just (epoch, next document), which `state_dict()` returns.
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, tokenizer=None,
                 case_aug_p: float = 0.15, seed: int = 0, rank: int = 0, world_size: int = 1,
                 check_hashes: bool = True):
        if split not in SPLITS:
            raise PoEError(f"unknown split {split!r}; use 'train' or 'val'")
        for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise PoEError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise PoEError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if not 0 <= case_aug_p <= 1:
            raise PoEError(f"case_aug_p must be in [0, 1], got {case_aug_p!r}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer
        self.case_aug_p = case_aug_p if split == "train" else 0.0  # validation is never augmented
        if self.case_aug_p > 0 and tokenizer is None:
            raise PoEError("case augmentation needs the tokenizer to re-encode documents; "
                           "pass tokenizer=... or case_aug_p=0")

        self.manifest = m = read_manifest(self.data_dir)
        if check_hashes:
            verify_shards(self.data_dir, m)
        if tokenizer is not None and (tokenizer.vocab_size, tokenizer.bos_id) != \
                (m["tokenizer"]["vocab_size"], m["tokenizer"]["bos_id"]):
            raise PoEError(f"{self.data_dir} was prepared with vocab_size {m['tokenizer']['vocab_size']}, "
                           f"but the tokenizer has {tokenizer.vocab_size}; prepare again with this tokenizer")
        self.bos_id = m["tokenizer"]["bos_id"]
        self.fingerprint = hashlib.sha256("".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()[:16]
        self._index_documents([s for s in m["shards"] if s["split"] == split], np.dtype(DTYPES[m["dtype"]]))
        if self.num_docs == 0:
            raise PoEError(f"the {split} split of {self.data_dir} is empty; "
                           f"prepare with more data (or val_fraction > 0 for a val split)")
        self.reset()
        self._perm_epoch, self._perm = None, None
        self.num_batches = self._count_val_batches() if split == "val" else None
        if self.num_batches == 0:
            raise PoEError(f"the val split of {self.data_dir} ({self.num_tokens} tokens) cannot fill one batch of "
                           f"{world_size * batch_size} x {seq_len + 1} tokens; use a smaller batch or seq_len")

    def _index_documents(self, shards: list[dict], dtype) -> None:
        """Memory-map the split's shards and find each document by its BOS."""
        self._shards, starts, lengths, owner = [], [], [], []
        for k, shard in enumerate(shards):
            mm = np.memmap(self.data_dir / shard["file"], dtype=dtype, mode="r")
            s = np.flatnonzero(mm == self.bos_id)
            if len(s) != shard["documents"] or (len(s) and s[0] != 0):
                raise PoEError(f"shard {shard['file']} does not match its manifest; run `poegpt prepare` again")
            self._shards.append(mm)
            starts.append(s)
            lengths.append(np.diff(np.append(s, len(mm))))
            owner.append(np.full(len(s), k, dtype=np.int32))
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
        self._doc_start, self._doc_len = cat(starts, np.int64), cat(lengths, np.int64)
        self._doc_shard = cat(owner, np.int32)
        self.num_docs, self.num_tokens = len(self._doc_len), int(self._doc_len.sum())

    def _count_val_batches(self) -> int:
        """How many full global batches the val stream gives: rows start every seq_len tokens."""
        rows = (self.num_tokens - 1) // self.seq_len
        return rows // (self.batch_size * self.world_size)

    # --- the document stream

    def _doc_order(self, epoch: int) -> np.ndarray | None:
        if self.split == "val":
            return None  # file order
        if self._perm_epoch != epoch:
            # the epoch is mixed into the seed: every pass over the data has its own order
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
            self._perm_epoch = epoch
        return self._perm

    def _next_doc(self, materialize: bool) -> tuple[int, np.ndarray | None]:
        """Advance to the next document; return its length and (if materialize) its tokens."""
        if self.pos >= self.num_docs:
            if self.split == "val":
                raise StopIteration
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._doc_order(self.epoch)
        d = int(order[self.pos]) if order is not None else self.pos
        self.pos += 1
        case = self._case_choice(self.epoch, d)
        if case is None:
            n = int(self._doc_len[d])
            if not materialize:
                return n, None
            start = self._doc_start[d]
            return n, self._shards[self._doc_shard[d]][start:start + n]
        tokens = self._augment(d, case)  # re-encoding can change the length, so always compute it
        return len(tokens), tokens

    def _case_choice(self, epoch: int, d: int) -> str | None:
        """lower/upper/None for document d in this epoch: a pure function, so resuming needs no RNG state."""
        if self.case_aug_p <= 0:
            return None
        if unit_hash("case", self.seed, epoch, d) >= self.case_aug_p:
            return None
        return "lower" if unit_hash("which", self.seed, epoch, d) < 0.5 else "upper"

    def _augment(self, d: int, case: str) -> np.ndarray:
        start, n = self._doc_start[d], self._doc_len[d]
        text = self.tokenizer.decode(self._shards[self._doc_shard[d]][start + 1:start + n].tolist())
        text = text.lower() if case == "lower" else text.upper()
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=True), dtype=np.int64)

    def _next_val_row(self) -> np.ndarray:
        """Validation reads the split as one stream in file order: row i is tokens [i·T, i·T + T + 1),
        so every token but the first is scored exactly once and no document is cropped away."""
        while len(self._val_carry) < self.seq_len + 1:
            self._val_carry = np.concatenate([self._val_carry, self._next_doc(True)[1]]).astype(np.int64, copy=False)
        row = self._val_carry[:self.seq_len + 1]
        self._val_carry = self._val_carry[self.seq_len:]  # a view: the row's last token starts the next row
        return row

    def _next_row(self, materialize: bool) -> np.ndarray | None:
        if self.split == "val":
            return self._next_val_row()
        row = np.empty(self.seq_len + 1, dtype=np.int64) if materialize else None
        filled = 0
        while filled < self.seq_len + 1:
            n, tokens = self._next_doc(materialize)
            take = min(n, self.seq_len + 1 - filled)  # crop rule: the rest of a too-long document is dropped
            if materialize:
                row[filled:filled + take] = tokens[:take]
            filled += take
        return row

    # --- public API

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) of this rank; the val split raises StopIteration when done."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        # every rank walks all rows of the global batch (cheap: only lengths) so all ranks stay in step
        rows = [self._next_row(lo <= r < hi) for r in range(self.batch_size * self.world_size)]
        x = torch.from_numpy(np.stack(rows[lo:hi]))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def iter_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches from the current position (until the end of val, or max_batches)."""
        i = 0
        while max_batches is None or i < max_batches:
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch
            i += 1

    __iter__ = iter_batches

    def reset(self) -> None:
        """Back to the start of epoch 0 (e.g. before every validation pass)."""
        self.epoch, self.pos = 0, 0
        self._val_carry = np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "pos": self.pos, "seed": self.seed,
                "data": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        try:
            split, epoch, pos, seed, data = (state[k] for k in ("split", "epoch", "pos", "seed", "data"))
        except (KeyError, TypeError):
            raise PoEError("the loader state is incomplete; pass a dict from TokenLoader.state_dict()") from None
        if (split, seed, data) != (self.split, self.seed, self.fingerprint):
            raise PoEError(f"the loader state is for split {split!r}, seed {seed}, data {data}, but this loader "
                           f"has {self.split!r}, {self.seed}, {self.fingerprint}; resume on the same data and seed")
        if not (isinstance(epoch, int) and isinstance(pos, int) and epoch >= 0 and 0 <= pos <= self.num_docs):
            raise PoEError(f"the loader state has an invalid position (epoch={epoch!r}, pos={pos!r})")
        self.epoch, self.pos = epoch, pos
        self._val_carry = np.zeros(0, dtype=np.int64)
