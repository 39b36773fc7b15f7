"""nanochat interop: the imported fixture reproduces nanochat's own logits, ids and greedy text."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poegpt.errors import PoEError
from poegpt.nanochat import import_nanochat, load_nanochat

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def imported():
    return load_nanochat(FIXTURE)


def test_logits_equal_nanochat(imported):
    model, _, _ = imported
    ref = load_file(FIXTURE / "logits.safetensors")
    K = model.config.n_stages
    for i, t in enumerate(EXPECTED["texts"]):
        ids = torch.tensor([t["ids"]])
        z = model.forward_stage(ids, K - 1)[0]
        assert (z - ref[f"text{i}"]).abs().max().item() <= 1e-4


def test_tokenizer_ids_equal_nanochat(imported):
    _, tok, _ = imported
    assert tok.bos_id == EXPECTED["bos"]
    for t in EXPECTED["texts"]:
        assert tok.encode(t["text"]) == t["ids"]


def test_dense_greedy_equals_nanochat(imported):
    model, _, _ = imported
    K = model.config.n_stages
    for p in EXPECTED["prompts"]:
        cont = p["engine_greedy"]
        assert cont == p["naive_greedy"]
        out = model.generate_stage(torch.tensor([p["ids"]]), K - 1, max_new_tokens=len(cont))
        assert out[0, len(p["ids"]):].tolist() == cont


def test_import_writes_a_loadable_checkpoint(tmp_path, imported):
    from poegpt.checkpoint import load_model
    out = import_nanochat(FIXTURE, tmp_path / "m", stages=[2, 1, 1])
    model = load_model(out)[0]
    assert model.config.stage_layout == (2, 1, 1)
    ids = torch.tensor([EXPECTED["texts"][0]["ids"]])
    ref = load_file(FIXTURE / "logits.safetensors")["text0"]
    assert (model.forward_stage(ids, 2)[0] - ref).abs().max().item() <= 1e-4


def _copy(tmp_path):
    src = tmp_path / "nano"
    shutil.copytree(FIXTURE, src)
    return src, src / "base_checkpoints" / "d4"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["empty", "truncated", "evil_pickle", "vocab", "stages"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, case):
    src, d4 = _copy(tmp_path)
    stages = None
    if case == "empty":
        src = tmp_path / "empty"; src.mkdir()
    elif case == "truncated":
        pt = d4 / "model_000250.pt"
        pt.write_bytes(pt.read_bytes()[: 1 << 20])
    elif case == "evil_pickle":
        (src / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(_Evil()))
    elif case == "vocab":
        meta = json.loads((d4 / "meta_000250.json").read_text())
        meta["model_config"]["vocab_size"] = 8192
        (d4 / "meta_000250.json").write_text(json.dumps(meta))
    elif case == "stages":
        stages = [2, 1]
    out = tmp_path / "out"
    with pytest.raises(PoEError) as e:
        import_nanochat(src, out, stages=stages)
    assert "\n" not in str(e.value) and str(e.value)
    assert not out.exists()


def expected_rows():
    """The three prompts (of different lengths: a ragged batch) and nanochat's greedy continuations."""
    return [p["ids"] for p in EXPECTED["prompts"]], [p["engine_greedy"] for p in EXPECTED["prompts"]]


def assert_dense_verified_equals_nanochat(model):
    """Dense-verified speculative decoding gives nanochat's own greedy continuations, for every draft
    stage and draft length, each prompt alone and the three as one ragged batch."""
    K = model.config.n_stages
    rows, want = expected_rows()
    n = len(want[0])
    for d in range(K - 1):
        for k in (1, 3, "auto"):
            for batch in [[r] for r in range(len(rows))] + [list(range(len(rows)))]:
                out = model.generate_speculative([rows[r] for r in batch], draft_stage=d, k_draft=k,
                                                 max_new_tokens=n, verifier="dense", fallback="never")
                for i, r in enumerate(batch):
                    assert out[i, len(rows[r]):len(rows[r]) + n].tolist() == want[r], (d, k, batch)


