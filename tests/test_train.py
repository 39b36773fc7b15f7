"""Training, checkpoints, resume, kill-safety, evaluation and the CLI, on the tiny preset."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from poegpt import PoEConfig, PoEError, PoEGPT
from poegpt.checkpoint import (checkpoints_in, load_model, load_training_state, resolve_checkpoint,
                               save_checkpoint)
from poegpt.data import TokenLoader, prepare
from poegpt.objectives import model_loss
from poegpt.evaluate import prompt_target_ranks, stream_metrics, write_report
from poegpt.optim import build_optimizers
from poegpt.tokenizer import Tokenizer
from poegpt.train import TrainArgs, resume_args, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bundled sample mixture, tokenised at vocab 512 (the tiny preset's)."""
    from poegpt.data import load_mixture, read_documents
    root = tmp_path_factory.mktemp("sample")
    mixture = load_mixture("sample")
    texts = [d for s in mixture.sources for i, d in zip(range(40), read_documents(s))]
    tok = Tokenizer.train(texts, 512)
    prepare(mixture, tok, root / "data")
    tok.save(root / "data")
    return root / "data"


def tiny_args(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), preset="tiny", steps=6, batch_size=4, eval_every=3,
                eval_tokens=1024, save_every=3, progress=False, seed=0)
    base.update(kw)
    return TrainArgs(**base)


def metric_rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_loss_and_writes_artifacts(data_dir, tmp_path):
    last = train(tiny_args(data_dir, tmp_path / "run", steps=30, eval_every=15, save_every=15, tokens_per_step=512))
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 30
    assert sum(r["loss"] for r in rows[-5:]) / 5 < sum(r["loss"] for r in rows[:5]) / 5 - 0.5
    assert all(len(r["stage_ce"]) == 4 and all(math.isfinite(c) for c in r["stage_ce"]) for r in rows)
    assert rows[-1]["tokens"] == 30 * 512                       # 2 micro-batches of 4x64 per step
    assert len(last["val"]["bpb"]["stages"]) == 4
    assert (tmp_path / "run" / "bpb.png").stat().st_size > 1000
    assert [p.name for p in checkpoints_in(tmp_path / "run")] == ["step_000015", "step_000030"]


def test_resume_is_bit_exact(data_dir, tmp_path):
    train(tiny_args(data_dir, tmp_path / "straight"))
    train(tiny_args(data_dir, tmp_path / "chunked"), stop_at=3)
    assert [p.name for p in checkpoints_in(tmp_path / "chunked")] == ["step_000003"]
    train(resume_args(tmp_path / "chunked", progress=False), resume=True)
    a, b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "chunked")
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val") for r in a] == [r.get("val") for r in b]
    ma, _ = load_model(tmp_path / "straight")
    mb, _ = load_model(tmp_path / "chunked")
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_existing_run_needs_resume(data_dir, tmp_path):
    train(tiny_args(data_dir, tmp_path / "run", steps=3))
    with pytest.raises(PoEError, match="--resume"):
        train(tiny_args(data_dir, tmp_path / "run", steps=3))


def test_isolated_and_final_only_objectives_train(data_dir, tmp_path):
    for objective, grad in [("final_only", "through"), ("residual_logop", "isolated"), ("joint_logop", "through"),
                            ("independent", "through")]:
        last = train(tiny_args(data_dir, tmp_path / f"{objective}-{grad}", steps=3, objective=objective,
                               stage_grad=grad))
        assert math.isfinite(last["loss"])
        model, _ = load_model(tmp_path / f"{objective}-{grad}")
        assert model.config.objective == objective and model.config.stage_grad == grad


def test_bf16_autocast_training_path(data_dir, tmp_path):
    """The GPU recipe's bf16 autocast path, exercised on CPU: finite losses, fp32 master weights."""
    last = train(tiny_args(data_dir, tmp_path / "bf16", steps=3, dtype="bf16"))
    assert math.isfinite(last["loss"]) and math.isfinite(last["val"]["bpb"]["full"])
    model, _ = load_model(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_checkpoint_round_trip_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = PoEGPT(PoEConfig.from_preset("tiny"))
    opts = build_optimizers(model)
    x = torch.randint(0, 512, (2, 16))
    loss, _ = model_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    for o in opts:
        o.step()
    save_checkpoint(tmp_path / "ck", model, meta={"step": 1}, optimizers=opts)
    loaded, tok = load_model(tmp_path / "ck")
    assert tok is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    model2 = PoEGPT(PoEConfig.from_preset("tiny"))
    opts2 = build_optimizers(model2)
    load_training_state(tmp_path / "ck", model2, opts2)
    for o1, o2 in zip(opts, opts2):
        s1, s2 = o1.state_dict(), o2.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for pid in s1["state"]:
            for key, val in s1["state"][pid].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(s2["state"][pid][key]))
    # saving again over the same path replaces it atomically
    save_checkpoint(tmp_path / "ck", model, meta={"step": 2})
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".old"))]


