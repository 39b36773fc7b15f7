"""The engine and the six modes: equivalences (cache vs no cache, batch vs alone, speculative vs full,
WAND vs full, composition vs Log-OP of forward_stage), exact speculative sampling, layer counts,
streaming text and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from poegpt import PoEConfig, PoEError
from poegpt.engine import Generation, Sampling, StageMix
from poegpt.textstream import stream_text
from poegpt.logop import logop
from poegpt.cache import KVCache
from poegpt.modes import ModeSpec, mode_steps, run_mode
from poegpt.speculative import generate_speculative
from poegpt.wand import wand_steps

from conftest import build_random_model

K = 4


@pytest.fixture(scope="module")
def model():
    return build_random_model(seed=5)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A tiny model trained for a few dozen steps on the bundled sample (peaked, realistic distributions)."""
    from poegpt.checkpoint import load_model
    from poegpt.data import load_mixture, prepare, read_documents
    from poegpt.tokenizer import Tokenizer
    from poegpt.train import TrainArgs, train
    root = tmp_path_factory.mktemp("engine")
    mixture = load_mixture("sample")
    tok = Tokenizer.train([d for s in mixture.sources for _, d in zip(range(40), read_documents(s))], 512)
    prepare(mixture, tok, root / "data")
    tok.save(root / "data")
    train(TrainArgs(data=str(root / "data"), out=str(root / "run"), preset="tiny", steps=40, batch_size=8,
                    eval_every=1000, save_every=40, progress=False))
    m, tok = load_model(root / "run")
    return m, tok


