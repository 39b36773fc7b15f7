"""The shipped demo model: what the package promises about it, checked on the real weights."""

import json
import math

import pytest
import torch

from poegpt.checkpoint import DEMO_MODEL_DIR, MODEL_FILE, load_model
from poegpt.config import PoEConfig

PROMPTS = ["The capital of France is", "대한민국의 수도는", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def demo():
    return load_model(None)  # no path: the shipped model


def test_demo_is_the_default_and_matches_its_preset(demo):
    model, tok = demo
    cfg = model.config
    assert cfg == PoEConfig.load(DEMO_MODEL_DIR)
    preset = PoEConfig.from_preset("demo", vocab_size=cfg.vocab_size)
    assert (cfg.n_layer, cfg.stage_layout, cfg.window_pattern, cfg.head_dim) == \
        (preset.n_layer, preset.stage_layout, preset.window_pattern, preset.head_dim)
    assert cfg.head_dim in (64, 128) and cfg.n_kv_head < cfg.n_head        # vLLM CPU attention, GQA
    assert tok is not None and tok.vocab_size == cfg.vocab_size
    assert (DEMO_MODEL_DIR / MODEL_FILE).stat().st_size <= 60 * 2**20


def test_demo_ships_calibration_and_its_eval_report(demo):
    model, _ = demo
    cal = model.checkpoint_meta["calibration"]
    assert len(cal["wand_p99_bounds"]) == model.config.n_stages - 1
    assert all(math.isfinite(b) and b > 0 for b in cal["wand_p99_bounds"])
    # the planner's prior per draft stage: a deeper prefix agrees with full PoE more often
    agree = [model.calibration.draft_agreement(d, -1.0) for d in range(model.config.n_stages - 1)]
    assert all(0.5 < a < 1 for a in agree) and agree == sorted(agree)
    report = json.loads((DEMO_MODEL_DIR / "eval" / "report.json").read_text())
    bpb = report["metrics"]["bpb"]
    # the card's headline property holds for the shipped weights: the product beats every expert
    assert bpb["full"] < min(bpb["stages"])
    assert bpb["prefix"][-1] == pytest.approx(bpb["full"])
    for plot in ("stage_bpb.png", "agreement.png"):
        assert (DEMO_MODEL_DIR / "eval" / plot).stat().st_size > 0


def test_demo_wand_with_infinite_bounds_reproduces_full_greedy(demo):
    # (speculative == full greedy on these weights: tests/test_engine.py, which="demo")
    model, tok = demo
    inf = [float("inf")] * (model.config.n_stages - 1)
    for p in PROMPTS:
        row = tok.encode(p)
        assert torch.equal(model.generate_wand([row], max_new_tokens=12, p99_bounds=inf),
                           model.generate([row], max_new_tokens=12))


def test_demo_wand_at_safety_1_agrees_with_full_greedy_batched(demo):
    """The shipped calibration at safety 1: a batch's tokens agree with full greedy on >= 99 % of
    positions, and equal each row's alone, on the lazy and the deep path."""
    from poegpt.engine import Generation
    from poegpt.modes import ModeSpec, run_mode
    from poegpt.wand import wand_steps
    model, tok = demo
    rows = [tok.encode(p) for p in PROMPTS]
    full = run_mode(model, rows, ModeSpec("full"), 24).tokens
    bounds = model.calibration.wand_p99_bounds
    for path in ("lazy", "deep"):
        gen = Generation([])
        list(wand_steps(model, rows, 24, 1.0, bounds, None, gen, path=path))
        same = sum(a == b for w, f in zip(gen.tokens, full) for a, b in zip(w, f))
        assert same >= 0.99 * sum(map(len, full)), path
        assert min(s for st in gen.stages_used for s in st) < model.config.n_stages - 1     # it does exit early
        alone = Generation([])
        list(wand_steps(model, rows[1:2], 24, 1.0, bounds, None, alone, path=path))
        assert alone.tokens[0] == gen.tokens[1]


def test_demo_is_a_model_name_for_every_command(tmp_path, monkeypatch):
    """`demo` names the shipped model wherever a checkpoint is taken (export-hf included), unless a folder
    called demo exists where the command runs."""
    from poegpt.checkpoint import resolve_checkpoint
    from poegpt.cli import main
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("demo") == DEMO_MODEL_DIR
    assert not main(["export-hf", "demo", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    (tmp_path / "demo").mkdir()
    with pytest.raises(Exception, match="holds no checkpoint"):
        resolve_checkpoint("demo")
