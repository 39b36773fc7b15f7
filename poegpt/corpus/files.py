"""Which files of an unpacked source the corpus reads, and with which extractor.

A source's include/exclude patterns pick its files; the file name picks the format (man pages,
HTML, TeX, Python, plain text; images, archives and changelogs are not text); the path picks the
language bucket. A package that ships the same text twice (`x.html` and `_sources/x.rst.txt`)
contributes one copy, the simplest format winning.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from poegpt.corpus.language import path_language
from poegpt.corpus.sources import CorpusSource


SKIP_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "ico", "css", "js", "pdf", "dvi", "ps", "eps", "epub",
                   "woff", "woff2", "ttf", "otf", "tfm", "vf", "pfb", "afm", "xpm", "dat", "ods", "odt", "webm",
                   "ogg", "mp4", "zip", "bz2", "xz", "pyc", "so", "mo", "json", "hhp", "hhc", "hhk", "map", "bin"}
FORMAT_PRIORITY = {"text": 0, "rst": 0, "md": 0, "roff": 1, "tex": 1, "xml": 2, "html": 3}  # lower wins a tie


def file_format(rel: str, forced: str | None = None) -> str | None:
    """The extractor for a file, from its name (a trailing .gz is looked through); None = not text."""
    name = rel.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in SKIP_EXTENSIONS or name in ("copyright", "changelog") or name.startswith("changelog"):
        return None
    if forced:
        return forced
    if "/man/" in f"/{rel}" and re.fullmatch(r"[1-9][a-z0-9]*", ext):
        return "roff"
    return {"html": "html", "htm": "html", "xhtml": "html", "page": "xml", "xml": "xml", "tex": "tex",
            "txt": "text", "rst": "rst", "md": "md", "py": "python", "": "text"}.get(ext)


def copy_key(rel: str) -> str:
    """Files that hold the same text in two formats share this key (html/x.html ~ html/_sources/x.rst.txt)."""
    parts = [p for p in rel.split("/") if p not in ("_sources", "html", "txt", "text")]
    name = parts[-1] if parts else rel
    if name.endswith(".gz"):
        name = name[:-3]
    name = re.sub(r"(\.(rst|txt|html?|xhtml|md|page|xml))+$", "", name)
    return "/".join(parts[:-1] + [name])


def list_files(root: Path, source: CorpusSource) -> list[tuple[str, str, str]]:
    """(relative path, format, language hint) of every file `source` reads under `root`, sorted, one copy each."""
    chosen: dict[tuple[str, str], tuple[str, str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/")
            if source.include and not any(fnmatch.fnmatch(rel, p) for p in source.include):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in source.exclude):
                continue
            fmt = file_format(rel, source.format)
            if fmt is None or (source.domain == "code" and fmt != "python"):
                continue
            if source.format == "docstrings" and not rel.endswith(".py"):
                continue
            lang = source.domain if source.domain != "prose" else path_language(rel, source.lang)
            if lang is None:
                continue
            key = (lang, copy_key(rel))
            old = chosen.get(key)
            if old is None or FORMAT_PRIORITY.get(fmt, 9) < FORMAT_PRIORITY.get(old[1], 9):
                chosen[key] = (rel, fmt, lang)
    return sorted(chosen.values())