def prompts(n=3, seed=0, lengths=(5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def nocache_greedy(model, prompt, mix: StageMix, n):
    """Reference: re-run the whole sequence without a cache at every step, take the mix's argmax."""
    seq = list(prompt)
    for _ in range(n):
        logps = model.stage_logprobs(torch.tensor([seq]), mix.depth)
        lp = logop([logps[k][0, -1] for k in mix.stages], mix.weights)
        seq.append(int(lp.argmax()))
    return seq[len(prompt):]


MIXES = [StageMix.full(K), StageMix.prefix(K, 1), StageMix.prefix(K, 3), StageMix.single(K, 2),
         StageMix.composition(K, [0, 2, 3], [0.5, 1.0, 1.0])]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"{m.stages}-{m.weights}")
def test_static_modes_cached_equal_nocache_and_batch_equals_alone(model, mix):
    rows = prompts(3)
    spec_tokens, _ = None, None
    steps, gen = mode_steps(model, rows, ModeSpec("composition", stages=mix.stages, stage_weights=mix.weights),
                            12)
    list(steps)
    for r, row in enumerate(rows):
        assert gen.tokens[r] == nocache_greedy(model, row, mix, 12)


def test_prefix_all_stages_equals_full_and_composition_is_logop_of_forward_stage(model):
    ids = torch.tensor(prompts(2, lengths=(6,)))
    torch.testing.assert_close(model.generate_prefix(ids, max_stages=K, max_new_tokens=8),
                               model.generate(ids, max_new_tokens=8), rtol=0, atol=0)
    stages, weights = [0, 2, 3], [0.5, 1.0, 1.0]
    want = logop([F.log_softmax(model.forward_stage(ids, k), -1) for k in stages], weights)
    mix = StageMix.composition(K, stages, weights)
    got = mix.logprobs(model, model.trunk(ids, mix.depth))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    out = model.generate_parallel_composition(ids, stages, weights, max_new_tokens=1)
    assert out[:, -1].tolist() == want[:, -1].argmax(-1).tolist()


def count_layers(model, fn):
    calls = []
    handles = [b.register_forward_hook(lambda m, i, o, n=n: calls.append((n, i[0].size(1))))
               for n, b in enumerate(model.blocks)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("spec, layers", [
    (ModeSpec("full"), 8), (ModeSpec("prefix", max_stages=1), 4), (ModeSpec("prefix", max_stages=2), 6),
    (ModeSpec("stage", stage=2), 7), (ModeSpec("composition", stages=(0, 1)), 6),
])
def test_modes_run_only_the_layers_they_need(model, spec, layers):
    rows = prompts(1, lengths=(4,))
    calls = count_layers(model, lambda: list(mode_steps(model, rows, spec, 5)[0]))
    decode = [n for n, T in calls if T == 1]                   # one-token decode steps after the prefill
    assert sorted(set(n for n, _ in calls)) == list(range(layers))
    assert len(decode) == 4 * layers                          # 4 decode steps (the 5th token needs none)


@pytest.fixture(scope="module")
def demo_model():
    """The shipped demo model (poegpt/assets/demo)."""
    from poegpt.checkpoint import load_model
    return load_model(None)


@pytest.mark.parametrize("which", ["random", "trained", "demo"])
def test_speculative_greedy_is_identical_to_full_greedy(model, request, which):
    if which == "random":
        m, rows = model, prompts(3, seed=2)
    else:
        m, tok = request.getfixturevalue(f"{which}_model")
        rows = [tok.encode(t) for t in ["The capital of France is", "대한민국의 수도는", "def f(x):"]]
    for B in (1, 3):
        ids = rows[:B]
        full = m.generate(ids, max_new_tokens=16)
        for d in range(K - 1):
            for k in (1, 2, 3, 5, "auto"):
                out, acc = m.generate_speculative(ids, draft_stage=d, k_draft=k, max_new_tokens=16,
                                                  return_acceptance=True, fallback="never")
                assert torch.equal(out, full), (B, d, k)
                assert 0.0 <= acc <= 1.0
        # the planner's choice (draft stage, length, or plain steps) never changes the tokens
        assert torch.equal(m.generate_speculative(ids, draft_stage="auto", k_draft="auto", max_new_tokens=16), full)
    if which != "random":    # a trained draft agrees with the verifier well above chance
        _, acc = m.generate_speculative(rows[:1], draft_stage=2, k_draft=3, max_new_tokens=24, return_acceptance=True,
                                        fallback="never")
        assert acc > 0.3


def test_speculative_greedy_is_identical_to_full_greedy_in_bf16():
    """In bf16 SDPA's sums round differently over a different number of keys: a verify pass that let
    its k+1 positions attend over one key count diverged from full greedy (demo model, this prompt,
    token 10) until each position attended as its plain step does (the cache's `stepwise`)."""
    from poegpt.checkpoint import load_model
    m, tok = load_model(None, dtype=torch.bfloat16)
    ids = [tok.encode("東京は日本の")]
    full = m.generate(ids, max_new_tokens=48)
    for d in range(K - 1):
        assert torch.equal(m.generate_speculative(ids, draft_stage=d, k_draft=3, max_new_tokens=48,
                                                  fallback="never"), full), d


@pytest.mark.parametrize("B", [1, 3])
def test_dense_verified_speculative_greedy_equals_dense_greedy(model, B):
    """verifier="dense": the last stage alone verifies, so the output is stage K-1's greedy exactly,
    for every draft stage and draft length, alone and in a ragged batch."""
    rows = prompts(3, seed=4)[:B]
    dense = model.generate_stage(rows, K - 1, max_new_tokens=16)
    assert not torch.equal(dense, model.generate(rows, max_new_tokens=16))     # a different target than full PoE
    for d in range(K - 1):
        for k in (1, 3, "auto"):
            out, acc = model.generate_speculative(rows, draft_stage=d, k_draft=k, max_new_tokens=16,
                                                  verifier="dense", return_acceptance=True, fallback="never")
            assert torch.equal(out, dense), (B, d, k)
            assert 0.0 <= acc <= 1.0


def planted_costs(model, plain: float, draft: float, verify: float, B: int = 1):
    """The eager cost record of `model` at batch B with every pass's time planted (smaller than any measured,
    so the planted ones stay the best seen)."""
    from poegpt.speculative import AUTO_DRAFTS, pass_costs
    costs = pass_costs(model, (False, B, "poe", torch.float32))
    costs.seconds = {("plain",): plain, ("step",): plain, **{("draft", d): draft for d in range(K - 1)},
                     **{("verify", d, k): verify for d in range(K - 1) for k in AUTO_DRAFTS + (3,)}}
    costs.agree.clear()
    return costs


def test_planner_picks_the_plan_of_highest_expected_tokens_per_second(model):
    """The cost model by hand: tau(alpha, k) / ((k+1) c_draft + c_verify) against (1 + margin) / c_plain."""
    from poegpt.speculative import AUTO_DRAFTS, PassCosts, Planner, expected_tokens
    costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, **{("draft", d): 0.05 * (d + 1) for d in range(K - 1)},
                               **{("verify", d, k): 0.6 + 0.02 * k for d in range(K - 1) for k in AUTO_DRAFTS}})
    costs.agree = {0: [50, 100], 1: [80, 100], 2: [95, 100]}
    plan = Planner(model, costs, "auto", "auto", adapt=True)
    rate = {(d, k): expected_tokens(plan.alpha(d), k) / ((k + 1) * 0.05 * (d + 1) + 0.6 + 0.02 * k)
            for d in range(K - 1) for k in AUTO_DRAFTS}
    assert plan.choose(100) == max(rate, key=rate.get) and max(rate.values()) > 1.0
    assert plan.choose(2) == max((dk for dk in rate if dk[1] <= 2), key=rate.get)     # k fits the cache
    assert Planner(model, costs, 1, 3, adapt=True).choose(100) == (1, 3)             # fixed: drafting pays
    costs.seconds[("step",)] = 0.2                                                   # now a plain step wins
    assert Planner(model, costs, "auto", "auto", adapt=True).choose(100)[1] == 0
    assert Planner(model, costs, 1, 3, adapt=False).choose(100) == (1, 3)            # fallback never: it drafts
    costs.seconds[("cycle", 1, 3)] = 0.01                                            # a timed whole cycle counts
    assert Planner(model, costs, 1, 3, adapt=True).choose(100) == (1, 3)
    fresh = Planner(model, PassCosts(), "auto", "auto", adapt=True)
    assert fresh.choose(100)[1] == 0                                                 # the yardstick is timed first


