"""nanochat interop: the imported fixture reproduces nanochat's own logits, ids and greedy text."""

import json
import pickle
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
