"""Corpus build: fetch, extract and filter every source, write the buckets, the manifest and the recipe.

Documents go to one JSONL file per bucket (the prose languages, code, math), each written under a
temporary name and renamed into place, so an interrupted build leaves no half-written file. The
manifest records every source's version, licence, documents, bytes and drop reasons and each file's
sha256; recipe.json is `recipes/offline.json` pointing at the built files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from poegpt.corpus.extractors import extract
from poegpt.corpus.files import list_files
from poegpt.corpus.filters import boilerplate_lines, is_garbage, remove_lines, text_hash
from poegpt.corpus.language import LANGUAGES, detect_language, drop_foreign_paragraphs
from poegpt.corpus.sources import DEFAULT_CACHE, SOURCES, CorpusSource, check_sources, ensure_source
from poegpt.data import RECIPES_DIR, split_document
from poegpt.errors import PoEError
from poegpt.fileio import write_json_atomic

BUCKETS = LANGUAGES + ("code", "math")
MAX_DOC_CHARS = 20_000  # documents are split at paragraph boundaries to at most this many characters
RECIPE_TEMPLATE = RECIPES_DIR / "offline.json"
MANIFEST = "manifest.json"
RECIPE = "recipe.json"


def _extract_job(job: tuple[str, str]) -> str:
    path, fmt = job
    try:
        return extract(Path(path), fmt)
    except (OSError, RecursionError, MemoryError):
        return ""


@dataclass
class _Writer:
    """One bucket's JSONL file, written under a temporary name and renamed into place at the end."""

    path: Path
    tmp: Path = field(init=False)
    sha: "hashlib._Hash" = field(init=False)
    documents: int = 0
    bytes: int = 0

    def __post_init__(self):
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "w", encoding="utf-8")
        self.sha = hashlib.sha256()

    def write(self, text: str, source: str, license: str) -> None:
        line = json.dumps({"text": text, "source": source, "license": license}, ensure_ascii=False) + "\n"
        self.f.write(line)
        self.sha.update(line.encode("utf-8"))
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))

    def commit(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "documents": self.documents, "bytes": self.bytes,
                "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def build_corpus(out_dir, cache_dir=None, sources=None, progress: bool = True, workers: int | None = None) -> dict:
    """Fetch, extract, clean and write the offline corpus under `out_dir`; return its manifest.

    `sources` (default `SOURCES`) may name pre-unpacked directories (via "local"), and `cache_dir`
    (default ~/.cache/poegpt/corpus-packages) may hold pre-unpacked packages under unpacked/NAME, so
    a build needs no network once the cache is filled. Output: one JSONL file per non-empty bucket,
    manifest.json and recipe.json.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    sources = tuple(SOURCES if sources is None else sources)
    check_sources(sources)
    repo = Path(__file__).resolve().parents[2]  # the checkout: poegpt/corpus/build.py is 3 levels down
    if out_dir == repo or repo in out_dir.parents and (repo / ".git").exists():
        raise PoEError(f"{out_dir} is inside the repository; the corpus text must not be committed, "
                       f"build it outside (e.g. --out ~/poegpt-corpus)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    writers = {b: _Writer(out_dir / f"{b}.jsonl") for b in BUCKETS}
    seen: set[str] = set()
    records, skipped = [], []
    start = time.time()
    try:
        with Pool(workers or max(1, min(8, os.cpu_count() or 1))) as pool:
            for i, source in enumerate(sources, 1):
                root, version = ensure_source(source, cache_dir)
                if root is None:
                    skipped.append({"name": source.name, "reason": "directory not found"})
                    log(f"[{i}/{len(sources)}] {source.name}: not found, skipped")
                    continue
                record = _build_source(source, root, version, pool, writers, seen)
                records.append(record)
                sizes = ", ".join(f"{b} {n / 1e6:.2f} MB" for b, n in record["bytes_by_bucket"].items())
                log(f"[{i}/{len(sources)}] {source.name}: {record['files']} files -> "
                    f"{record['documents']} docs ({sizes or 'nothing kept'}) [{time.time() - start:.0f}s]")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    files = {}
    for bucket, w in writers.items():
        if w.documents:
            files[bucket] = w.commit()
        else:
            w.abort()
            (out_dir / f"{bucket}.jsonl").unlink(missing_ok=True)  # a stale file from an older build
    manifest = _manifest(records, skipped, files, time.time() - start)
    write_json_atomic(out_dir / RECIPE, corpus_recipe(files))
    write_json_atomic(out_dir / MANIFEST, manifest)
    total = manifest["totals"]["bytes"]
    log(f"corpus: {total / 1e6:.1f} MB in {manifest['totals']['documents']} documents -> {out_dir} "
        f"({time.time() - start:.0f}s)")
    return manifest


def _build_source(source: CorpusSource, root: Path, version, pool, writers, seen) -> dict:
    files = list_files(root, source)
    texts = pool.imap(_extract_job, [(str(root / rel), fmt) for rel, fmt, _ in files], chunksize=8)
    dropped = Counter()
    by_bucket: dict[str, list[tuple[str, str]]] = defaultdict(list)
    kept_bytes = 0
    for (rel, fmt, hint), text in zip(files, texts):
        if source.max_bytes is not None and kept_bytes >= source.max_bytes:
            dropped["over max_bytes"] += 1
            continue
        bucket = hint if source.domain == "prose" else source.domain
        if source.domain == "prose":
            # a page that is not in its path's language is an untranslated copy of one kept elsewhere
            if detect_language(text, hint) != hint:
                dropped[f"not {hint}" if text else "empty"] += 1
                continue
            text = drop_foreign_paragraphs(text, bucket)
        if is_garbage(text, source.domain):
            dropped["garbage"] += 1
            continue
        by_bucket[bucket].append((rel, text))
        kept_bytes += len(text.encode("utf-8"))
    documents, bytes_by_bucket = 0, {}
    for bucket in sorted(by_bucket):
        docs = by_bucket[bucket]
        boiler = set() if source.domain == "code" else boilerplate_lines([t for _, t in docs])
        for rel, text in docs:
            text = remove_lines(text, boiler)
            if is_garbage(text, source.domain):
                dropped["boilerplate only"] += 1
                continue
            h = text_hash(text)
            if h in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(h)
            for piece in split_document(text, MAX_DOC_CHARS):
                if len(piece.strip()) < 50:
                    continue
                writers[bucket].write(piece, f"{source.package}:{rel}", source.license)
                documents += 1
                bytes_by_bucket[bucket] = bytes_by_bucket.get(bucket, 0) + len(piece.encode("utf-8"))
    return {"name": source.name, "via": source.via, "version": version, "license": source.license,
            "domain": source.domain, "files": len(files), "documents": documents,
            "bytes": sum(bytes_by_bucket.values()), "bytes_by_bucket": bytes_by_bucket, "dropped": dict(dropped)}


def _manifest(records: list[dict], skipped: list[dict], files: dict, seconds: float) -> dict:
    total_bytes = sum(f["bytes"] for f in files.values())
    cjk = sum(files[b]["bytes"] for b in ("ko", "zh", "ja") if b in files)
    return {
        "format": "poegpt-corpus",
        "version": 1,
        "built_seconds": round(seconds, 1),
        "buckets": files,
        "totals": {"documents": sum(f["documents"] for f in files.values()), "bytes": total_bytes,
                   "korean_cjk_fraction": round(cjk / total_bytes, 4) if total_bytes else 0.0},
        "sources": records,
        "skipped": skipped,
        "note": "Built from registry packages at set-up time; share-alike licences apply (see each source). "
                "Do not commit or redistribute this text.",
    }


def corpus_recipe(files: dict) -> dict:
    """The mixture recipe for a built corpus: recipes/offline.json with its `{corpus}/` paths made relative
    to the corpus directory (where recipe.json is written) and buckets that came out empty left out,
    the remaining base shares rescaled to sum to 1."""
    recipe = json.loads(RECIPE_TEMPLATE.read_text(encoding="utf-8"))
    kept = []
    for s in recipe["sources"]:
        name = s["path"].replace("{corpus}/", "")
        if name.removesuffix(".jsonl") in files:
            kept.append({**s, "path": name})
    base = sum(s["share"] for s in kept if s.get("role", "base") == "base")
    if not base:
        raise PoEError("the corpus build kept no text at all; check the sources and the package cache")
    for s in kept:
        if s.get("role", "base") == "base":
            s["share"] = round(s["share"] / base, 6)
    drift = 1.0 - sum(s["share"] for s in kept if s.get("role", "base") == "base")
    first = next(s for s in kept if s.get("role", "base") == "base")
    first["share"] = round(first["share"] + drift, 9)  # exact sum, whatever the rounding did
    return {**recipe, "sources": kept}