def test_planner_believes_the_tokens_cycles_yielded_over_tau(model):
    """Acceptance is bursty: when cycles of (1, 3) emitted one token per row where tau promised ~3.8,
    the planner steps plainly, for that k and (scaled by the same broken promise) for a k never run."""
    from poegpt.speculative import PassCosts, Planner, expected_tokens
    costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, **{("draft", d): 0.05 * (d + 1) for d in range(K - 1)},
                               **{("verify", d, k): 0.6 + 0.02 * k for d in range(K - 1) for k in (3, 6)}})
    costs.agree = {d: [95, 100] for d in range(K - 1)}
    assert Planner(model, costs, 1, 3, adapt=True).choose(100) == (1, 3)             # tau says drafting pays
    for _ in range(10):
        costs.note_yield(1, 3, 1.0, expected_tokens(0.95, 3))
    assert Planner(model, costs, 1, 3, adapt=True).choose(100)[1] == 0
    assert Planner(model, costs, 1, 6, adapt=True).choose(100)[1] == 0
    assert Planner(model, costs, 1, 3, adapt=False).choose(100) == (1, 3)            # fallback never: it drafts


def test_planner_scale_is_not_moved_by_one_odd_pass(model):
    """Untimed passes are guessed from their weight share times how the timed ones compare with theirs:
    the median over the timed passes, so one pass timed while it stalled does not move every guess."""
    from poegpt.speculative import PassCosts, Planner, weight_shares
    shares = weight_shares(model)
    c = {("plain",): 1.0, ("step",): 1.0, **{("draft", d): 2 * shares[("draft", d)] for d in range(K - 1)},
         ("verify", 0, 3): 2 * shares[("verify", 0)], ("verify", 0, 2): 60 * shares[("verify", 0)]}
    assert Planner(model, PassCosts(seconds=c), "auto", "auto", adapt=True).scale() == pytest.approx(2.0)


def test_planner_probes_only_a_shape_that_could_pay(model):
    """After a run of plain steps the planner probes a cycle so that the acceptance can recover, but
    never one that would not beat plain steps by the margin even if half the drafts now rejected were
    accepted (the running acceptance ~0.9: 3.7 tokens per (1, 3) cycle at 0.95, at most 4 at 1.0)."""
    from poegpt.speculative import PROBE_EVERY, PassCosts, Planner
    for cycle, probed in ((4.5, False), (3.75, False), (3.0, True)):
        costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, ("draft", 1): 0.5, ("verify", 1, 3): 1.0,
                                   ("cycle", 1, 3): cycle})
        costs.agree = {1: [95, 100]}
        costs.yields[(1, 3)] = [10.0, 10.0]                  # its cycles emitted one token per row
        plan = Planner(model, costs, 1, 3, adapt=True)
        plan.priors = [0.6] * len(plan.priors)               # the prior, not this model's calibration
        plans = [plan.choose(100) for _ in range(2 * PROBE_EVERY)]
        assert ((1, 3) in plans) == probed, cycle


def test_planner_probes_a_shape_that_could_pay_not_only_shapes_that_ran(model):
    """A fresh demo process probed k = 1 first, which could never pay (2 tokens in more than 2 steps'
    time); once it had run it was the only shape probed, so the acceptance stayed the prior's and
    the generation stayed plain. The probe takes any shape whose passes are timed and that could pay."""
    from poegpt.speculative import PROBE_EVERY, PassCosts, Planner
    costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, ("draft", 0): 0.3, ("verify", 0, 1): 1.4,
                               ("verify", 0, 3): 1.0, ("cycle", 0, 1): 2.1})
    costs.agree = {0: [60, 100]}                         # tau(0.6, 3) = 2.2 tokens in 2.2 steps: plain
    plan = Planner(model, costs, 0, "auto", adapt=True)
    plan.priors = [0.6] * len(plan.priors)               # the prior, not this model's calibration
    plans = [plan.choose(100) for _ in range(2 * PROBE_EVERY)]
    assert plans[0] == (0, 0) and (0, 3) in plans and (0, 1) not in plans
    costs.agree = {}                                     # no verify measured any: a probe at once
    plan = Planner(model, costs, 0, "auto", adapt=True)
    plan.priors = [0.6] * len(plan.priors)
    assert plan.choose(100) == (0, 3)


def test_planner_hopes_for_every_draft_only_while_a_stage_is_unmeasured(model):
    """A probe may hope for full acceptance while no verify has measured the stage; with measured
    positions the hope narrows to half of today's rejections accepted."""
    from poegpt.speculative import PassCosts, Planner
    costs = PassCosts()
    plan = Planner(model, costs, 0, 3, adapt=True)
    assert plan.hopeful(0) == 1.0
    costs.agree = {0: [80_000, 100_000]}
    assert plan.hopeful(0) == pytest.approx(1 - (1 - plan.alpha(0)) / 2, abs=1e-4) and plan.alpha(0) < 0.81


def test_a_paying_plan_tries_the_next_longer_draft_until_it_is_timed(model):
    """tau under-promises long drafts on bursty text: while cycles of (0, 3) pay, one cycle in RETIME
    tries k = 4 (its passes timed, its cycle not), and stops once (0, 4)'s cycles are timed."""
    from poegpt.speculative import AUTO_DRAFTS, RETIME, PassCosts, Planner
    costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, ("draft", 0): 0.05, ("cycle", 0, 3): 0.5,
                               **{("verify", 0, k): 0.3 if k in (3, 4) else 10.0 for k in AUTO_DRAFTS}})
    costs.agree = {0: [95, 100]}
    plan = Planner(model, costs, 0, "auto", adapt=True)
    plans = [plan.choose(100) for _ in range(RETIME - 1)]
    assert plans.count((0, 4)) == 1 and plans.count((0, 3)) == RETIME - 2
    costs.seconds[("cycle", 0, 4)] = 5.0                 # timed, and it does not pay
    costs.since_step = 0
    assert all(plan.choose(100) == (0, 3) for _ in range(RETIME - 1))


