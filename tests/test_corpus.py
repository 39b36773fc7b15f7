"""The offline corpus builder: cleaning functions on small strings, and a full build over a fake
package tree made in a temporary directory (no apt, no pip, no network)."""

import gzip
import hashlib
import json
import shutil

import pytest

from poegpt import corpus
from poegpt.corpus import CorpusSource, extractors, files, filters, language
from poegpt.corpus.build import MAX_DOC_CHARS
from poegpt.data import RECIPES_DIR, load_mixture, read_documents, split_document
from poegpt.errors import PoEError

EN = ("The quick brown fox jumps over the lazy dog, and it is a fine day for the walk. This paragraph is "
      "written in English so that the stop words of the language can be counted with care. ")
FR = ("Le renard brun saute par-dessus le chien paresseux, et il est temps pour une promenade dans le parc. "
      "Cette page est écrite en français pour que les mots vides soient comptés avec soin. ")
ES = ("El zorro marrón salta sobre el perro perezoso, y es un buen día para dar un paseo por el parque. "
      "Esta página está escrita en español para que las palabras se puedan contar con cuidado. ")
KO = "한국어 문서는 이렇게 작성됩니다. 파일 메뉴에서 저장을 선택하면 문서가 저장됩니다. 이 문단은 한국어 시험용입니다. "
JA = "これは日本語の文書です。ファイルメニューから保存を選ぶと、文書が保存されます。この段落は試験用です。"
ZH = "这是一个中文文档。从文件菜单中选择保存，文档就会被保存。这个段落用于测试。"


# --- extractors


def test_html_to_text_keeps_prose_and_drops_markup():
    html = ("<html><head><title>T</title><style>p{color:red}</style><script>var x = 1;</script></head>"
            "<body><nav>Home | Next</nav><h1>Title &amp; more</h1><p>First   paragraph\nwith <b>bold</b> "
            "text.</p><pre>  code\n    indented</pre><ul><li>one</li><li>two</li></ul></body></html>")
    text = extractors.html_to_text(html)
    assert "Title & more" in text
    assert "First paragraph with bold text." in text
    assert "color" not in text and "var x" not in text and "Home" not in text and "<" not in text
    assert "one\n\ntwo" in text
    assert "code\nindented" in text  # pre keeps its lines (indentation is normalised away)


def test_mallard_page_drops_info_block():
    page = ('<?xml version="1.0"?><page xmlns="http://projectmallard.org/1.0/" id="x"><info>'
            '<credit><name>Someone</name></credit><license><p>CC-BY-SA</p></license></info>'
            '<title>Connect</title><p>Open the <gui>Settings</gui>.</p><steps><item><p>Step one.</p></item></steps></page>')
    text = extractors.html_to_text(page)
    assert text.startswith("Connect")
    assert "Open the Settings." in text and "Step one." in text
    assert "Someone" not in text and "CC-BY-SA" not in text


def test_strip_roff_without_groff():
    man = ('.\\" a comment\n.TH LS 1 "2020" "GNU" "User Commands"\n.SH NAME\nls \\- list directory contents\n'
           '.SH DESCRIPTION\n.PP\nList information about the \\fBFILEs\\fR (the current directory by default).\n'
           '.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore entries\n')
    text = extractors.strip_roff(man)
    assert "NAME" in text and "ls - list directory contents" in text
    assert "List information about the FILEs (the current directory by default)." in text
    assert "-a, --all" in text
    assert "\\f" not in text and "comment" not in text and ".TH" not in text


def test_roff_to_text_uses_groff_when_present():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    man = '.TH LS 1 "2020" "GNU" "User Commands"\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n' \
          'List information about the \\fBFILEs\\fR.\n'
    text = extractors.roff_to_text(man)
    assert "ls - list directory contents" in text and "List information about the FILEs." in text
    assert "User Commands" not in text  # the running header is dropped
    assert "\x08" not in text and "\x1b" not in text


def test_tex_to_text():
    tex = ("\\documentclass{article}\\begin{document}\n\\section{Intro}\nThis is \\emph{important}: % comment\n"
           "the value of $x^2$ is\nnon-negative.\\label{sec:intro}\n\n\\begin{figure}drop me\\end{figure}\n"
           "\\end{document}")
    text = extractors.tex_to_text(tex)
    assert "Intro" in text and "This is important:" in text and "the value of" in text
    assert "comment" not in text and "drop me" not in text and "\\emph" not in text and "sec:intro" not in text
    assert "is the value of $x^2$ is non-negative." in text.replace("important: ", "is ")  # lines unwrapped


