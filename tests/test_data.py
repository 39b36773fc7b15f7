"""Data pipeline: recipes and their validation, readers, prepare (shards, manifest, shares, val from
base only) and the loader (BOS-aligned full rows, resume, rank sharding, case augmentation)."""

import hashlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings, strategies as st

from poegpt.data import (
    ASSETS_DIR, MANIFEST, Mixture, Source, TokenLoader, list_recipes, load_mixture, prepare,
    read_documents, read_manifest, record_text, split_document,
)
from poegpt.errors import PoEError
from poegpt.tokenizer import Tokenizer

LANGS = ["en", "ko", "zh", "ja", "es", "fr", "math"]


# ----------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def tok():
    sample = load_mixture("sample")
    texts = [d for s in sample.sources for d in read_documents(s)]
    return Tokenizer.train(texts, vocab_size=512)


@pytest.fixture(scope="session")
def sample_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "data"
    prepare("sample", tok, out, seed=0)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def english_docs(n, tag):
    """Mixed-case documents, so that lower()/upper() always changes them."""
    return [f"{tag} Document {i}: The Quick Brown Fox visits Seoul and Paris on Day {i}." for i in range(n)]


def tiny_mixture(tmp_path, sizes=(("a", 0.5, 60), ("b", 0.3, 40), ("c", 0.2, 40)), overlay=("dlg", 0.1, 30),
                 val_fraction=0.1, name="tiny"):
    sources = []
    for src, share, n in sizes:
        path = write_jsonl(tmp_path / f"{src}.jsonl", [{"text": t} for t in english_docs(n, f"Src{src.upper()}")])
        sources.append(Source(name=src, kind="jsonl", path=path, share=share))
    if overlay:
        src, share, n = overlay
        msgs = [{"messages": [{"role": "user", "content": f"Overlaymarker question {i}?"},
                              {"role": "assistant", "content": f"Overlaymarker Answer {i}."}]} for i in range(n)]
        path = write_jsonl(tmp_path / f"{src}.jsonl", msgs)
        sources.append(Source(name=src, kind="jsonl", path=path, text_field="messages", share=share, role="overlay"))
    return Mixture(name=name, sources=sources, val_fraction=val_fraction)


