"""poegpt adapt on the nanochat fixture: the stage heads train on the frozen trunk, stage K-1 stays
nanochat's model bit for bit, the loop's resume/metrics/checkpoints carry over, and bad input is one line."""

import json
from pathlib import Path

import pytest
import torch

from poegpt.adapt import adapt
from poegpt.checkpoint import checkpoints_in, load_model
from poegpt.cli import main
from poegpt.data import prepare
from poegpt.errors import PoEError
from poegpt.nanochat import import_nanochat
from poegpt.optim import trainable_names
from poegpt.tokenizer import Tokenizer

from test_nanochat import FIXTURE, assert_dense_verified_equals_nanochat, expected_rows

SHORT = dict(steps=6, batch_size=4, sequence_len=64, eval_every=3, save_every=3, eval_tokens=1024, progress=False,
             dtype="fp32")   # module fixtures run before conftest fixes the CPU (auto would be bf16 on some hosts)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The imported fixture (layout 1,1,1,1: zero heads) and the bundled sample prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("adapt")
    imported = import_nanochat(FIXTURE, root / "imported")
    tok = Tokenizer.load(imported)
    prepare("sample", tok, root / "data")
    tok.save(root / "data")
    return root


@pytest.fixture(scope="module")
def adapted(root):
    adapt(root / "imported", root / "data", root / "run", **SHORT)
    return root / "run"


def test_heads_train_and_stage_k1_stays_nanochats_model(root, adapted):
    before, _ = load_model(root / "imported")
    after, _ = load_model(adapted)
    K = after.config.n_stages
    trained = {f"lm_head_stages.{k}.weight" for k in range(K - 1)}
    old, new = before.state_dict(), after.state_dict()
    for name in old:
        if name in trained:
            assert not torch.equal(new[name], old[name]) and new[name].abs().sum() > 0, name
        else:
            assert torch.equal(new[name], old[name]), name          # trunk, shared head, W_{K-1}: untouched
    rows, want = expected_rows()
    for ids, cont in zip(rows, want):
        assert after.generate_stage([ids], K - 1, max_new_tokens=len(cont))[0, len(ids):].tolist() == cont
    assert_dense_verified_equals_nanochat(after)
    _, acceptance = after.generate_speculative([rows[0]], draft_stage=K - 2, max_new_tokens=24, verifier="dense",
                                               return_acceptance=True)
    assert 0.0 <= acceptance <= 1.0


def test_adapt_is_the_training_loop(adapted):
    """metrics.jsonl, the plot and atomic checkpoints, as train writes them; the run is resumable."""
    rows = [json.loads(line) for line in (adapted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val" in r] == [3, 6]
    assert (adapted / "bpb.png").stat().st_size > 1000
    assert [p.name for p in checkpoints_in(adapted)] == ["step_000003", "step_000006"]


def test_adapt_resume_is_bit_exact(root, adapted, tmp_path):
    adapt(root / "imported", root / "data", tmp_path / "chunked", stop_at=3, **SHORT)
    assert main(["adapt", "--out", str(tmp_path / "chunked"), "--resume", "--quiet"]) == 0
    a = [json.loads(line) for line in (adapted / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    ma, _ = load_model(adapted)
    mb, _ = load_model(tmp_path / "chunked")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.mark.parametrize("which", ["heads+last-layers", "all"])
def test_what_trains_and_a_recut(root, tmp_path, which):
    """--stages re-cuts a zero-head model (zero heads of the new count); exactly the chosen parameters move."""
    out = tmp_path / "run"
    assert main(["adapt", "--model", str(root / "imported"), "--data", str(root / "data"), "--out", str(out),
                 "--stages", "2,1,1", "--train", which, "--steps", "2", "--batch-size", "2", "--sequence-len", "32",
                 "--eval-every", "2", "--eval-tokens", "256", "--quiet"]) == 0
    after, _ = load_model(out)
    assert after.config.stage_layout == (2, 1, 1)
    before, _ = load_model(root / "imported")
    old = before.state_dict()
    moved = {n for n, v in after.state_dict().items() if not torch.equal(v, old.get(n, torch.zeros_like(v)))}
    assert moved == trainable_names(after, which)
    if which == "heads+last-layers":     # the last layers of the stages ending at layers 1, 2, 3; layer 0 stays
        assert any(n.startswith("blocks.1.") for n in moved) and not any(n.startswith("blocks.0.") for n in moved)


def _swapped_tokenizer(root, out: Path) -> Path:
    """The data directory with a tokenizer of the same size but two ranks swapped: another tokenizer."""
    import shutil
    shutil.copytree(root / "data", out)
    tok = Tokenizer.load(root / "data")
    ranks = tok.mergeable_ranks
    a, b = sorted(ranks, key=ranks.get)[300:302]
    ranks[a], ranks[b] = ranks[b], ranks[a]
    Tokenizer(ranks, pattern=tok.pattern).save(out)
    return out


@pytest.mark.parametrize("case", ["train", "stages", "tokenizer", "recut_trained", "no_model"])
def test_bad_input_is_one_line_and_writes_nothing(root, adapted, tmp_path, capsys, case):
    out = tmp_path / "out"
    model, data, extra = root / "imported", root / "data", []
    message = {"train": "--train must be one of all, heads, heads+last-layers, got 'everything'",
               "stages": "stage_layout [2, 1] sums to 3, but n_layer is 4",
               "tokenizer": "was tokenised with another tokenizer",
               "recut_trained": "has trained stage heads for the layout [1, 1, 1, 1]",
               "no_model": "--model and --data are required"}[case]
    if case == "train":
        extra = ["--train", "everything"]
    elif case == "stages":
        extra = ["--stages", "2,1"]
    elif case == "tokenizer":
        data = _swapped_tokenizer(root, tmp_path / "data2")
    elif case == "recut_trained":
        model, extra = adapted, ["--stages", "2,1,1"]
    args = ["adapt", "--data", str(data), "--out", str(out), "--steps", "1", "--quiet", *extra]
    assert main(args if case == "no_model" else args + ["--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not out.exists()
    if case == "recut_trained":
        with pytest.raises(PoEError, match="re-cutting it to"):
            adapt(adapted, root / "data", out, stages=[2, 1, 1], steps=1, progress=False)
        assert not out.exists()