def test_python_docstrings():
    src = ('"""Module docstring that is long enough to be kept in the corpus because it explains things."""\n'
           'def f(x):\n    """Return x squared; a docstring long enough to be kept in the corpus, about the function f."""\n'
           '    return x * x\n\ndef g():\n    """short"""\n')
    text = extractors.python_docstrings(src)
    assert "Module docstring" in text and "f\n\nReturn x squared" in text and "short" not in text
    assert extractors.python_docstrings("def (:") == ""


def test_fortune_and_normalize():
    assert extractors.fortune_to_text("One saying.\n%\nAnother saying.\n%\n") == "One saying.\n\nAnother saying."
    messy = "\x1b[31mred\x1b[0m  text\r\n\n\n\n  next\u00a0line \t\x07"
    assert extractors.normalize_text(messy) == "red text\n\nnext line"
    assert extractors.normalize_text("│ a │ b │\n├──┼──┤\nkept") == "kept"  # box-drawn table rules go
    assert extractors.normalize_code("def f():\r\n    return 1   \n\n\n\n\nx = 2\n") == "def f():\n    return 1\n\n\nx = 2"


def test_read_text_file_rejects_non_utf8(tmp_path):
    (tmp_path / "ok.gz").write_bytes(gzip.compress("héllo".encode()))
    (tmp_path / "latin1.txt").write_bytes("h\xe9llo".encode("latin-1"))
    (tmp_path / "bin").write_bytes(b"\x00\x01\x02binary")
    assert extractors.read_text_file(tmp_path / "ok.gz") == "héllo"
    assert extractors.read_text_file(tmp_path / "latin1.txt") is None
    assert extractors.read_text_file(tmp_path / "bin") is None

# --- filters


def test_detect_language():
    assert language.detect_language(EN * 3) == "en"
    assert language.detect_language(FR * 3) == "fr"
    assert language.detect_language(ES * 3) == "es"
    assert language.detect_language(KO * 3) == "ko"
    assert language.detect_language(JA * 3) == "ja"
    assert language.detect_language(ZH * 3) == "zh"
    assert language.detect_language(EN * 3, hint="ko") == "en"  # an untranslated page is not Korean
    assert language.detect_language("12345 !!!") is None


def test_drop_foreign_paragraphs():
    text = f"{KO}\n\n{EN}\n\nshort English line\n\n{KO}"
    kept = language.drop_foreign_paragraphs(text, "ko")
    assert EN.strip() not in kept and "short English line" in kept and kept.count("한국어 문서") == 2
    assert language.drop_foreign_paragraphs(text, "en") == text


def test_is_garbage():
    assert filters.is_garbage("too short")
    assert not filters.is_garbage(EN * 3)
    assert filters.is_garbage("0x1F 0x2A 0x3B 12 34 56 78 90 | -- ++ ** " * 20)  # mostly non-letters
    assert filters.is_garbage(EN * 3 + "\ufffd" * 10)
    assert not filters.is_garbage("x = [1, 2, 3]\n" * 40, domain="code")
    assert filters.is_garbage("data = '" + "a" * 1000 + "'\n" * 5, domain="code")


def test_boilerplate_and_dedupe_hash():
    docs = [f"Page {i}\n\nPrevious | Next\n\n{EN}" for i in range(30)]
    boiler = filters.boilerplate_lines(docs, max_docs=25)
    assert "Previous | Next" in boiler and EN in boiler and "Page 3" not in boiler
    assert filters.remove_lines("Page 3\n\nPrevious | Next\n\nbody", {"Previous | Next"}) == "Page 3\n\nbody"
    assert filters.text_hash("Hello  world\n") == filters.text_hash("hello world")
    assert filters.text_hash("hello world") != filters.text_hash("hello there")