def test_bad_checkpoints_fail_clearly(tmp_path):
    model = PoEGPT(PoEConfig.from_preset("tiny"))
    save_checkpoint(tmp_path / "ck", model, meta={"step": 0})
    with pytest.raises(PoEError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(PoEError, match="no checkpoint"):
        load_model(tmp_path)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "n_embd": 128, "head_dim": 32}))
    with pytest.raises(PoEError, match="does not match its config"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(PoEError, match="not valid JSON"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(PoEError, match="safetensors"):
        load_model(tmp_path / "ck")


def test_sigkill_during_training_never_corrupts_the_newest_checkpoint(data_dir, tmp_path):
    """Kill the trainer at random moments (it saves every step) and load the newest checkpoint each time."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "poegpt.cli", "train", "--data", str(data_dir), "--out", str(run), "--preset",
           "tiny", "--batch-size", "2", "--steps", "100000", "--save-every", "1", "--keep", "3",
           "--eval-every", "100000", "--quiet", "--resume"]
    rng = random.Random(0)
    steps_seen = []
    for _ in range(6):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
        deadline = time.time() + 60
        start = checkpoints_in(run)[-1].name if checkpoints_in(run) else None
        while time.time() < deadline and proc.poll() is None:  # wait until it is saving new checkpoints
            ck = checkpoints_in(run)
            if ck and ck[-1].name != start:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        newest = resolve_checkpoint(run)
        model, tok = load_model(newest)                   # loads: weights, config, tokenizer intact
        assert tok is not None and model.config.n_stages == 4
        opts = build_optimizers(model)
        meta = load_training_state(newest, model, opts)
        steps_seen.append(meta["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]


def test_stream_metrics_match_hand_computation(data_dir):
    torch.manual_seed(0)
    model = PoEGPT(PoEConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = Tokenizer.load(data_dir)
    token_bytes = torch.tensor(tok.token_byte_lengths())
    loader = TokenLoader(data_dir, "val", 2, 64, case_aug_p=0.0)
    batches = list(loader.iter_batches(2))
    m = stream_metrics(model, batches, token_bytes, alpha=1.0, chunk=37)
    # by hand: per-stage softmaxes, geometric mean renormalised, bits over UTF-8 bytes of non-special targets
    nats = torch.zeros(4, dtype=torch.float64)
    nats_full = nats_ent = 0.0
    n_bytes = correct = 0
    for x, y in batches:
        with torch.no_grad():
            logps = [F.log_softmax(model.forward_stage(x, k).double(), -1) for k in range(4)]
        full = torch.log_softmax(sum(logps) / 4, -1)
        H = torch.stack([-(lp.exp() * lp).sum(-1) for lp in logps])
        w = torch.softmax(-H, 0)
        ent = torch.log_softmax(sum(w[k, ..., None] * logps[k] for k in range(4)), -1)
        for b in range(x.size(0)):
            for t in range(x.size(1)):
                target = y[b, t].item()
                nb = len(tok.token_bytes(target)) if not tok.is_special(target) else 0
                if nb == 0:
                    continue
                n_bytes += nb
                for k in range(4):
                    nats[k] -= logps[k][b, t, target]
                nats_full -= full[b, t, target].item()
                nats_ent -= ent[b, t, target].item()
                correct += int(full[b, t].argmax().item() == target)
    bits = 1 / math.log(2) / n_bytes
    assert m["bytes"] == n_bytes
    assert m["bpb"]["full"] == pytest.approx(nats_full * bits, rel=1e-5)
    assert m["bpb"]["prefix"][-1] == pytest.approx(nats_full * bits, rel=1e-5)
    assert m["bpb"]["entropy_weighted"] == pytest.approx(nats_ent * bits, rel=1e-5)
    assert m["bpb"]["stages"] == pytest.approx((nats * bits).tolist(), rel=1e-5)
    assert m["accuracy"]["full"] == pytest.approx(correct / m["tokens"])
    agree = torch.tensor(m["agreement"])
    assert torch.allclose(agree.diagonal(), torch.ones(4, dtype=agree.dtype)) and torch.equal(agree, agree.T)


def test_prompt_ranks_and_report(data_dir, tmp_path):
    model, _ = PoEGPT(PoEConfig.from_preset("tiny")).eval(), None
    tok = Tokenizer.load(data_dir)
    ranks = prompt_target_ranks(model, tok, [("The capital of France is", " Paris"), ("대한민국의 수도는", " 서울")])
    assert ranks["wins"] + ranks["ties"] + ranks["losses"] == 2
    for row in ranks["prompts"]:
        ids = torch.tensor([tok.encode(row["prompt"])])
        t = tok.encode(row["target"], add_special_tokens=False)[0]
        full = model(ids)[0, -1]
        assert row["rank_full"] == int((full > full[t]).sum()) + 1
    loader = TokenLoader(data_dir, "val", 2, 64, case_aug_p=0.0)
    metrics = stream_metrics(model, loader.iter_batches(1), torch.tensor(tok.token_byte_lengths()))
    out = write_report({"metrics": metrics, "prompt_ranks": ranks}, tmp_path / "eval")
    assert {p.name for p in out.iterdir()} >= {"report.json", "metrics.csv", "stage_bpb.png", "agreement.png",
                                               "prompt_ranks.csv"}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "poegpt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_cli_end_to_end(data_dir, tmp_path):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "4",
                "--batch-size", "2", "--eval-every", "4", "--eval-tokens", "256", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "val BPB full" in r.stdout
    r = run_cli("eval", "--model", str(tmp_path / "run"), "--data", str(data_dir), "--tokens", "256",
                "--batch-size", "2", "--prompts", str(REPO / "poegpt/assets/prompts.jsonl"), "--out",
                str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    assert "full/geomean BPB" in r.stdout and (tmp_path / "eval" / "report.json").exists()
    r = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr
    fast = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "5",
                   "--compile")                                  # the compiled fast path: the same text in fp32
    assert fast.returncode == 0 and fast.stdout == r.stdout, fast.stderr
    r = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "x", "--mode", "wand")
    assert r.returncode == 2 and "calibrate" in r.stderr
    r = run_cli("calibrate", "--model", str(tmp_path / "run"), "--data", str(data_dir), "--tokens", "256",
                "--batch-size", "2")
    assert r.returncode == 0 and "WAND p99 bounds" in r.stdout, r.stderr
    meta = json.loads((resolve_checkpoint(tmp_path / "run") / "meta.json").read_text())
    assert len(meta["calibration"]["wand_p99_bounds"]) == 3
    r = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "대한민국", "--mode", "all",
                "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    for label in ("full", "prefix 2", "stage 0", "composition", "speculative", "wand safety 1"):
        assert label in r.stdout
    r = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "Hi", "--mode", "speculative",
                "--k-draft", "0")
    assert r.returncode == 2 and "--k-draft" in r.stderr
    r = run_cli("info", "--model", str(tmp_path / "run"))
    assert r.returncode == 0 and "parameters:" in r.stdout
    # pack: the slim bf16 inference checkpoint keeps weights (rounded), tokenizer and calibration only
    r = run_cli("pack", str(tmp_path / "run"), str(tmp_path / "packed"))
    assert r.returncode == 0 and "bf16" in r.stdout, r.stderr
    packed = tmp_path / "packed"
    assert sorted(f.name for f in packed.iterdir()) == ["config.json", "meta.json", "model.safetensors",
                                                        "tokenizer_bpe.json"]
    m_full, tok_full = load_model(tmp_path / "run")
    m_packed, tok_packed = load_model(packed)
    for (n, a), (_, b) in zip(m_full.state_dict().items(), m_packed.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), n
    assert tok_packed.encode("대한민국 hello") == tok_full.encode("대한민국 hello")
    meta = json.loads((packed / "meta.json").read_text())
    assert meta["calibration"]["wand_p99_bounds"] and meta["step"] == 4 and "data_state" not in meta
    r = run_cli("generate", "--model", str(packed), "--prompt", "x", "--mode", "wand", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, message", [
    (["info", "--preset", "huge"], "unknown preset"),
    (["train", "--data", "/nonexistent", "--out", "/tmp/x", "--steps", "1"], "error"),
    (["eval", "--model", "/nonexistent", "--data", "/nonexistent"], "does not exist"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "does not exist"),
])
def test_cli_bad_input_is_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poegpt: error:") and message in lines[0], r.stderr


def test_cli_bad_objective_and_layout(data_dir, tmp_path):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--objective", "nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    cfg = PoEConfig.from_preset("tiny").to_dict()
    cfg["stage_layout"] = [4, 2, 1]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "meta.json").write_text("{}")
    r = run_cli("info", "--model", str(bad))
    assert r.returncode == 2 and "stage_layout" in r.stderr and len(r.stderr.strip().splitlines()) == 1
