"""Document filters: garbage (too short, mostly non-letters, generated code), boilerplate, duplicates.

Applied per source after extraction: lines repeated across many documents of one source (navigation,
footers) are removed, and a document whose normalised text was already written is kept once.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

from poegpt.corpus.extractors import normalize_text
from poegpt.corpus.language import LETTER

MIN_DOC_CHARS = 200  # shorter documents are too small to teach anything
MIN_LETTER_FRACTION = 0.5  # of non-space characters, for prose and math (filters tables, dumps, binaries)
BOILERPLATE_DOCS = 25  # a line found in more documents than this, within one source, is boilerplate


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
