"""Extractors: one file's markup (HTML/XML help, man-page roff, LaTeX, Python, fortunes) to clean text.

Only the standard library and, when installed, groff are used, so a build needs nothing beyond
Python. Every extractor ends in `normalize_text` (NFC, no control characters or terminal escapes,
normalised whitespace, help-system footers dropped); code keeps its indentation (`normalize_code`).
"""

from __future__ import annotations

import ast
import gzip
import os
import re
import shutil
import subprocess
import unicodedata
from html.parser import HTMLParser
from pathlib import Path


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