def shard_docs(data_dir, split):
    """All documents of a split as tuples of ids, in file order."""
    m = json.loads((Path(data_dir) / MANIFEST).read_text())
    docs = []
    for s in m["shards"]:
        if s["split"] != split:
            continue
        arr = np.fromfile(Path(data_dir) / s["file"], dtype=m["dtype"]).astype(np.int64)
        starts = list(np.flatnonzero(arr == m["tokenizer"]["bos_id"])) + [len(arr)]
        docs += [tuple(arr[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]
    return docs


def row_segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


# ----------------------------------------------------------------------------- recipes

CARD_SOURCES = {  # (dataset id, config): share, from the model card's Frontier V2 table
    ("HuggingFaceFW/fineweb-edu", None): 0.28, ("mlfoundations/dclm-baseline-1.0", None): 0.20,
    ("bigcode/the-stack-dedup", None): 0.15, ("hoskinson-center/proof-pile", None): 0.04,
    ("open-web-math/open-web-math", None): 0.04, ("wikimedia/wikipedia", "20231101.en"): 0.05,
    ("uonlp/CulturaX", "ko"): 0.04, ("uonlp/CulturaX", "zh"): 0.025, ("uonlp/CulturaX", "ja"): 0.025,
    ("uonlp/CulturaX", "es"): 0.015, ("uonlp/CulturaX", "fr"): 0.015, ("manu/project_gutenberg", None): 0.04,
    ("deepmind/pg19", None): 0.02, ("HuggingFaceH4/ultrachat_200k", None): 0.02, ("teknium/OpenHermes-2.5", None): 0.04,
}


def test_bundled_recipes():
    assert {"frontier_v2", "sample"} <= set(list_recipes())


def test_frontier_v2_is_the_card_mix():
    m = load_mixture("frontier_v2")
    assert abs(sum(s.share for s in m.base) - 1) < 1e-6
    assert {(s.path, s.config): s.share for s in m.base} == pytest.approx(CARD_SOURCES)
    assert all(s.kind == "hf" and s.license for s in m.sources)
    fields = {s.path: s.text_field for s in m.sources}
    assert fields["bigcode/the-stack-dedup"] == "content"
    assert fields["HuggingFaceH4/ultrachat_200k"] == "messages"
    assert fields["teknium/OpenHermes-2.5"] == "conversations"
    (orca,) = m.overlays
    assert orca.path == "Open-Orca/OpenOrca" and orca.fallback["path"] == "Open-Orca/SlimOrca"
    culturax = sum(s.share for s in m.base if s.path == "uonlp/CulturaX")
    assert culturax == pytest.approx(0.12)  # the card: 12% CulturaX, Korean the largest part
    assert max((s for s in m.base if s.path == "uonlp/CulturaX"), key=lambda s: s.share).config == "ko"


def test_hf_source_fails_clearly_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed, whatever this machine has
    m = load_mixture("frontier_v2")
    with pytest.raises(PoEError, match="datasets is not installed"):
        next(read_documents(m.sources[0]))
    with pytest.raises(PoEError, match="datasets is not installed"):
        prepare(m, tok, tmp_path / "out", max_tokens=1000)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_hf_unreachable_and_fallback(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split="train", streaming=False):
        calls.append((path, name, split, streaming))
        if path == "Open-Orca/SlimOrca":
            return iter([{"conversations": [{"from": "system", "value": "Be brief."},
                                            {"from": "human", "value": "Capital of Korea?"},
                                            {"from": "gpt", "value": "Seoul."}]}])
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    orca = load_mixture("frontier_v2").source("openorca")
    assert list(read_documents(orca)) == ["System: Be brief.\n\nUser: Capital of Korea?\n\nAssistant: Seoul."]
    assert calls[0] == ("Open-Orca/OpenOrca", None, "train", True) and calls[1][0] == "Open-Orca/SlimOrca"
    with pytest.raises(PoEError, match="cannot reach the hub: .*ConnectionError"):
        list(read_documents(load_mixture("frontier_v2").source("culturax_ko")))


def recipe_file(tmp_path, sources, **top):
    (tmp_path / "a.txt").write_text("alpha document", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta document", encoding="utf-8")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"name": "r", "sources": sources, **top}), encoding="utf-8")
    return path


GOOD = [{"name": "a", "kind": "txt", "path": "a.txt", "share": 0.6},
        {"name": "b", "kind": "txt", "path": "b.txt", "share": 0.4}]


@pytest.mark.parametrize("change, match", [
    (lambda s: s[0].update(share=0.5), "sum to"),
    (lambda s: s[0].update(kind="csv"), "unknown kind"),
    (lambda s: s[0].update(role="extra"), "unknown role"),
    (lambda s: s[1].update(name="a"), "duplicate"),
    (lambda s: s[0].update(path="missing.txt"), "no files match"),
    (lambda s: s[0].update(path="nothing/*.txt"), "no files match"),
    (lambda s: s[0].update(share=0), "share must be"),
    (lambda s: s[0].update(sahre=0.6), "unknown field"),
    (lambda s: s[0].update(repeat=0), "repeat"),
    (lambda s: s[0].update(text_field=[]), "text_field"),
    (lambda s: s[0].update(fallback="x/y"), "fallback is for hf"),
    (lambda s: s[0].pop("path"), "lacks"),
    (lambda s: [d.update(role="overlay") for d in s], "no base source"),
])
def test_recipe_validation_errors(tmp_path, change, match):
    sources = [dict(s) for s in GOOD]
    change(sources)
    with pytest.raises(PoEError, match=match):
        load_mixture(recipe_file(tmp_path, sources))


def test_recipe_top_level_errors(tmp_path):
    with pytest.raises(PoEError, match="val_fraction"):
        load_mixture(recipe_file(tmp_path, GOOD, val_fraction=1.5))
    with pytest.raises(PoEError, match="no recipe"):
        load_mixture("no_such_recipe")
    with pytest.raises(PoEError, match="no recipe"):
        load_mixture(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PoEError, match="cannot read recipe"):
        load_mixture(bad)
    with pytest.raises(PoEError, match="no sources"):
        Mixture("empty", [])


def test_recipe_paths_resolve(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("hello", encoding="utf-8")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"name": "r", "sources": [
        {"name": "rel", "kind": "txt", "path": "sub/x.txt", "share": 0.5},
        {"name": "code", "kind": "txt", "path": ["{stdlib}/json/*.py", "{stdlib}/json/__init__.py"], "share": 0.25},
        {"name": "assets", "kind": "txt", "path": "{assets}/sample/en.txt", "share": 0.25, "role": "base"},
        {"name": "ov", "kind": "txt", "path": str(tmp_path / "sub"), "share": 0.3, "role": "overlay"},
    ]}), encoding="utf-8")
    m = load_mixture(str(path))
    assert m.source("rel").files() == [tmp_path / "sub" / "x.txt"]
    code = m.source("code").files()
    assert len(code) == len(set(code)) >= 3 and code[0].name == "__init__.py"  # sorted, no duplicates
    assert m.source("assets").files() == [ASSETS_DIR / "sample" / "en.txt"]
    assert list(read_documents(m.source("ov"))) == ["hello"]  # a directory: its *.txt files


# ----------------------------------------------------------------------------- readers

def test_txt_reader_splits_long_files_and_skips_empty(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * (20 + i) for i in range(30)]
    (tmp_path / "b_long.txt").write_text("\n\n".join(paras), encoding="utf-8")
    (tmp_path / "a_short.txt").write_text("short one", encoding="utf-8")
    (tmp_path / "c_empty.txt").write_text("  \n\n ", encoding="utf-8")
    src = Source(name="t", kind="txt", path=str(tmp_path / "*.txt"), share=1.0, max_doc_chars=500)
    docs = list(read_documents(src))
    assert docs[0] == "short one"  # sorted file order
    assert all(0 < len(d) <= 500 for d in docs) and len(docs) > 5
    assert all(d.startswith("Paragraph") for d in docs[1:])  # cut at paragraph boundaries
    assert " ".join(docs[1:]).split() == "\n\n".join(paras).split()  # nothing lost


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab .\n한。 ")), min_size=0, max_size=400),
       max_chars=st.integers(1, 60))