def test_an_untried_shape_needs_the_exploration_margin_only_where_it_compiles(model):
    """On the fast path an untried (d, k) must promise 25 % (its first call compiles); eager, where
    nothing compiles, the plain margin: a cycle guessed 10 % faster than plain steps runs eager only."""
    from poegpt.speculative import PassCosts, Planner
    plans = {}
    for compiles in (True, False):
        costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, ("draft", 0): 0.5, ("verify", 0, 3): 0.8},
                          compiles=compiles)
        costs.agree = {0: [10_000, 10_000]}              # every draft accepted: tau = 4 tokens per 2.8 steps
        costs.realism = [3.08, 4.0]                      # cycles kept 77 % of tau's promise: 1.1x a plain step
        plan = Planner(model, costs, 0, 3, adapt=True)
        plans[compiles] = plan.choose(100)
    assert plans == {True: (0, 0), False: (0, 3)}


def test_planner_retimes_the_yardstick_every_RETIME_cycles_across_generations(model):
    """While cycles pay, every RETIME cycles (counted over generations: a short one never reaches it)
    the plan holds two plain steps, so that the plain step is timed as recently as the cycles."""
    from poegpt.speculative import RETIME, PassCosts, Planner
    costs = PassCosts(seconds={("plain",): 1.0, ("step",): 1.0, ("draft", 0): 0.05, ("verify", 0, 3): 0.3,
                               ("cycle", 0, 3): 0.5})
    costs.agree = {0: [95, 100]}
    plans = []
    for _ in range(3):                                    # three generations of 7 cycles each
        plan = Planner(model, costs, 0, 3, adapt=True)
        for _ in range(7):
            plans.append(plan.choose(100))
            if plans[-1][1] == 0:
                assert plan.held == 1                      # the second plain step follows in the held run
                plan.held = 0
    assert plans.index((0, 0)) == RETIME - 1 and plans.count((0, 0)) == 1 and plans.count((0, 3)) == 20


def test_a_plain_step_right_after_a_cycle_is_not_timed_as_the_yardstick(monkeypatch):
    """The yardstick is a plain step that follows a plain step (plain decoding's steady step); one right
    after a cycle runs on weights the cycle evicted and would overstate it."""
    import poegpt.speculative as S
    m = build_random_model(seed=6)          # its own cost record
    script = iter([0, 0, 0, 3, 0, 3, 0, 0, 1] + [0] * 40)   # k per planned step; 0: a plain step
    monkeypatch.setattr(S.Planner, "choose", lambda self, room: (0, min(next(script), room)))
    costs = S.pass_costs(m, (False, 1, "poe", torch.float32))
    steps, run = [], S.Speculator._run

    def logged(self, d, k, cache, pending):     # each step's k, and whether it was timed as the yardstick
        before = costs.calls.get(("step",), 0)
        out = run(self, d, k, cache, pending)
        steps.append((k, before))
        return out

    monkeypatch.setattr(S.Speculator, "_run", logged)
    rows = prompts(3, seed=2)[:1]
    gen = run_mode(m, rows, ModeSpec("speculative", draft_stage=0, k_draft=3), 16)
    assert gen.tokens[0] == m.generate(rows, max_new_tokens=16)[0, len(rows[0]):].tolist()
    calls = [b for _, b in steps[1:]] + [costs.calls[("step",)]]
    timed = [after - before for before, after in zip([b for _, b in steps], calls)]
    follows_plain = [False] + [k == 0 for k, _ in steps[:-1]]
    assert [t for (k, _), t in zip(steps, timed) if k == 0] == [f for (k, _), f in zip(steps, follows_plain) if k == 0]
    assert sum(k == 0 for k, _ in steps) > sum(timed) >= 3 and sum(k > 0 for k, _ in steps) >= 3


def test_a_batch_cycle_yields_what_it_adds_to_its_slowest_row(monkeypatch):
    """A batch is done when its last row is: the planner is told how far each cycle advanced the
    shortest row still running, not the rows' mean (at batch 8 the mean over-promised and cycles
    that looked 5 % faster than plain steps ran at 0.96x)."""
    import poegpt.speculative as S
    m = build_random_model(seed=8)          # its own cost record
    noted = []
    note = S.PassCosts.note_yield
    monkeypatch.setattr(S.PassCosts, "note_yield", lambda self, d, k, tokens, promised:
                        (noted.append(tokens), note(self, d, k, tokens, promised)))
    rows = prompts(3, seed=4)
    spec = ModeSpec("speculative", draft_stage=0, k_draft=3, fallback="never")
    steps, gen = mode_steps(m, rows, spec, 20)
    lengths, expected, mean = [], [], []
    for _ in steps:
        now = [len(t) for t in gen.tokens]
        if lengths and len(noted) > len(expected):           # a cycle (not the prefill's first token)
            still = [r for r in range(3) if now[r] < 20]
            if still:
                expected.append(min(now[r] for r in still) - min(lengths[r] for r in still))
                mean.append(sum(now[r] - lengths[r] for r in still) / len(still))
        lengths = now
    assert noted[:len(expected)] == expected and len(expected) >= 3
    assert sum(expected) < sum(mean)                          # the rows drifted apart: the mean over-promises