def test_path_language_and_format():
    assert language.path_language("usr/share/help/ko/gnome-help/a.page", "en") == "ko"
    assert language.path_language("usr/share/help/C/gnome-help/a.page", "en") == "en"
    assert language.path_language("usr/share/help/zh_CN/a.page", "en") == "zh"
    assert language.path_language("html/ja-JP/a.html", "en") == "ja"
    assert language.path_language("reference/ch01.fr.html", "en") == "fr"
    assert language.path_language("usr/share/help/de/a.page", "en") is None  # outside the buckets: skipped
    assert language.path_language("doc/guide/intro.html", "en") == "en"
    assert files.file_format("usr/share/man/ja/man1/ls.1.gz") == "roff"
    assert files.file_format("a/b.html") == "html" and files.file_format("a/b.png") is None
    assert files.file_format("a/changelog.gz") is None
    assert files.copy_key("html/library/os.html") == files.copy_key("html/_sources/library/os.rst.txt")


def test_split_long_documents_at_paragraphs():
    paragraph = EN * 20  # ~3.6k characters
    text = "\n\n".join([paragraph] * 12)
    pieces = split_document(text, MAX_DOC_CHARS)
    assert len(pieces) >= 2 and all(len(p) <= MAX_DOC_CHARS for p in pieces)
    assert all(p.endswith(paragraph.strip()) for p in pieces)  # cut at paragraph boundaries

# --- a build over a fake package tree


def _fake_packages(tmp_path):
    """A pre-unpacked 'apt' package in the cache (help pages in three languages, an html+txt double,
    a man page, an untranslated Korean page, a binary and an exact duplicate) and a local code dir."""
    cache = tmp_path / "cache"
    root = cache / "unpacked" / "fake-help"
    (root / ".poegpt-package.json").parent.mkdir(parents=True)
    (root / ".poegpt-package.json").write_text(json.dumps({"name": "fake-help", "version": "1.2-3"}))

    def page(rel, body):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<html><body><div>Site navigation</div><h1>Topic</h1><p>{body}</p></body></html>",
                        encoding="utf-8")

    for i in range(30):  # navigation repeated on every page is boilerplate
        page(f"help/C/topic{i}.html", f"Topic number {i}. " + EN * 2)
    page("help/ko/topic1.html", KO * 4)
    page("help/ko/topic2.html", EN * 2)  # untranslated: not Korean, dropped
    page("help/fr/topic1.html", FR * 3)
    page("help/de/topic1.html", "Der schnelle braune Fuchs springt über den faulen Hund. " * 10)  # skipped
    page("help/C/copy.html", "Topic number 3. " + EN * 2)  # same text as topic3.html: a duplicate
    (root / "help/C/topic5.txt").write_text("Topic\n\nTopic number 5. " + EN * 2)  # txt twin of topic5.html
    (root / "help/C/logo.png").write_bytes(b"\x89PNG\x00\x00")
    man = root / "man/ja/man1/tool.1.gz"
    man.parent.mkdir(parents=True)
    man.write_bytes(gzip.compress(f'.TH TOOL 1\n.SH 名前\ntool \\- {JA}\n.SH 説明\n{JA * 3}\n'.encode()))
    code = tmp_path / "code"
    (code / "pkg" / "tests").mkdir(parents=True)
    (code / "pkg" / "mod.py").write_text('"""A module."""\n\n\ndef add(a, b):\n    return a + b\n' * 10)
    (code / "pkg" / "tests" / "test_mod.py").write_text("def test_add():\n    assert True\n" * 20)
    sources = [
        CorpusSource("fake-help", "apt", "CC-BY-SA-3.0", include=("help/*", "man/*")),
        CorpusSource("fake-code", "local", "MIT", domain="code", include=("*.py",), exclude=("*/tests/*",),
                     path=str(code)),
        CorpusSource("fake-missing", "local", "MIT", domain="code", path=str(tmp_path / "nope")),
    ]
    return cache, sources