def test_split_document_property(text, max_chars):
    pieces = split_document(text, max_chars)
    assert all(len(p) <= max_chars for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # only whitespace may go


def test_jsonl_reader_text_field_rules(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain"}, {"text": ""}, {"text": None}, {"text": ["one", "two"]},
        {"text": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ])
    src = Source(name="j", kind="jsonl", path=path, share=1.0)
    assert list(read_documents(src)) == ["plain", "one\n\ntwo", "User: Hi\n\nAssistant: Hello!"]
    rec = {"system_prompt": "", "question": "2+2?", "response": "4"}
    assert record_text(rec, ["question", "response"]) == "2+2?\n\n4"
    labels = {"system_prompt": "System", "question": "User", "response": "Assistant"}
    assert record_text(rec, labels) == "User: 2+2?\n\nAssistant: 4"
    with pytest.raises(PoEError, match="no field 'body'"):
        list(read_documents(Source(name="j", kind="jsonl", path=path, share=1.0, text_field="body")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(PoEError, match="bad.jsonl:2"):
        list(read_documents(Source(name="b", kind="jsonl", path=str(tmp_path / "bad.jsonl"), share=1.0)))


def test_parquet_reader(tmp_path):
    pq.write_table(pa.table({"content": ["x = 1", "", "def f():\n    return 2"], "n": [1, 2, 3]}),
                   tmp_path / "p.parquet")
    src = Source(name="p", kind="parquet", path=str(tmp_path), share=1.0, text_field="content")
    assert list(read_documents(src)) == ["x = 1", "def f():\n    return 2"]
    with pytest.raises(PoEError, match="no column"):
        list(read_documents(Source(name="p", kind="parquet", path=str(tmp_path), share=1.0)))


# ----------------------------------------------------------------------------- prepare

def test_prepare_shards_and_manifest(tok, tmp_path):
    m = tiny_mixture(tmp_path)
    man = prepare(m, tok, tmp_path / "out", shard_tokens=1000)
    out = tmp_path / "out"
    assert json.loads((out / MANIFEST).read_text()) == man
    assert man["dtype"] == "uint16" and man["tokenizer"] == {"vocab_size": 512, "bos_id": tok.bos_id}
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [s["file"] for s in man["shards"]])
    assert sum(s["split"] == "train" for s in man["shards"]) > 1  # shard_tokens splits the train data
    for s in man["shards"]:
        raw = (out / s["file"]).read_bytes()
        arr = np.frombuffer(raw, dtype="<u2")
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        assert len(arr) == s["tokens"] and arr[0] == tok.bos_id
        assert int((arr == tok.bos_id).sum()) == s["documents"]
    for split in ("train", "val"):
        assert man["splits"][split]["tokens"] == sum(x[f"{split}_tokens"] for x in man["sources"])
        assert man["splits"][split]["documents"] == sum(x[f"{split}_documents"] for x in man["sources"])
    for x in man["sources"]:
        assert x["documents"] > 0 and x["bytes"] > 0 and x["tokens"] > 0
    # the train documents are interleaved across sources, not laid out source after source
    first = [tok.decode(d)[7:11] for d in shard_docs(out, "train")[:20]]
    assert len(set(first)) > 1


def test_val_comes_from_base_sources_only(tok, tmp_path):
    m = tiny_mixture(tmp_path, val_fraction=0.3)
    man = prepare(m, tok, tmp_path / "out")
    by_name = {x["name"]: x for x in man["sources"]}
    assert by_name["dlg"]["val_documents"] == 0 and by_name["dlg"]["train_documents"] > 0
    assert all(by_name[n]["val_documents"] >= 1 for n in "abc")
    val_text = [tok.decode(list(d)) for d in shard_docs(tmp_path / "out", "val")]
    train_text = [tok.decode(list(d)) for d in shard_docs(tmp_path / "out", "train")]
    assert not any("Overlaymarker" in t for t in val_text)
    assert any("Overlaymarker" in t for t in train_text)
    assert not set(val_text) & set(train_text)  # held-out documents are never trained on


def test_at_least_one_val_doc_per_base_source(tok, tmp_path):
    m = tiny_mixture(tmp_path, val_fraction=1e-9, overlay=None)
    man = prepare(m, tok, tmp_path / "out")
    assert all(x["val_documents"] == 1 for x in man["sources"])


def test_shares_are_honoured(tok, tmp_path):
    # a has plenty, c is small: c's size sets the total; b is in between
    m = tiny_mixture(tmp_path, sizes=(("a", 0.5, 300), ("b", 0.3, 200), ("c", 0.2, 40)), overlay=("dlg", 0.1, 200))
    man = prepare(m, tok, tmp_path / "out")
    eff, by_name = man["effective_shares"], {x["name"]: x for x in man["sources"]}
    for s in m.sources:
        assert eff[s.name] == pytest.approx(s.share, abs=0.02), s.name
    assert by_name["c"]["train_tokens"] == by_name["c"]["tokens"] - by_name["c"]["val_tokens"]  # c limits
    assert by_name["a"]["train_tokens"] < by_name["a"]["tokens"] - by_name["a"]["val_tokens"]
    # max_tokens caps the total and reads only what is needed
    capped = prepare(m, tok, tmp_path / "out2", max_tokens=2000)
    base_train = sum(x["train_tokens"] for x in capped["sources"] if x["role"] == "base")
    assert 2000 <= base_train < 2000 + 3 * 40
    assert {k: round(v, 1) for k, v in capped["effective_shares"].items()} == {"a": 0.5, "b": 0.3, "c": 0.2, "dlg": 0.1}


def test_repeat_upsamples_a_small_source(tok, tmp_path):
    m = tiny_mixture(tmp_path, sizes=(("a", 0.5, 300), ("c", 0.5, 20)), overlay=None)
    plain = prepare(m, tok, tmp_path / "o1")["splits"]["train"]["tokens"]
    m.sources[1].repeat = 4
    boosted = prepare(m, tok, tmp_path / "o2")
    assert boosted["splits"]["train"]["tokens"] == pytest.approx(4 * plain, rel=0.05)
    assert boosted["effective_shares"]["c"] == pytest.approx(0.5, abs=0.02)


def test_prepare_empty_result_raises(tok, tmp_path):
    (tmp_path / "e.txt").write_text("\n\n  \n", encoding="utf-8")
    m = Mixture("empty", [Source(name="e", kind="txt", path=str(tmp_path / "e.txt"), share=1.0)])
    with pytest.raises(PoEError, match="no training documents"):
        prepare(m, tok, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.txt"]


def test_prepare_replaces_cleanly_and_is_deterministic(tok, tmp_path):
    m = tiny_mixture(tmp_path)
    out = tmp_path / "out"
    first = prepare(m, tok, out, seed=1, shard_tokens=500)
    again = prepare(m, tok, tmp_path / "other", seed=1, shard_tokens=500)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again["shards"]]
    second = prepare(m, tok, out, seed=2, shard_tokens=10**6)  # fewer shards: old ones must vanish
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [s["file"] for s in second["shards"]])
    assert read_manifest(out)["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PoEError, match="not a prepared data directory"):
        prepare(m, tok, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_sample_corpus(sample_dir):
    for lang in LANGS:
        text = (ASSETS_DIR / "sample" / f"{lang}.txt").read_text(encoding="utf-8")
        assert 3000 <= len(text.encode("utf-8")) <= 7000, lang
    assert "대한민국의 수도는 서울이다." in (ASSETS_DIR / "sample" / "ko.txt").read_text(encoding="utf-8")
    man = read_manifest(sample_dir)
    by_name = {x["name"]: x for x in man["sources"]}
    assert set(by_name) == set(LANGS) | {"code", "dialog"}
    assert all(x["train_tokens"] > 0 for x in man["sources"])
    assert all(x["val_documents"] >= 1 for x in man["sources"] if x["role"] == "base")
    assert by_name["dialog"]["val_documents"] == 0
    assert 100_000 < man["splits"]["train"]["tokens"] < 1_000_000
    for name, share in man["effective_shares"].items():
        assert share == pytest.approx(load_mixture("sample").source(name).share, abs=0.02)


# ----------------------------------------------------------------------------- loader

def test_loader_rows_are_bos_aligned_full_and_shifted(tok, sample_dir):
    loader = TokenLoader(sample_dir, "train", batch_size=4, seq_len=64, tokenizer=tok, case_aug_p=0.0)
    docs = set(shard_docs(sample_dir, "train"))
    for x, y in take(loader, 10):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():  # the full row of seq_len + 1 tokens
            segs = row_segments(row, tok.bos_id)
            assert row[0] == tok.bos_id
            assert all(s in docs for s in segs[:-1])  # whole documents...
            assert any(d[:len(segs[-1])] == segs[-1] for d in docs)  # ...then one cropped to fill the row


def test_loader_resume_is_exact(tok, sample_dir):
    kw = dict(batch_size=3, seq_len=128, tokenizer=tok, case_aug_p=0.5, seed=7)
    a = TokenLoader(sample_dir, "train", **kw)
    take(a, 4)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable, as in a checkpoint's meta.json
    expected = take(a, 5)
    b = TokenLoader(sample_dir, "train", **kw)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, take(b, 5)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(PoEError, match="same data and seed"):
        TokenLoader(sample_dir, "train", **{**kw, "seed": 8}).load_state_dict(state)


def test_loader_wraps_epochs_and_resumes_across_them(tok, tmp_path):
    m = tiny_mixture(tmp_path, sizes=(("a", 1.0, 12),), overlay=None)
    prepare(m, tok, tmp_path / "out")
    a = TokenLoader(tmp_path / "out", "train", batch_size=2, seq_len=32, tokenizer=tok, case_aug_p=0.3)
    take(a, 15)  # 30 rows of about one document each: past the 11 training documents twice
    assert a.state_dict()["epoch"] >= 2
    state, expected = a.state_dict(), take(a, 6)
    b = TokenLoader(tmp_path / "out", "train", batch_size=2, seq_len=32, tokenizer=tok, case_aug_p=0.3)
    b.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(expected, take(b, 6)))


def test_rank_sharding_equals_one_big_batch(tok, sample_dir):
    kw = dict(seq_len=48, tokenizer=tok, case_aug_p=0.3, seed=3)
    one = TokenLoader(sample_dir, "train", batch_size=4, **kw)
    ranks = [TokenLoader(sample_dir, "train", batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(6):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_case_augmentation_rate_train_only(tok, tmp_path):
    m = tiny_mixture(tmp_path, sizes=(("a", 1.0, 500),), overlay=None, val_fraction=0.2)
    prepare(m, tok, tmp_path / "out")
    p = 0.3
    train = TokenLoader(tmp_path / "out", "train", batch_size=8, seq_len=256, tokenizer=tok, case_aug_p=p)
    seen = {"lower": 0, "upper": 0, "same": 0}
    for x, y in take(train, 12):
        for row in x.tolist():
            for seg in row_segments(row, tok.bos_id)[:-1]:  # whole documents only
                text = tok.decode(list(seg[1:]))
                seen["lower" if text.islower() else "upper" if text.isupper() else "same"] += 1
    n = sum(seen.values())
    assert n > 300
    assert (seen["lower"] + seen["upper"]) / n == pytest.approx(p, abs=0.07)
    assert min(seen["lower"], seen["upper"]) > 0.3 * (seen["lower"] + seen["upper"])
    val = TokenLoader(tmp_path / "out", "val", batch_size=1, seq_len=16, tokenizer=tok, case_aug_p=0.9)
    val_docs = shard_docs(tmp_path / "out", "val")
    stream = [t for d in val_docs for t in d]
    rows = [torch.cat([x, y[:, -1:]], dim=1)[0].tolist() for x, y in val.iter_batches()]
    assert rows and rows == [stream[i * 16:i * 16 + 17] for i in range(len(rows))]  # verbatim, never augmented


def test_val_loader_order_and_stop(tok, sample_dir):
    val = TokenLoader(sample_dir, "val", batch_size=2, seq_len=64, tokenizer=tok)
    batches = list(val.iter_batches())
    assert len(batches) == val.num_batches > 0
    with pytest.raises(StopIteration):
        val.next_batch()
    rows = [r for x, y in batches for r in torch.cat([x, y[:, -1:]], dim=1).tolist()]
    stream = [t for d in shard_docs(sample_dir, "val") for t in d]  # file order, no shuffle, no augmentation
    expected = [stream[i * 64:i * 64 + 65] for i in range((len(stream) - 1) // 64)]
    assert rows == expected[:len(rows)] and len(expected) - len(rows) < 2
    # every token of the stream but the first is a target exactly once (up to the last partial batch)
    targets = [t for r in rows for t in r[1:]]
    assert targets == stream[1:1 + len(targets)] and len(stream) - 1 - len(targets) < 2 * 64 + 64
    val.reset()
    again = list(val.iter_batches(max_batches=2))
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))


def test_loader_is_deterministic(tok, sample_dir):
    kw = dict(batch_size=2, seq_len=32, tokenizer=tok, seed=5)
    a, b = (TokenLoader(sample_dir, "train", **kw) for _ in range(2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(take(a, 5), take(b, 5)))
    c = TokenLoader(sample_dir, "train", **{**kw, "seed": 6})
    assert not torch.equal(TokenLoader(sample_dir, "train", **kw).next_batch()[0], c.next_batch()[0])


def test_loader_errors(tok, tmp_path):
    m = tiny_mixture(tmp_path, val_fraction=0.0, overlay=None)
    out = tmp_path / "out"
    prepare(m, tok, out)
    with pytest.raises(PoEError, match="no manifest.json"):
        TokenLoader(tmp_path, "train", 2, 16, tokenizer=tok)
    with pytest.raises(PoEError, match="val split .* is empty"):
        TokenLoader(out, "val", 2, 16, tokenizer=tok)
    with pytest.raises(PoEError, match="needs the tokenizer"):
        TokenLoader(out, "train", 2, 16)
    TokenLoader(out, "train", 2, 16, case_aug_p=0.0)  # no tokenizer is fine without augmentation
    other = Tokenizer.train(english_docs(200, "Other") * 3, vocab_size=300)
    with pytest.raises(PoEError, match="vocab_size"):
        TokenLoader(out, "train", 2, 16, tokenizer=other)
    with pytest.raises(PoEError, match="rank"):
        TokenLoader(out, "train", 2, 16, tokenizer=tok, rank=2, world_size=2)
    shard = out / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(PoEError, match="sha256"):
        TokenLoader(out, "train", 2, 16, tokenizer=tok)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(PoEError, match="wrong size"):
        TokenLoader(out, "train", 2, 16, tokenizer=tok)
    (out / MANIFEST).write_text("{broken", encoding="utf-8")
    with pytest.raises(PoEError, match="corrupt"):
        TokenLoader(out, "train", 2, 16, tokenizer=tok)


def test_loader_throughput(tok, sample_dir):
    loader = TokenLoader(sample_dir, "train", batch_size=8, seq_len=256, tokenizer=tok, case_aug_p=0.15)
    t0, n = time.perf_counter(), 0
    for x, _ in loader.iter_batches(max_batches=20):
        n += x.numel()
    assert n / (time.perf_counter() - t0) > 20_000  # tokens/s; far above what CPU training consumes


# ----------------------------------------------------------------------------- hf sources, offline

def _records(source, n):
    """n records of `source` in the layout its text_field expects (as on the hub)."""
    tag = source.name.replace("_", "").capitalize()
    texts = english_docs(n, tag)
    field = source.text_field
    if field == "messages":
        return [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Yes."}]} for t in texts]
    if field == "conversations":
        return [{"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": "Yes."}]} for t in texts]
    if isinstance(field, dict):
        return [{"system_prompt": "Be brief.", "question": t, "response": "Yes."} for t in texts]
    return [{field: t} for t in texts]


def test_frontier_v2_streams_from_local_dataset_copies(tok, tmp_path):
    """The card's recipe, every source a local copy in one of the formats `datasets` saves (parquet
    export or save_to_disk, with the recipe's config subdirectories and splits): prepare streams them
    through `datasets`, honours the card's shares, keeps the overlay train-only and holds out
    validation from base sources only."""
    datasets = pytest.importorskip("datasets")
    m = load_mixture("frontier_v2")
    for i, s in enumerate(m.sources):
        root = tmp_path / s.name
        where = root / s.config if s.config else root
        ds = datasets.Dataset.from_list(_records(s, 300))
        if i % 2:   # the hub's parquet export layout: SPLIT-00000-of-00001.parquet
            where.mkdir(parents=True)
            ds.to_parquet(str(where / f"{s.split}-00000-of-00001.parquet"))
        elif i % 4:
            datasets.DatasetDict({s.split: ds, "other": ds.select(range(3))}).save_to_disk(str(where))
        else:
            ds.save_to_disk(str(where))
        s.path = str(root)
    man = prepare(m, tok, tmp_path / "out", max_tokens=30_000)
    by_name, eff = {x["name"]: x for x in man["sources"]}, man["effective_shares"]
    for s in m.sources:
        assert eff[s.name] == pytest.approx(s.share, abs=0.004), s.name
        assert by_name[s.name]["train_tokens"] > 0
    assert by_name["openorca"]["val_documents"] == 0
    assert all(by_name[s.name]["val_documents"] >= 1 for s in m.base)
    val_text = " ".join(tok.decode(list(d)) for d in shard_docs(tmp_path / "out", "val"))
    train_text = " ".join(tok.decode(list(d)) for d in shard_docs(tmp_path / "out", "train"))
    assert "Openorca" not in val_text and "Assistant: Yes." in train_text   # dialogs flattened, train only
    assert "Culturaxko" in val_text + train_text


def test_local_dataset_errors(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "empty").mkdir()
    for src, match in [(Source("x", "hf", str(tmp_path / "empty"), 1.0), "neither a save_to_disk"),
                       (Source("x", "hf", str(tmp_path / "empty"), 1.0, config="ko"), "no subdirectory 'ko'")]:
        with pytest.raises(PoEError, match=match):
            next(read_documents(src))
