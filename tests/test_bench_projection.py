"""bench/projection.py: the projection's formulas on numbers worked by hand, its passes on the tiny config,
and its acceptance and WAND-exit statistics against what poegpt's speculative and WAND modes do."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import projection as pj  # noqa: E402

from conftest import build_random_model  # noqa: E402


def test_tokens_per_cycle():
    assert pj.tau(0.5, 1) == pytest.approx(1.5)                 # 1 + 0.5
    assert pj.tau(0.5, 3) == pytest.approx(1.875)               # 1 + 0.5 + 0.25 + 0.125
    assert pj.tau(0.0, 4) == 1.0                                # the verifier's own token only
    assert pj.tau(1.0, 4) == 5.0                                # every draft accepted
    assert pj.tau(0.9, 2) == pytest.approx(1 + 0.9 + 0.81)


def test_cycle_cost_and_speedup():
    assert pj.cycle_cost(1.0, 3.0, 3) == 7.0                   # 4 draft passes + 1 verify
    # tau(0.5, 3) = 1.875 tokens per 7 s, against one token per 4 s
    assert pj.speculative_speedup(0.5, 3, 1.0, 3.0, 4.0) == pytest.approx(1.875 * 4 / 7)
    # k = 1, draft 1, verify 1, full 2: speed-up (1 + a) * 2 / 3 is 1 at a = 0.5
    assert pj.break_even_alpha(1, 1.0, 1.0, 2.0) == pytest.approx(0.5, abs=1e-9)
    assert pj.break_even_alpha(1, 2.0, 2.0, 1.0) is None       # at most (1 + 1) * 1 / 6
    assert pj.break_even_alpha(1, 0.1, 0.1, 1.0) == 0.0        # 1 / 0.3 > 1 with nothing accepted


def test_wand_expected_cost():
    reach = pj.reach_probabilities([0, 1, 1, 3], 4)
    assert reach == [1.0, 0.75, 0.25, 0.25]
    assert pj.wand_expected_cost(reach, [4.0, 2.0, 1.0, 1.0]) == pytest.approx(4 + 1.5 + 0.25 + 0.25)


def test_lazy_passes_carry_the_pending_positions():
    # position 0 runs stages 0-1; 1 and 2 stage 0; 3 goes to stage 2, filling 1-2 at stage 1 and 0-2 at stage 2
    passes = pj.lazy_passes([1, 0, 0, 2], 3)
    assert passes == [(0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 3), (2, 4)]
    assert pj.suffix_depth([1, 0, 0, 2]) == [2, 2, 2, 2]
    assert pj.suffix_depth([0, 2, 1, 0]) == [2, 2, 1, 0]
    assert pj.interpolate({1: 10.0, 4: 16.0}, 2) == pytest.approx(12.0)
    assert pj.interpolate({1: 10.0, 4: 16.0}, 8) == pytest.approx(24.0)    # extended beyond the last point
    costs = [{1: 1.0}, {1: 2.0, 4: 5.0}, {1: 3.0, 4: 6.0}]
    # stage 0: 4 passes of 1; stage 1: T = 1 (2.0) and T = 3 (4.0, interpolated); stage 2: T = 4 (6.0)
    assert pj.lazy_cost(passes, costs) == pytest.approx(4 + 2 + 4 + 6)


def test_replayed_cycles():
    agree = [False, True, False, True, True, True]
    # k = 2: the prefill commits token 0 (agree[0] is not read), cycle 1 accepts 1 (commits 2), cycle 2
    # accepts 2 (commits 3): 5 tokens in 3 passes, 3 of 4 drafts accepted
    r = pj.replay_speculative(agree, 2, 5)
    assert (r["cycles"], r["tau"], r["acceptance"]) == (3, 5 / 3, 0.75)
    assert pj.replay_speculative([False] * 4, 3, 1)["cycles"] == 1          # one token: the prefill's


def test_regime():
    assert pj.regime(1e9, 0, 0.2, 10.0, 100.0) == "bandwidth"  # 0.1 s of streaming in 0.2 s
    assert pj.regime(1e9, 0, 0.3, 10.0, 100.0) == "overhead"   # 0.1 s of 0.3 s
    assert pj.regime(1e6, 1e11, 1.5, 10.0, 100.0) == "compute"  # 1 s of GEMM in 1.5 s


def test_passes_on_the_tiny_config():
    model = build_random_model()
    K = model.config.n_stages
    logs = []
    with torch.no_grad():
        costs = pj.measure_costs(model, [1, 2], (1, 2), (1, 2), 8, 1, None, 10.0, 5.0, 50.0, logs.append)
    assert set(costs) == {1, 2} and "wand_stage" in costs[1] and "wand_stage" not in costs[2]
    assert set(costs[2]["draft"]) == set(range(K - 1)) and set(costs[2]["verify"][0]) == {1, 2}
    full, draft0 = costs[1]["full"], costs[1]["draft"][0]
    assert full["s"] > 0 and full["regime"] in ("overhead", "bandwidth", "compute")
    # the full step reads every layer and K heads; draft 0 stage 0's layers and one head
    V, d = model.config.padded_vocab_size, model.config.n_embd
    assert full["weight_bytes"] == (pj.layer_params(model, 0, K) + K * V * d) * 4
    assert draft0["weight_bytes"] == (pj.layer_params(model, 0, 1) + V * d) * 4
    assert pj.layer_params(model, 0, 1) + pj.layer_params(model, 1, K) == pj.layer_params(model, 0, K)
    p = pj.Passes(model, 2, 8, 3, None)
    with torch.no_grad():
        logp, agree, m, last = p.verify(0, 2)()
    assert logp.shape == (2, 3, model.config.vocab_size) and p.cache.lengths == (8, 8)
    assert agree.shape == (K - 1,) and int(agree.max()) <= 2 * 3 and m.shape == last.shape == (2,)
    # verify d reads the layers past stage d and the heads d+1..K-1 (the drafts ran heads 0..d)
    assert costs[1]["verify"][0][2]["weight_bytes"] == (pj.layer_params(model, 1, K) + (K - 1) * V * d) * 4
    spec = pj.project_speculative(costs, {d: 0.5 for d in range(K - 1)}, (1, 2), K,
                                  {(d, k): {"tau": 1.0} for d in range(K - 1) for k in (1, 2)})
    r = spec[1]["rows"][0]
    c = costs[1]
    assert r["speedup"] == pytest.approx(1.5 * c["full"]["s"] / (2 * c["draft"][0]["s"] + c["verify"][0][1]["s"]))


def test_statistics_match_the_modes_on_the_demo_model():
    """alpha and the WAND exits come from one teacher-forced pass; replayed on the generated sequence they
    give what the speculative and WAND modes report (fp32)."""
    from poegpt import load
    from poegpt.modes import ModeSpec, run_mode
    model, tok = load("demo", dtype="fp32")
    prompts, n, k = ["The capital of France is", "def fibonacci(n):"], 8, 3
    acc = pj.acceptance(model, tok, prompts, n, k - 1)
    assert acc["teacher_forced_equals_generated"] == 1.0
    assert sum(acc["exit_histogram"]) == n * len(prompts) and acc["wand_token_equals_full"] == 1.0
    for r, prompt in zip(acc["rows"], prompts):
        ids = tok.encode(prompt)
        wand = run_mode(model, [ids], ModeSpec("wand"), n)
        assert wand.stages_used[0] == r["exits"][:n] and wand.tokens[0] == r["tokens"][:n]
        for d in range(model.config.n_stages - 1):
            gen = run_mode(model, [ids], ModeSpec("speculative", draft_stage=d, k_draft=k, fallback="never"), n)
            replay = pj.replay_speculative(r["agree"][d], k, n)
            assert (gen.passes, gen.accepted, gen.drafted) == (replay["cycles"], replay["accepted"], replay["drafted"])