def test_eager_plain_steps_take_full_decodes_int_position_when_rows_align(model):
    """Off the full view, aligned rows step at an int position (the eager engine's attention, as full
    PoE's eager decode); ragged rows, or a full-view cache, at a position tensor."""
    from poegpt.speculative import SpeculativeStep, Speculator
    step = SpeculativeStep(model, 2, 16, None, full_view=False)
    spec = Speculator(model, step, 2, 0, 3, Sampling(), "poe", "auto", None)
    step.cache.reset([5, 5])
    assert spec.positions(step.cache) == 5 and isinstance(spec.positions(step.cache), int)
    step.cache.reset([5, 7])
    assert spec.positions(step.cache).tolist() == [5, 7]
    step.cache.full_view, _ = True, step.cache.reset([5, 5])
    assert isinstance(spec.positions(step.cache), torch.Tensor)


@pytest.mark.parametrize("expensive", ["draft", "plain"])
def test_speculative_falls_back_or_drafts_as_the_costs_say_with_identical_tokens(expensive):
    """Planted pass costs steer a generation wholly to plain steps (drafting would not pay) or wholly to
    draft-verify cycles; the tokens equal full greedy either way."""
    m = build_random_model(seed=5)          # its own cost record
    rows = prompts(3, seed=2)[:1]
    full = m.generate(rows, max_new_tokens=19)
    planted_costs(m, 1e-9, 1.0, 1.0) if expensive == "draft" else planted_costs(m, 1.0, 1e-9, 1e-9)
    gen = run_mode(m, rows, ModeSpec("speculative", draft_stage="auto", k_draft="auto"), 19)
    assert gen.tokens[0] == full[0, len(rows[0]):].tolist()
    if expensive == "draft":   # the first token comes from the prefill, the other 18 from plain steps
        assert gen.extra["plain_steps"] == 18 and gen.drafted == 0
    else:
        assert gen.extra["plain_steps"] == 0 and gen.drafted > 0 and gen.passes < 19


@pytest.mark.parametrize("fast", [False, True])
def test_speculative_plain_runs_end_rows_at_eos_and_at_the_context_end(fast):
    """The plan's held plain steps run as one tight loop: on a ragged batch a row that meets EOS inside
    the loop ends there (the others go on), a row at the context end stops at its last slot, and every
    row's tokens equal full greedy's (eager, and the fixed-shape step uncompiled)."""
    from poegpt.engine import compile_decode
    m = build_random_model(seed=7)          # its own cost record
    T = m.config.sequence_len
    rows = prompts(3, seed=2) + [prompts(1, seed=3, lengths=(T - 19,))[0]]
    free = m.generate(rows, max_new_tokens=19)
    eos = int(free[1, len(rows[1]) + 10])   # row 1 ends after 11 tokens, inside a plain run
    want = []
    for r, row in enumerate(rows):
        t = free[r, len(row):len(row) + 19].tolist()
        want.append(t[: t.index(eos) + 1] if eos in t else t)
    assert any(len(w) < 19 for w in want) and any(len(w) == 19 for w in want)
    planted_costs(m, 1e-9, 1.0, 1.0, B=len(rows))                     # drafting never pays: every step plain
    if fast:
        compile_decode(m, backend=None)
    try:
        gen = run_mode(m, rows, ModeSpec("speculative", draft_stage="auto", k_draft="auto"), 19, eos_token_id=eos)
    finally:
        compile_decode(m, False)
    assert gen.tokens == want
    assert gen.extra["plain_steps"] == sum(map(len, want)) - len(rows) and gen.drafted == 0   # first: prefill


@pytest.mark.parametrize("verifier", ["poe", "dense"])
def test_speculative_sampling_matches_the_verifier_distribution_exactly(verifier):
    """V = 16 so the joint distribution of two tokens (256 cells) can be checked by chi-square, against
    the verifier's distribution: full PoE, or stage K-1 alone (dense).
    The first token is sampled from the prefill's log-probs (as full PoE's generation samples it); the
    second always goes through the draft/verify rule (a seeded generation always drafts)."""
    cfg = PoEConfig.from_preset("tiny", vocab_size=16)
    m = build_random_model(cfg, seed=12, head_scale=3.0)     # stages disagree: TV(p, q) ~ 0.5
    prompt = [3, 7, 1]
    sampling = Sampling(do_sample=True, temperature=0.9, seed=1234)
    N = 12_000
    gen = generate_speculative(m, [prompt] * N, draft_stage=1, k_draft=3, max_new_tokens=2, sampling=sampling,
                               verifier=verifier)
    pairs = torch.tensor(gen.tokens)
    counts = torch.bincount(pairs[:, 0] * 16 + pairs[:, 1], minlength=256).double()
    targets = {"poe": m, "dense": lambda ids: F.log_softmax(m.forward_stage(ids, K - 1), -1)}

    def pair_probs(logprobs_of):
        """Expected counts of each (first, second) token pair when both are sampled from `logprobs_of`."""
        with torch.no_grad():
            p1 = F.softmax(logprobs_of(torch.tensor([prompt]))[0, -1] / 0.9, -1).double()
            seqs = torch.tensor([prompt + [t] for t in range(16)])
            p2 = F.softmax(logprobs_of(seqs)[:, -1] / 0.9, -1).double()          # (16, 16)
        return p1, p2
    p1, p2 = pair_probs(targets[verifier])
    with torch.no_grad():   # the draft's distribution of the second token (stages 0..1)
        seqs = torch.tensor([prompt + [t] for t in range(16)])
        q2 = F.softmax(logop([lp[:, -1] for lp in m.stage_logprobs(seqs, 2)]) / 0.9, -1)
    expected = (p1[:, None] * p2).flatten() * N

    def chi2(exp):
        keep = exp > 5
        return float((((counts - exp) ** 2 / exp)[keep]).sum()), int(keep.sum()) - 1
    stat, dof = chi2(expected)
    # p = 1e-4 critical value via Wilson–Hilferty; a wrong rule (e.g. emitting the draft) blows far past it
    crit = dof * (1 - 2 / (9 * dof) + 3.719 * math.sqrt(2 / (9 * dof))) ** 3
    assert stat < crit, (stat, crit)
    wrong = (p1[:, None] * q2.double()).flatten() * N                     # a rule that emits the draft
    assert chi2(wrong)[0] > 5 * crit
    o1, o2 = pair_probs(targets["dense" if verifier == "poe" else "poe"])   # and not the other verifier's
    assert chi2((o1[:, None] * o2).flatten() * N)[0] > 5 * crit
    assert 0 < gen.acceptance < 1