def test_build_corpus_on_fake_packages(tmp_path):
    cache, sources = _fake_packages(tmp_path)
    out = tmp_path / "corpus"
    m = corpus.build_corpus(out, cache_dir=cache, sources=sources, progress=False, workers=1)

    assert set(m["buckets"]) == {"en", "ko", "fr", "ja", "code"}
    files = sorted(p.name for p in out.iterdir())
    assert files == ["code.jsonl", "en.jsonl", "fr.jsonl", "ja.jsonl", "ko.jsonl", "manifest.json", "recipe.json"]
    assert json.loads((out / "manifest.json").read_text()) == m
    for bucket, info in m["buckets"].items():
        raw = (out / info["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == info["sha256"]
        records = [json.loads(line) for line in raw.decode().splitlines()]
        assert len(records) == info["documents"]
        assert sum(len(r["text"].encode()) for r in records) == info["bytes"]
        assert all(set(r) == {"text", "source", "license"} for r in records)

    en = [json.loads(line) for line in (out / "en.jsonl").read_text().splitlines()]
    assert len(en) == 30  # 30 topics; copy.html is a duplicate, topic5 kept once (from the .txt)
    assert not any("Site navigation" in r["text"] or "<" in r["text"] for r in en)
    assert any(r["source"] == "fake-help:help/C/topic5.txt" for r in en)
    assert not any("topic5.html" in r["source"] for r in en)
    assert all(r["license"] == "CC-BY-SA-3.0" for r in en)
    ko = [json.loads(line)["text"] for line in (out / "ko.jsonl").read_text().splitlines()]
    assert len(ko) == 1 and "한국어" in ko[0]
    ja = json.loads((out / "ja.jsonl").read_text())
    assert "これは日本語の文書です" in ja["text"] and ".SH" not in ja["text"]
    code = [json.loads(line) for line in (out / "code.jsonl").read_text().splitlines()]
    assert [r["source"] for r in code] == ["fake-code:pkg/mod.py"]
    assert "    return a + b" in code[0]["text"]  # code keeps its indentation

    src = {s["name"]: s for s in m["sources"]}
    assert src["fake-help"]["version"] == "1.2-3" and src["fake-help"]["license"] == "CC-BY-SA-3.0"
    assert src["fake-help"]["dropped"]["duplicate"] == 1 and src["fake-help"]["dropped"]["not ko"] == 1
    assert m["skipped"] == [{"name": "fake-missing", "reason": "directory not found"}]
    assert m["totals"]["bytes"] == sum(b["bytes"] for b in m["buckets"].values())
    assert 0 < m["totals"]["korean_cjk_fraction"] < 1

    # the recipe written beside the corpus loads and reads its documents
    mix = load_mixture(out / "recipe.json")
    assert {s.name for s in mix.sources} == {"en", "ko", "fr", "ja", "code"}
    assert abs(sum(s.share for s in mix.base) - 1) < 1e-6
    assert len(list(read_documents(mix.source("en")))) == 30

    # rebuilding gives the same bytes (deterministic order and content)
    m2 = corpus.build_corpus(out, cache_dir=cache, sources=sources, progress=False, workers=1)
    assert {b: f["sha256"] for b, f in m2["buckets"].items()} == {b: f["sha256"] for b, f in m["buckets"].items()}


def test_build_refuses_the_repository_and_bad_sources(tmp_path):
    with pytest.raises(PoEError, match="inside the repository"):
        corpus.build_corpus(RECIPES_DIR.parent.parent / "corpus-out", sources=[], progress=False)
    with pytest.raises(PoEError, match="unknown language"):
        corpus.build_corpus(tmp_path, sources=[CorpusSource("x", "local", "MIT", lang="de", path=str(tmp_path))],
                            progress=False)
    with pytest.raises(PoEError, match="kept no text"):
        corpus.build_corpus(tmp_path / "o", cache_dir=tmp_path, progress=False, workers=1,
                            sources=[CorpusSource("x", "local", "MIT", path=str(tmp_path / "empty"))])


def test_offline_recipe_template_is_consistent():
    recipe = json.loads(corpus.RECIPE_TEMPLATE.read_text())
    shares = {s["name"]: s["share"] for s in recipe["sources"]}
    assert set(shares) == set(corpus.BUCKETS)
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert all(s["path"] == f"{{corpus}}/{s['name']}.jsonl" and s["license"] for s in recipe["sources"])


def test_cli_parser_registers_corpus_build():
    import argparse
    p = argparse.ArgumentParser()
    corpus.add_corpus_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["corpus", "build", "--out", "/tmp/x", "--only", "fortunes"])
    assert a.fn is corpus.cmd_corpus_build and a.out == "/tmp/x" and a.only == ["fortunes"]
