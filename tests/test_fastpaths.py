"""Exactness of the fast paths (issue 9): blockwise sliding-window attention equals masked SDPA,
and the decode fast paths (static cache step, compiled or not) give the eager engine's tokens."""

import pytest
import torch
import torch.nn.functional as F

from poegpt.model import windowed_attention, window_mask


@pytest.mark.parametrize("pos, T, window", [(0, 300, 64), (0, 129, 128), (0, 64, 200), (37, 90, 16),
                                             (500, 1, 64), (10, 1, 64), (200, 5, 30), (0, 1, 4)])
@pytest.mark.parametrize("gqa", [False, True])
def test_windowed_attention_equals_masked_sdpa_fp64(pos, T, window, gqa):
    g = torch.Generator().manual_seed(pos + T + window)
    H, G = (4, 2) if gqa else (4, 4)
    q = torch.randn(2, H, T, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, G, pos + T, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, G, pos + T, 16, generator=g, dtype=torch.float64)
    mask = window_mask(torch.arange(pos, pos + T), pos + T, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    got = windowed_attention(q, k, v, pos, window, gqa)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- the fixed-shape decode step ---------------------------------------------------------------------

from poegpt.engine import Compiler, StageMix, compile_decode, fast_path  # noqa: E402
from poegpt.errors import PoEError  # noqa: E402
from poegpt.modes import ModeSpec, mode_steps  # noqa: E402
from poegpt.speculative import AUTO_DRAFTS  # noqa: E402

from conftest import build_random_model  # noqa: E402

K = 4
MIXES = [StageMix.full(K), StageMix.prefix(K, 1), StageMix.prefix(K, 3), StageMix.single(K, 2),
         StageMix.composition(K, [0, 2, 3], [0.5, 1.0, 1.0])]


@pytest.fixture(scope="module")
def model():
    return build_random_model(seed=5)


def rows(n=3, seed=0, lengths=(5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def generate(model, prompts, mix, n, **sampling):
    from poegpt.engine import Sampling
    steps, gen = mode_steps(model, prompts, ModeSpec("composition", stages=mix.stages, stage_weights=mix.weights), n,
                            Sampling(**sampling))
    list(steps)
    return gen.tokens


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"{m.stages}-{m.weights}")
def test_static_step_equals_eager_decoding(model, mix):
    """The full-view cache step (per-row device positions, every slot masked by position) gives the
    eager engine's tokens, greedy and seeded sampling, on a ragged batch; its cache is reused."""
    prompts = rows(3)
    want = generate(model, prompts, mix, 14)
    want_s = generate(model, prompts, mix, 14, do_sample=True, top_k=20, seed=3)
    compile_decode(model, backend=None)
    before = set(fast_path(model).steps)       # an earlier case's steps, parked and reused (other keys)
    try:
        assert generate(model, prompts, mix, 14) == want
        assert generate(model, prompts, mix, 14, do_sample=True, top_k=20, seed=3) == want_s
        assert generate(model, prompts[1:], mix, 14) == want[1:]     # another batch size: another step
        assert len(set(fast_path(model).steps) - before) == 2
    finally:
        compile_decode(model, False)


def test_compiled_step_equals_eager_step(model):
    """torch.compile (inductor) of the step: the same tokens and log-probs to fp32 rounding."""
    from poegpt.engine import DecodeStep, prefill
    mix = StageMix.full(K)
    prompts = rows(2, seed=4, lengths=(6, 3))
    want = generate(model, prompts, mix, 10)
    compile_decode(model)
    try:
        assert generate(model, prompts, mix, 10) == want
    finally:
        compile_decode(model, False)
    eager, compiled = (DecodeStep(model, mix, 2, 64, c) for c in (None, Compiler()))
    tok = torch.tensor([7, 9])
    with torch.no_grad():
        for step in (eager, compiled):
            prefill(model, step.cache, prompts, mix.depth)
        pos = torch.tensor([6, 3])
        for _ in range(3):
            a, b = eager(tok, pos), compiled(tok, pos)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            tok, pos = a.argmax(-1), pos + 1


def test_warm_compiled_steps_skip_guards_yet_each_runs_its_own_weights_and_cache(model):
    """After its first call a compiled step runs without dynamo's guard evaluation (`engine.Compiled`).
    Steps of one code called in turn (two models of one config, two caches of one model) still each
    compute with their own weights and cache: every call equals the same step eager."""
    from poegpt.engine import DecodeStep, prefill
    other = build_random_model(seed=11)
    mix = StageMix.full(K)
    cases = [(model, rows(2, seed=4, lengths=(6, 3))), (other, rows(2, seed=4, lengths=(6, 3))),
             (model, rows(2, seed=7, lengths=(4, 5)))]
    steps, state = [], []
    with torch.no_grad():
        for m, prompts in cases:
            pair = (DecodeStep(m, mix, 2, 64, None), DecodeStep(m, mix, 2, 64, Compiler()))
            for step in pair:
                prefill(m, step.cache, prompts, mix.depth)
            steps.append(pair)
            state.append((torch.tensor([7, 9]), torch.tensor([len(r) for r in prompts])))
        outs = []
        for _ in range(4):
            outs.append([])
            for i, (eager, compiled) in enumerate(steps):
                tok, pos = state[i]
                a, b = eager(tok, pos), compiled(tok, pos)
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                state[i] = (a.argmax(-1), pos + 1)
                outs[-1].append(a)
    assert not torch.equal(outs[0][0], outs[0][1]) and not torch.equal(outs[0][0], outs[0][2])   # they differ
    assert all(compiled.fn.warm for _, compiled in steps)           # and the later calls skipped the guards


def test_one_row_matmuls_switches_only_fast_bf16_single_row_steps_and_restores():
    """ATen's GEMV replaces oneDNN for bf16 one-row steps on CPU under compile_decode only, for the
    step only (even when it fails); the default path keeps oneDNN (transformers' and vLLM's rounding)."""
    from poegpt.engine import one_row_matmuls
    fp32 = build_random_model(seed=1)
    bf16 = build_random_model(seed=1).to(torch.bfloat16)
    assert torch._C._get_mkldnn_enabled()
    with one_row_matmuls(bf16, 1):
        assert torch._C._get_mkldnn_enabled()
    for m in (fp32, bf16):
        compile_decode(m, backend=None)
    with one_row_matmuls(bf16, 1):
        assert not torch._C._get_mkldnn_enabled()
    for model, rows in ((bf16, 2), (fp32, 1)):
        with one_row_matmuls(model, rows):
            assert torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with one_row_matmuls(bf16, 1):
            raise RuntimeError("inside")
    assert torch._C._get_mkldnn_enabled()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    with one_row_matmuls(bf16, 1):
        gemv = F.linear(x, w)
    torch.testing.assert_close(gemv, F.linear(x, w), rtol=1e-2, atol=1e-2)   # the same product, other rounding


def speculative(model, prompts, n, **kw):
    from poegpt.engine import Sampling
    kw.setdefault("fallback", "never")       # every pass drafted, so the counters compare too
    sampling = Sampling(**{k: kw.pop(k) for k in ("do_sample", "seed", "top_k") if k in kw})
    steps, gen = mode_steps(model, prompts, ModeSpec("speculative", **kw), n, sampling)
    list(steps)
    return gen.tokens, gen.accepted, gen.passes


@pytest.mark.parametrize("draft_stage, k_draft", [(0, 1), (0, 3), (1, 5), (2, 3), (1, "auto")])
def test_speculative_fixed_shape_passes_equal_eager(model, draft_stage, k_draft):
    """The full-view draft / verify passes (uncompiled) give the eager speculative tokens, greedy
    and seeded sampling, on a ragged batch (which equals full greedy), including the last passes cut
    short by the length limit; the step and its cache are reused by the next generation."""
    prompts = rows(3)
    full = generate(model, prompts, StageMix.full(K), 19)
    want = speculative(model, prompts, 19, draft_stage=draft_stage, k_draft=k_draft)
    want_s = speculative(model, prompts, 19, draft_stage=draft_stage, k_draft=k_draft, do_sample=True, seed=4)
    assert want[0] == full
    at_end = [rows(1, seed=9, lengths=(model.config.sequence_len - 19,))[0]]   # drafts shrink at the context end
    want_end = speculative(model, at_end, 19, draft_stage=draft_stage, k_draft=k_draft)
    assert want_end[0] == generate(model, at_end, StageMix.full(K), 19)
    compile_decode(model, backend=None)
    before = set(fast_path(model).steps)       # an earlier case's steps, parked and reused (other keys)
    try:
        assert speculative(model, prompts, 19, draft_stage=draft_stage, k_draft=k_draft) == want
        assert speculative(model, at_end, 19, draft_stage=draft_stage, k_draft=k_draft) == want_end
        assert speculative(model, prompts, 19, draft_stage=draft_stage, k_draft=k_draft, do_sample=True,
                           seed=4) == want_s
        # one step per batch shape (3 and 1) for this case's draft lengths, shared with an earlier case of
        # the same lengths (a step serves every draft stage); nothing else made
        ks = AUTO_DRAFTS if k_draft == "auto" else (k_draft,)
        mine = {key for key in fast_path(model).steps if key[0] == "speculative" and key[4] == ks}
        assert len(mine) == 2 and set(fast_path(model).steps) - before <= mine
        # and with the cost model on (the default): the same greedy tokens whatever it plans
        assert speculative(model, prompts, 19, draft_stage=draft_stage, k_draft=k_draft, fallback="auto")[0] == full
    finally:
        compile_decode(model, False)


def test_compiled_speculative_equals_full_greedy(model):
    """torch.compile (inductor) of the draft and verify passes: still exactly full greedy, batch 1 and 2."""
    prompts = rows(2, seed=6, lengths=(7, 4))
    full = generate(model, prompts, StageMix.full(K), 12)
    compile_decode(model)
    try:
        for batch in (prompts[:1], prompts):
            assert speculative(model, batch, 12, draft_stage=1, k_draft=3)[0] == full[:len(batch)]
    finally:
        compile_decode(model, False)


def test_warmed_speculative_compiles_nothing_while_it_plans(monkeypatch):
    """warm_speculative compiles every pass of the plan space ahead (dynamo's eager backend: traced
    graphs, no codegen): generations that then plan freely (auto stage and length, every fixed length
    of that space) recompile nothing, and still give full greedy; the warm-up leaves no cost counted."""
    from poegpt.speculative import _COSTS, Planner, warm_speculative
    model = build_random_model(seed=6)          # its own: no cost record from other tests
    prompts = rows(2, seed=8, lengths=(6, 3))
    full = generate(model, prompts, StageMix.full(K), 14)
    compile_decode(model, backend="eager")
    try:
        warm_speculative(model, prompts, "auto", "auto", 14)
        costs = next(c for key, c in _COSTS[model].items() if key[:2] == (True, 2))
        assert set(costs.calls) >= {("verify", d, k) for d in range(K - 1) for k in AUTO_DRAFTS}
        assert all(costs.calls[("verify", d, k)] == 1 for d in range(K - 1) for k in AUTO_DRAFTS)
        assert not any(key[0] == "verify" for key in costs.seconds)       # a compiling call is not a cost
        with torch.compiler.set_stance("fail_on_recompile"):
            assert speculative(model, prompts, 14, draft_stage="auto", k_draft="auto")[0] == full
            # plans walking the whole space (each (d, k) not yet taken that fits, and plain steps):
            # a generation's first cycle has room for every k, so each generation takes one more
            space = [(d, k) for d in range(K - 1) for k in AUTO_DRAFTS] + [(0, 0)]
            seen = set()

            def choose(self, room):
                fits = [p for p in space if p[1] <= room]
                plan = next((p for p in fits if p not in seen), fits[0])
                seen.add(plan)
                return plan
            monkeypatch.setattr(Planner, "choose", choose)
            for _ in range(len(space)):
                assert speculative(model, prompts, 14, draft_stage="auto", k_draft="auto")[0] == full
            assert seen == set(space)
    finally:
        compile_decode(model, False)


@pytest.mark.slow
def test_autotuned_frozen_steps_equal_eager(model):
    """compile_decode(autotune=True): inductor's max_autotune and freezing (weights folded in as
    constants). Full greedy and speculative greedy still give the eager tokens; frozen steps of two
    models of one config, called in turn, each compute with their own weights; a bad backend is refused."""
    from poegpt.engine import DecodeStep, prefill
    prompts = rows(2, seed=6, lengths=(7, 4))
    full = generate(model, prompts, StageMix.full(K), 8)
    compile_decode(model, autotune=True)
    try:
        assert generate(model, prompts, StageMix.full(K), 8) == full
        assert speculative(model, prompts[:1], 8, draft_stage=1, k_draft=2)[0] == full[:1]
    finally:
        compile_decode(model, False)
    other, mix = build_random_model(seed=11), StageMix.full(K)
    with torch.no_grad():
        pairs = [(DecodeStep(m, mix, 1, 64, None), DecodeStep(m, mix, 1, 64, Compiler(autotune=True)))
                 for m in (model, other)]
        for m, pair in zip((model, other), pairs):
            for step in pair:
                prefill(m, step.cache, prompts[:1], mix.depth)
        tok, pos = torch.tensor([7]), torch.tensor([7])
        for _ in range(3):
            for eager, frozen in pairs:
                torch.testing.assert_close(frozen(tok, pos), eager(tok, pos), rtol=1e-5, atol=1e-5)
            tok, pos = (tok * 3 + 1) % 50, pos + 1
    with pytest.raises(PoEError, match="autotune .* needs backend 'inductor'"):
        compile_decode(model, backend="eager", autotune=True)


# --- WAND: the deep step on the fast path ---------------------------------------------------------------

def wand(model, prompts, n, path=None, bounds=(0.5, 0.5, 0.5)):
    from poegpt.engine import Generation
    from poegpt.wand import wand_steps
    gen = Generation([])
    list(wand_steps(model, prompts, n, 1.0, list(bounds), None, gen, path=path))
    return gen.tokens, gen.stages_used


def test_wand_fixed_shape_steps_equal_eager():
    """compile_decode (uncompiled: backend None): the deep step on the full-view cache and the lazy
    passes on the same cache give the eager tokens and exit stages, fp64, ragged; the step (with its
    measured costs) is cached per shape and reused by the next generation."""
    m = build_random_model(seed=5, dtype=torch.float64)
    prompts = rows(3)
    want = wand(m, prompts, 14, "lazy")
    assert len({s for row in want[1] for s in row}) == K
    compile_decode(m, backend=None)
    try:
        for path in ("deep", "lazy", None):
            assert wand(m, prompts, 14, path) == want, path
        assert wand(m, prompts[1:], 14) == (want[0][1:], want[1][1:])
        steps = fast_path(m).steps
        assert [key[0] for key in steps] == ["wand", "wand"]
        costs = [s.costs for s in steps.values()]
        wand(m, prompts, 14)
        assert [s.costs for s in fast_path(m).steps.values()] == costs[::-1]     # measured once per shape
    finally:
        compile_decode(m, False)


@pytest.mark.slow
def test_compiled_wand_equals_eager():
    """torch.compile (inductor) of the deep step: the eager tokens, batch 1 and 3, on both paths."""
    m = build_random_model(seed=5)
    prompts = rows(3, seed=6)
    want = wand(m, prompts, 10, "lazy")
    compile_decode(m)
    try:
        for path in ("deep", None):
            assert wand(m, prompts, 10, path) == want
            assert wand(m, prompts[:1], 10, path) == (want[0][:1], want[1][:1])
    finally:
        compile_decode(m, False)