def test_dense_verified_speculative_equals_nanochat_greedy(imported):
    """With the imported (zero) stage heads: every draft is nanochat's lm_head on an early boundary."""
    assert_dense_verified_equals_nanochat(imported[0])


# --- export-nanochat ----------------------------------------------------------------------------------

def nanochat_files(root: Path) -> dict[str, Path]:
    """The files nanochat reads from a base dir, by layout (step numbers as <step>)."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and rel.startswith(("base_checkpoints/", "tokenizer/")):
            found[re.sub(r"_\d{6}\.", "_<step>.", rel)] = p
    return found


def test_export_writes_nanochat_layout_and_round_trips(tmp_path, imported):
    """import -> export gives back nanochat's own checkpoint: the same files, meta keys, state dict
    (names and values), tokenizer (a tiktoken pickle) and token_bytes; importing it again gives the
    same model."""
    import tiktoken
    from poegpt.nanochat import export_nanochat
    src = import_nanochat(FIXTURE, tmp_path / "imported")
    out = export_nanochat(src, tmp_path / "nano")
    ours, theirs = nanochat_files(out), nanochat_files(FIXTURE)
    assert sorted(ours) == sorted(theirs) == ["base_checkpoints/d4/meta_<step>.json",
                                              "base_checkpoints/d4/model_<step>.pt",
                                              "tokenizer/token_bytes.pt", "tokenizer/tokenizer.pkl"]
    meta = json.loads(ours["base_checkpoints/d4/meta_<step>.json"].read_text())
    ref_meta = json.loads(theirs["base_checkpoints/d4/meta_<step>.json"].read_text())
    assert list(meta) == list(ref_meta) and meta["model_config"] == ref_meta["model_config"]
    sd = torch.load(ours["base_checkpoints/d4/model_<step>.pt"], weights_only=True)
    ref = torch.load(theirs["base_checkpoints/d4/model_<step>.pt"], weights_only=True)
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert torch.equal(torch.load(ours["tokenizer/token_bytes.pt"], weights_only=True),
                       torch.load(theirs["tokenizer/token_bytes.pt"], weights_only=True))
    enc = pickle.loads(ours["tokenizer/tokenizer.pkl"].read_bytes())      # tiktoken's own pickle, as nanochat reads it
    ref_enc = pickle.loads(theirs["tokenizer/tokenizer.pkl"].read_bytes())
    assert isinstance(enc, tiktoken.Encoding) and enc.__getstate__() == ref_enc.__getstate__()
    again, tok, _ = load_nanochat(out)
    model, _, _ = imported
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    ids = torch.tensor([EXPECTED["texts"][1]["ids"]])
    K = model.config.n_stages
    assert torch.equal(again.forward_stage(ids, K - 1), model.forward_stage(ids, K - 1))


def test_export_refuses_what_nanochat_cannot_express(tmp_path):
    """One line, nothing written: a window nanochat computes differently (tiny: context 64, S layers),
    a model without a tokenizer, a run with no checkpoint."""
    from poegpt import PoEConfig, PoEGPT
    from poegpt.checkpoint import save_checkpoint
    from poegpt.cli import main
    from poegpt.tokenizer import Tokenizer
    tok = Tokenizer.train(["the export refuses what nanochat cannot express " * 4, "una tabla de modos para todos"], 300)
    save_checkpoint(tmp_path / "tiny", PoEGPT(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size)), tok)
    save_checkpoint(tmp_path / "notok", PoEGPT(PoEConfig.from_preset("tiny", window_pattern="L")))
    (tmp_path / "empty_run").mkdir()
    from poegpt.nanochat import export_nanochat
    for src, message in [("tiny", "window_pattern 'SSSL' at sequence_len 64: nanochat's short window is 128"),
                         ("notok", "has no tokenizer"), ("empty_run", "holds no checkpoint")]:
        with pytest.raises(PoEError) as e:
            export_nanochat(tmp_path / src, tmp_path / "out")
        assert message in str(e.value) and "\n" not in str(e.value)
        assert main(["export-nanochat", str(tmp_path / src), str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()