@pytest.fixture(scope="module")
def model64():
    return build_random_model(seed=5, dtype=torch.float64)


WAND_PROMPTS = [[7, 3, 9, 1, 4], [5, 2, 8, 6, 1, 9, 3, 2, 7], [11, 2]]     # ragged
WAND_BOUNDS = (0.5, 0.5, 0.5)        # on the fp64 random model rows exit at every stage, at different ones


def wand_run(model, rows, n=12, bounds=WAND_BOUNDS, path=None, eos=None):
    gen = Generation([[] for _ in rows])
    walker = None
    steps = wand_steps(model, rows, n, 1.0, list(bounds), eos, gen, path=path)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            walker = stop.value
            break
    return gen, walker


def test_wand_batch_equals_alone_and_lazy_equals_deep(model64):
    """fp64, ragged prompts, rows exiting at different stages: every row's tokens and exit stages in the
    batch equal what it produces alone, on the lazy path, the deep path and the cost model's mix."""
    rows = WAND_PROMPTS
    alone = [wand_run(model64, [r], path="lazy")[0] for r in rows]
    want_tokens, want_stages = [g.tokens[0] for g in alone], [g.stages_used[0] for g in alone]
    assert all(len(set(s)) > 2 for s in want_stages)                      # rows exit at several stages
    assert any(a != b for a, b in zip(want_stages[0], want_stages[1]))    # ... and at different ones
    for path in ("lazy", "deep", None):
        gen, _ = wand_run(model64, rows, path=path)
        assert gen.tokens == want_tokens and gen.stages_used == want_stages, path
        assert wand_run(model64, [rows[1]], path=path)[0].tokens == want_tokens[1:2], path
    assert wand_run(model64, rows, path="deep")[0].extra["layers_per_token"] == 8
    assert wand_run(model64, rows, path="lazy")[0].extra["deep_fraction"] == 0


def test_wand_tokens_equal_a_nocache_reference_of_the_exit_rule(model64):
    """At each step, a full forward of the whole sequence (no cache), then the rule written out here:
    the first stage j whose top-2 gap of Σ_{i<=j} log p_i reaches the bound, the argmax there."""
    bounds = WAND_BOUNDS
    for path in ("lazy", "deep"):
        gen, _ = wand_run(model64, WAND_PROMPTS, n=10, path=path)
        for prompt, tokens, stages in zip(WAND_PROMPTS, gen.tokens, gen.stages_used):
            seq = list(prompt)
            for token, stage in zip(tokens, stages):
                logps = [lp[0, -1] for lp in model64.stage_logprobs(torch.tensor([seq]))]
                S = torch.zeros_like(logps[0])
                for j, lp in enumerate(logps):
                    S = S + lp
                    top = S.topk(2).values
                    if j == K - 1 or float(top[0] - top[1]) >= bounds[j]:
                        break
                assert (token, stage) == (int(S.argmax()), j)
                seq.append(token)


@pytest.mark.parametrize("path", ["lazy", "deep", None])
def test_wand_infinite_bounds_equal_full_greedy(model, path):
    rows = prompts(3, seed=3)
    full = run_mode(model, rows, ModeSpec("full"), 12).tokens
    gen, _ = wand_run(model, rows, bounds=(math.inf,) * 3, path=path)
    assert gen.tokens == full and all(s == [K - 1] * 12 for s in gen.stages_used)
    assert gen.extra["layers_per_token"] == 8 and gen.extra["exit_layers_per_token"] == 8


