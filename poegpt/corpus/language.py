"""Language of a corpus file: from its path (`ko/`, `ja_JP/`, `index.fr.html`) and from its text.

Packages ship translations side by side, often with pages left untranslated. A file's path says
which language it should be in; its text says which it is: the script (Hangul, kana, Han, Latin)
and, for Latin script, stop-word counts tell en/fr/es apart. A page whose text is not in its path's
language is dropped, and in Korean, Chinese and Japanese pages the untranslated English paragraphs
are dropped too.
"""

from __future__ import annotations

import re
from collections import Counter

LANGUAGES = ("en", "ko", "zh", "ja", "es", "fr")  # the prose buckets, one JSONL file each


LANGUAGE_CODES = {"c": "en", "en": "en", "en_us": "en", "en_gb": "en", "ko": "ko", "ko_kr": "ko",
                  "ja": "ja", "ja_jp": "ja", "zh": "zh", "zh_cn": "zh", "cn": "zh", "zh_tw": "zh", "zh_hk": "zh",
                  "fr": "fr", "fr_fr": "fr", "es": "es", "es_es": "es"}
# other languages' codes: files under them are skipped (they would pollute the buckets above)
OTHER_CODES = set("""af am an ar as ast az be bg bn bo br bs ca cs cy da de dz el eo et eu fa fi fur ga gd gl gu
    he hi hr hu hy ia id is it ka kk km kn ku ky lo lt lv mai mk ml mn mr ms my nb ne nl nn oc or pa pl ps pt
    ro ru si sk sl sq sr sv sw ta te tg th tk tl tr ug uk ur uz vi wa xh zu""".split())


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