def test_wand_lazy_fill_then_flush_equals_a_full_prefill(model64):
    """After lazy decoding (positions left pending at several stages) and a flush, every row's cache
    equals a full prefill of its own tokens, at every layer."""
    gen, walker = wand_run(model64, WAND_PROMPTS, n=16, path="lazy")
    assert walker.lowest_pending() is not None
    walker.flush()
    assert walker.lowest_pending() is None and len(set(walker.filled)) == 1
    for r, (prompt, tokens) in enumerate(zip(WAND_PROMPTS, gen.tokens)):
        seq = prompt + tokens[:-1]                          # the last token was never fed back
        assert walker.cache.lengths[r] == len(seq)
        ref = KVCache(model64.config, 1, len(seq), dtype=torch.float64)
        model64.trunk(torch.tensor([seq]), cache=ref)
        n = len(seq)
        for layer in range(model64.config.n_layer):
            torch.testing.assert_close(walker.cache.k[layer][r, :, :n], ref.k[layer][0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(walker.cache.v[layer][r, :, :n], ref.v[layer][0], rtol=1e-10, atol=1e-10)


def test_wand_counts_the_layers_it_runs(model64):
    """layers_per_token = block evaluations at decode positions (lazy fills included) per fed token,
    as hooks on the blocks count them."""
    for rows in (WAND_PROMPTS, WAND_PROMPTS[:1]):
        wand_run(model64, rows, path="lazy")                     # the pass costs of this shape are measured once
        calls = count_layers(model64, lambda: wand_run(model64, rows, path="lazy"))
        gen, _ = wand_run(model64, rows, path="lazy")
        prefill = model64.config.n_layer * max(map(len, rows))   # one walk of the padded prompts (per row)
        decode = sum(T for _, T in calls) - prefill              # per row: every row runs every pass
        assert gen.extra["layers_per_token"] == pytest.approx(decode / 11)
    assert gen.extra["layers_per_token"] < 8                     # alone, the last tokens left layers pending


def test_wand_eos_stops_rows_and_they_stop_steering_the_batch(model64):
    rows = WAND_PROMPTS
    free, _ = wand_run(model64, rows, path="lazy")
    eos = free.tokens[0][2]
    for path in ("lazy", "deep"):
        gen, _ = wand_run(model64, rows, path=path, eos=eos)
        for r, tokens in enumerate(free.tokens):
            cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            assert gen.tokens[r] == tokens[:cut]


def test_exit_tokens_is_the_rule_row_by_row():
    """exit_tokens on random log-probs against the rule applied to each row in Python; the last stage
    always exits; the lazy helper (stage by stage) agrees."""
    from poegpt.wand import exit_step, exit_tokens
    g = torch.Generator().manual_seed(0)
    logps = [F.log_softmax(3 * torch.randn(64, 50, generator=g), -1) for _ in range(K)]
    bounds, safety = [2.0, 1.0, 0.5], 1.5
    tokens, stages = exit_tokens(logps, bounds, safety)
    for r in range(64):
        S = torch.zeros(50)
        for j in range(K):
            S = S + logps[j][r]
            top = S.topk(2).values
            if j == K - 1 or float(top[0] - top[1]) >= safety * bounds[j]:
                break
        assert (int(tokens[r]), int(stages[r])) == (int(S.argmax()), j)
    assert len(set(stages.tolist())) == K
    ex = None
    for j in range(K):
        ex = exit_step(ex, logps[j], j, safety * bounds[j] if j < K - 1 else None)
    assert torch.equal(ex.token, tokens) and torch.equal(ex.stage, stages) and bool(ex.done.all())
    t, s = exit_tokens(logps, [math.inf] * 3, 1.0)
    assert torch.equal(t, sum(logps).argmax(-1)) and (s == K - 1).all()


def test_top_margin_eager_and_compiled_forms_agree_on_ties():
    """argmax/topk(2) eager, masked reductions under torch.compile: the same tokens and margins, ties
    included (a tied maximum is its own runner-up: margin 0, the first index)."""
    from poegpt.wand import top_margin
    traced = torch.compile(top_margin, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randint(0, 40, (16, 300), generator=g).to(dtype)          # many ties, at the top too
        a, b = top_margin(x), traced(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert (a[1] == 0).any() and torch.equal(a[0], x.argmax(-1))


def test_wand_cost_model_takes_the_cheaper_path():
    from poegpt.wand import Costs
    c = Costs(stage=[4.0, 2.0, 1.0, 1.0], deep=7.0, counts=[1.0] * K)
    assert c.expected_lazy() == pytest.approx((4 + 6 + 7 + 8) / 4) and c.choose(None) == "lazy"
    for _ in range(100):                      # the batch keeps going to the last stage: deep is cheaper
        c.observe(K - 1)
    assert c.choose(None) == "deep"
    assert c.choose(0) == "lazy"              # ... unless pending layers would first have to run
    for _ in range(100):
        c.observe(0)
    assert c.choose(None) == "lazy"


def test_wand_greedy_tokens_follow_the_exit_rule(model):
    """Each WAND token is the argmax of the summed stage log-probs up to the stage that emitted it."""
    prompt = prompts(1, seed=4, lengths=(6,))[0]
    out, stages = model.generate_wand([prompt], max_new_tokens=10, p99_bounds=[1.0, 1.0, 1.0], return_stages_used=True)
    seq = out[0].tolist()
    for i, s in enumerate(stages[0]):
        n = len(prompt) + i
        logps = model.stage_logprobs(torch.tensor([seq[:n]]))
        assert int(sum(lp[0, -1] for lp in logps[: s + 1]).argmax()) == seq[n]


def test_calibrated_wand_and_auto_draft_on_trained_model(trained_model, tmp_path):
    from poegpt.data import TokenLoader
    from poegpt.speculative import measure_draft_agreement
    from poegpt.wand import measure_bounds
    m, tok = trained_model
    with pytest.raises(PoEError, match="calibrate"):
        m.generate_wand(torch.tensor([tok.encode("Hello")]), max_new_tokens=4)
    data = m.checkpoint_meta["train_args"]["data"]
    bounds = measure_bounds(m, TokenLoader(data, "val", 2, 64, case_aug_p=0.0).iter_batches(4))
    assert len(bounds["wand_p99_bounds"]) == K - 1 and all(b >= 0 for b in bounds["wand_p99_bounds"])
    agreement = measure_draft_agreement(m, TokenLoader(data, "val", 2, 64, case_aug_p=0.0).iter_batches(4))
    assert set(agreement) == {"0", "1", "2"} and all(0 < t <= 1 for t in agreement.values())
    assert agreement["2"] > 0.3                  # a trained prefix of three of four stages agrees well above chance
    ids = torch.tensor([tok.encode("The capital of France is")])
    full = m.generate(ids, max_new_tokens=20)
    out, stages = m.generate_wand(ids, max_new_tokens=20, p99_bounds=bounds["wand_p99_bounds"],
                                  return_stages_used=True)
    assert out.shape == full.shape and len(stages[0]) == 20
    gen = run_mode(m, ids, ModeSpec("wand", p99_bounds=tuple(bounds["wand_p99_bounds"])), 20)
    assert gen.tokens[0] == out[0, ids.size(1):].tolist()
    assert gen.extra["exit_layers_per_token"] <= 8


@pytest.mark.parametrize("call, match", [
    (lambda m, ids: m.forward_stage(ids, stage=4), "stage"),
    (lambda m, ids: m.generate_stage(ids, stage=-1), "stage"),
    (lambda m, ids: m.generate_prefix(ids, max_stages=0), "max_stages"),
    (lambda m, ids: m.generate_parallel_composition(ids, stages=[]), "stages"),
    (lambda m, ids: m.generate_parallel_composition(ids, stages=[1, 1]), "duplicates"),
    (lambda m, ids: m.generate_parallel_composition(ids, stages=[0, 1], stage_weights=[1.0]), "stage_weights"),
    (lambda m, ids: m.generate_parallel_composition(ids, stages=[0, 1], stage_weights=[1.0, -1.0]), "stage_weights"),
    (lambda m, ids: m.generate_parallel_composition(ids, stages=[0, 1], stage_weights=[0, 0]), "stage_weights"),
    (lambda m, ids: m.generate_speculative(ids, k_draft=0), "k_draft"),
    (lambda m, ids: m.generate_speculative(ids, draft_stage=3), "draft_stage"),
    (lambda m, ids: m.generate_wand(ids, safety=-1.0, p99_bounds=[1, 1, 1]), "safety"),
    (lambda m, ids: m.generate_wand(ids, p99_bounds=[1, 1]), "p99_bounds"),
    (lambda m, ids: m.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10), "maximum context length"),
    (lambda m, ids: m.generate(torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (lambda m, ids: m.generate(ids, max_new_tokens=-1), "max_new_tokens"),
    (lambda m, ids: m.generate(ids, do_sample=True, temperature=-0.5), "temperature"),
    (lambda m, ids: m.generate(ids, do_sample=True, top_p=1.5), "top_p"),
])
def test_bad_mode_arguments_are_named(model, call, match):
    with pytest.raises(PoEError, match=match):
        call(model, torch.tensor([[1, 2, 3]]))


def test_seeded_sampling_is_reproducible(model):
    ids = torch.tensor(prompts(2, lengths=(4,)))
    a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=50, seed=7)
    b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=50, seed=7)
    c = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=50, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_rows(model):
    ids = torch.tensor(prompts(2, lengths=(4,)))
    free = model.generate(ids, max_new_tokens=10)
    eos = int(free[0, 6])                                      # the third generated token of row 0
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos)
    assert out[0, 4:7].tolist() == free[0, 4:7].tolist() and (out[0, 7:] == eos).all()


def test_stream_text_never_splits_characters_and_honours_stop(trained_model):
    _, tok = trained_model
    text = "대한민국의 수도는 서울이다. 🙂 emoji and 日本語 STOP here"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [d for _, d, _ in stream_text(tok, ([[t]] for t in ids), 1)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    out = list(stream_text(tok, ([[t]] for t in ids), 1, stop=["STOP"]))
    assert "".join(d for _, d, _ in out) == text[: text.index("STOP")] and out[-1][2] == "stop"
    out = list(stream_text(tok, ([[t]] for t in ids[:5] + [tok.bos_id] + ids[5:]), 1, eos_token_id=tok.bos_id))
    assert out[-1][2] == "stop" and "".join(d for _, d, _ in out) == tok.decode(ids[:5])


def test_top_p_keeps_the_top_token_even_when_it_underflows():
    from poegpt.engine import filter_logprobs
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), -1)
    for p in (1e-300, 1e-6, 0.3):
        out = filter_logprobs(logp, 1.0, None, p)
        assert torch.isfinite(out[0, 0]) and out[0, 0].item() == 0.0 and torch.isinf(out[0, 1:]).all()
    out = filter_logprobs(logp, 1.0, None, 0.9)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 3])
