"""Where the cost model says self-speculative decoding and WAND pay: a projection from measured pass costs.

On the shipped demo model (14M parameters) speculative decoding and WAND come out near full-PoE greedy's
speed (docs/benchmarks.md): a step there costs mostly per-call overhead, so a half-depth draft costs
nearly a full step. This bench asks what the same algorithms would give where a step is bandwidth-bound,
without running them there: it times the passes they are made of and combines the costs with acceptance
and exit statistics measured on the demo model. In one run:

1. Pass costs (seconds, best of a few repeats, after a warm-up), at the `1.5b` preset's shapes with
   random weights (built as bench/roofline.py builds them: for timing only) and at the demo model's
   shapes (its own weights), at batch 1 and 8, every pass a `model.walk` against a KV cache already
   holding `--context` tokens:
   - full: the one-token step: every stage, every head, Log-OP;
   - draft d (d = 0..K-2): stages 0..d for one token and the Log-OP of heads 0..d;
   - verify d, k: stages d+1..K-1 over k+1 tokens from their draft-boundary stream, heads d+1..K-1 at
     the k+1 positions (the draft passes ran heads 0..d there), Log-OP and each draft stage's agreement;
   - WAND stage j over T tokens (batch 1 only: WAND decodes rows one at a time): stage j, its head on
     the last position, the running sum of stage log-probs and its top-2 margin. T > 1 is a lazy fill:
     positions that exited below stage j run through it together with the token that needs it.
   Each pass's weight bytes (read once per pass) and FLOPs, from the model's shapes, over its time give
   its achieved GB/s, its share of the measured read bandwidth (bench/machine.py), and its regime
   against this machine's measured rates at the same dtype and threads: a one-row matmul streaming a
   48,000 x 1,536 matrix (the rate a weight-bound pass can reach; at one thread well below the read
   bandwidth) and a 2048^3 GEMM. A pass whose work time, bytes / streaming rate + FLOPs / GEMM rate,
   is at least half its measured time is bandwidth- or compute-bound (whichever term is larger);
   otherwise overhead-bound: per-call costs, not the work, set its time. Repeats go round-robin over
   all passes of a batch, so a change in the machine's load falls on every pass alike.
2. On the demo model, independent of poegpt/speculative.py and poegpt/wand.py: full-PoE greedy
   continuations of bench/decode.py's 8 prompts (each alone), teacher-forced once through
   `stage_logprobs`; on the generated positions, per draft stage d the greedy acceptance rate
   alpha_d (argmax of Log-OP(stages 0..d) == full-PoE argmax), and the WAND exit stage with the
   calibrated bounds at safety 1 (S_j = sum of stage log-probs 0..j; exit at the first j whose
   top-1 - top-2 margin >= bound_j; the last stage always). The speculative cycles are also replayed
   on the measured agreement sequence (tokens per cycle and acceptance without the i.i.d. assumption
   of the formula), comparable with bench/decode.py's measured acceptance and tau.
3. Projection, for each model and batch:
   - speculative (d, k): tau = (1 - alpha^(k+1)) / (1 - alpha) tokens per cycle; a cycle costs
     (k+1) draft passes (the last readies the last draft's boundary state) + one verify pass; speed-up
     = tau * c_full / cycle (and with the replayed tau); the break-even alpha where it is 1; the best
     (d, k). At batch B the B rows accept independently and cycle together: per-row tau, cost measured
     at batch B.
   - WAND (batch 1): expected cost per token sum_j P(reach j) * c_stage(j) vs c_full, and the lazy
     scheme replayed on the measured exit sequences (fill passes of T positions at their measured
     cost). With exact lazy fill every position's layers all run (when a later token goes deeper),
     so WAND removes no layer FLOPs; what it removes is (a) the heads of the stages past each
     position's exit (FLOPs and bytes) and (b) weight reads: the deep layers are read once per fill
     pass, shared by the pending positions and the token that needed them, so deep-layer weight bytes
     per token = sum_j P(reach j) * bytes(stage j layers). Bytes saved pay where a pass is
     bandwidth-bound; in the overhead-bound regime the count of passes is what matters.
   The 1.5b projection uses the demo's acceptance and exits (no trained 1.5b checkpoint here): a
   PROJECTION, not a measurement of a 1.5b model.
4. On the demo model, whole greedy generations of full, speculative (k = 3 and the best projected) and
   WAND timed end to end (eager, through the mode table), beside their projection: the measured time
   per step minus the passes' cost is the host work between passes, which the projection leaves out.
Prints tables (machine header first), then one JSON line.

    python bench/projection.py                      # dtype auto, batch 1 and 8, eager passes (~4 min, 1 thread)
    python bench/projection.py --fast               # fewer k values and repeats
    python bench/projection.py --models demo --batch 1 --fast --compile --no-end-to-end
                                                    # torch.compile per pass shape (21 graphs, ~4 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import bandwidth, describe, load, matmul_flops  # noqa: E402

import poegpt  # noqa: E402
from poegpt import PoEConfig, PoEGPT  # noqa: E402
from poegpt.engine import Compiler, compile_decode, compiled, one_row_matmuls  # noqa: E402
from poegpt.hardware import resolve_dtype  # noqa: E402
from poegpt.logop import logop  # noqa: E402
from poegpt.model import TrunkState  # noqa: E402
from poegpt.modes import ModeSpec, run_mode  # noqa: E402
from poegpt.speculative import SpeculativeStep  # noqa: E402

KS = (1, 2, 3, 4, 6, 8)
FAST_KS = (1, 3, 8)
FILL_TOKENS = (1, 2, 4, 8)          # T of the WAND stage passes (1: the token alone; more: a lazy fill)
FAST_FILL_TOKENS = (1, 4)
REGIME_FRACTION = 0.5              # work time / measured time at or above which a pass counts as bound by its work


# --- the projection: pure functions --------------------------------------------------------------------------

def tau(alpha: float, k: int) -> float:
    """Expected tokens per speculative cycle with k drafts each accepted with probability alpha (i.i.d.):
    1 + alpha + ... + alpha^k (the verifier's own token always comes)."""
    if alpha >= 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def cycle_cost(c_draft: float, c_verify: float, k: int) -> float:
    """One cycle: k+1 draft passes (the last only readies the last draft's boundary state) + one verify."""
    return (k + 1) * c_draft + c_verify


def speculative_speedup(alpha: float, k: int, c_draft: float, c_verify: float, c_full: float) -> float:
    """Tokens/s of speculative decoding over full greedy: tau tokens per cycle vs one token per c_full."""
    return tau(alpha, k) * c_full / cycle_cost(c_draft, c_verify, k)


def break_even_alpha(k: int, c_draft: float, c_verify: float, c_full: float) -> float | None:
    """The acceptance rate at which speculative decoding matches full greedy (speed-up 1); 0 when it
    wins even with every draft rejected, None when it loses even with every draft accepted."""
    f = lambda a: speculative_speedup(a, k, c_draft, c_verify, c_full) - 1          # increasing in a
    if f(0.0) >= 0:
        return 0.0
    if f(1.0) < 0:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


def reach_probabilities(exits: list[int], K: int) -> list[float]:
    """P(a position runs stage j) = the share of positions that exit at stage j or deeper."""
    n = len(exits)
    return [sum(e >= j for e in exits) / n for j in range(K)]


def wand_expected_cost(reach: list[float], c_stage: list[float]) -> float:
    """Expected cost per token when every stage pass is one token: sum_j P(reach j) * c_stage(j)."""
    return sum(p * c for p, c in zip(reach, c_stage))


def lazy_passes(exits: list[int], K: int) -> list[tuple[int, int]]:
    """WAND's passes with exact lazy fill, replayed on one sequence of exit stages (consecutive positions,
    the cache filled at every stage before the first): position q runs stages 0..exits[q]; its pass at
    stage j also carries every position since the last pass at stage j (the pending fill). Returns
    (stage, tokens in the pass). Positions left pending at the end are not run (as a generation ends)."""
    last = [-1] * K                          # the last position that ran stage j
    passes = []
    for q, e in enumerate(exits):
        for j in range(e + 1):
            passes.append((j, q - last[j]))
            last[j] = q
    return passes


def interpolate(costs: dict[int, float], T: int) -> float:
    """Cost of a pass of T tokens from costs measured at some T: linear between them, extended beyond."""
    ts = sorted(costs)
    if T in costs:
        return costs[T]
    if len(ts) == 1:
        return costs[ts[0]] * T / ts[0]
    lo, hi = (ts[0], ts[1]) if T < ts[0] else (ts[-2], ts[-1])
    for a, b in zip(ts, ts[1:]):
        if a < T < b:
            lo, hi = a, b
    return costs[lo] + (costs[hi] - costs[lo]) * (T - lo) / (hi - lo)


def lazy_cost(passes: list[tuple[int, int]], c_stage_T: list[dict[int, float]]) -> float:
    """Total cost of lazy-fill passes, each at its measured (interpolated) cost for its token count."""
    return sum(interpolate(c_stage_T[j], T) for j, T in passes)


def replay_speculative(agree: list[bool], k: int, n: int) -> dict:
    """Greedy speculative cycles replayed on a sequence of draft/verifier agreements (agree[i]: the draft's
    argmax at generated position i equals the full-PoE argmax): the first token comes from the prefill
    (one pass, no drafts, as the engine does), then each cycle drafts k tokens (fewer near the end: no
    more than the tokens still to come, as the engine's cache holds), accepts the leading agreeing ones
    (m) and adds the verifier's own, until n tokens are committed. `agree` must reach n + k - 1
    positions. Returns tokens per pass, accepted / drafted and the counts (the prefill's pass included)."""
    i = cycles = min(n, 1)
    accepted = drafted = 0
    while i < n:
        kc, m = min(k, n - i), 0
        while m < kc and agree[i + m]:
            m += 1
        i += m + 1
        cycles += 1
        accepted += m
        drafted += kc
    return {"tau": n / max(cycles, 1), "acceptance": accepted / drafted if drafted else 0.0, "cycles": cycles, "accepted": accepted,
            "drafted": drafted}


def suffix_depth(exits: list[int]) -> list[int]:
    """The deepest stage each position runs under lazy fill: the deepest exit at it or after it."""
    out, deepest = [], -1
    for e in reversed(exits):
        deepest = max(deepest, e)
        out.append(deepest)
    return out[::-1]


def work_seconds(bytes_: float, flops: float, stream_gb_s: float, gflop_s: float) -> tuple[float, float]:
    """The time a pass's work takes at this machine's measured rates: its weight bytes at the one-row
    streaming rate, its FLOPs at the GEMM rate (two terms, not overlapped)."""
    return bytes_ / (stream_gb_s * 1e9), flops / (gflop_s * 1e9)


def regime(bytes_: float, flops: float, seconds: float, stream_gb_s: float, gflop_s: float) -> str:
    """Which cost sets a pass's time. Its work time (`work_seconds`) at least REGIME_FRACTION of the
    measured time: bandwidth- or compute-bound, whichever term is larger; else overhead-bound (per-call
    costs, not the work)."""
    t_stream, t_compute = work_seconds(bytes_, flops, stream_gb_s, gflop_s)
    if t_stream + t_compute < REGIME_FRACTION * seconds:
        return "overhead"
    return "bandwidth" if t_stream >= t_compute else "compute"


def stream_rate(dtype: torch.dtype, rows: int = 1, shape: tuple[int, int] = (48_000, 1_536), repeats: int = 5) -> float:
    """GB/s at which a `rows`-row matmul streams a weight matrix far larger than the caches (default: the
    1.5b head's shape): the practical ceiling of a weight-bound pass, below the raw read bandwidth."""
    w = torch.randn(shape, dtype=dtype)
    x = torch.randn(rows, shape[1], dtype=dtype)
    F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return w.numel() * w.element_size() / best / 1e9


# --- the passes ----------------------------------------------------------------------------------------------

class Passes:
    """The passes of one model at one batch size, against a cache holding `context` tokens per row.
    Every pass writes at positions context.. and leaves the cache's lengths alone, so it can repeat.
    Full, draft and verify are speculative decoding's own passes (`SpeculativeStep`: the plain step is
    full PoE's), on the cache the engine gives them (full-view when compiled)."""

    def __init__(self, model, batch: int, context: int, max_tokens: int, compiler: Compiler | None,
                 ks: tuple[int, ...] = ()):
        self.model, self.B, self.pos, self.compiler = model, batch, context, compiler
        cfg = model.config
        self.K, self.V = cfg.n_stages, cfg.vocab_size
        self.step = SpeculativeStep(model, batch, context + max_tokens, compiler, full_view=compiler is not None,
                                    compiled_ks=ks if compiler else ())
        self.cache = self.step.cache
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, self.V, (batch, context), generator=g)
        model.walk(prompt, None, 0, self.K, 0, self.cache)             # the cache's first `context` tokens
        self.cache.reset([context] * batch)
        self.tokens = torch.randint(0, self.V, (batch, max_tokens), generator=g)
        self.heads = self.step.heads

    def _at(self, T: int) -> torch.Tensor:
        """Positions context..context+T-1 for every row, (B, T)."""
        return torch.full((self.B, 1), self.pos) + torch.arange(T)

    def full(self):
        tok, pos, fn = self.tokens[:, 0], self._at(1)[:, 0], self.step.plain
        return lambda: fn(tok, pos)

    def draft(self, d: int):
        tok, pos, fn = self.tokens[:, 0], self._at(1)[:, 0], self.step.draft(d)
        return lambda: fn(tok, pos)

    def _boundary(self, stage: int, T: int):
        """T tokens, the stream after stages 0..stage-1 and their boundary outputs (untimed setup)."""
        idx = self.tokens[:, :T]
        state, outs = self.model.walk(idx, None, 0, stage, self.pos, self.cache)
        return idx, state, outs

    def verify(self, d: int, k: int):
        """Stages d+1.. over k+1 tokens, given stages 0..d's log-probs there (the draft passes made them)."""
        model = self.model
        idx, state, outs = self._boundary(d + 1, k + 1)
        with torch.no_grad():
            shallow = torch.stack([F.log_softmax(model.stage_logits(h, j, self.heads[j]), -1) for j, h in enumerate(outs)])
        fn, pos = self.step.verify(d, k), self._at(k + 1)
        return lambda: fn(state.x, state.x0, state.x_mid, shallow, idx, pos)

    def wand_stage(self, j: int, T: int):
        model, pos, cache, head = self.model, self.pos, self.cache, self.heads[j]
        idx, state, _ = self._boundary(j, T)
        score = torch.zeros(self.B, self.V)                            # the sum of the earlier stages' log-probs

        def step(idx, x, x0, x_mid, score):
            st = None if j == 0 else TrunkState(x, x0, x_mid)
            _, (h,) = model.walk(idx, st, j, j + 1, pos, cache)
            s = score + F.log_softmax(model.stage_logits(h[:, -1], j, head), -1)
            top2 = torch.topk(s, 2, -1).values
            return s, top2[:, 0] - top2[:, 1]
        fn = compiled(step, self.compiler)
        if j == 0:
            return lambda: fn(idx, None, None, None, score)
        return lambda: fn(idx, state.x, state.x0, state.x_mid, score)


def best_seconds(calls: list, repeats: int, model, min_seconds: float = 0.0, max_rounds: int = 100) -> tuple[list[float], int]:
    """Best wall time of each (call, rows) after one untimed run each (which compiles, when compiled). The
    repeats go round-robin over all calls, so that a change in the machine's load falls on all alike:
    `repeats` rounds, more while the rounds have taken less than `min_seconds` (cheap passes get more
    tries), at most `max_rounds`. A call of one row runs on ATen's GEMV when the model's fast path is on
    (`one_row_matmuls`). Returns the times and the rounds run."""
    for call, rows in calls:
        with one_row_matmuls(model, rows):
            call()
    best = [float("inf")] * len(calls)
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < max_rounds):
        for i, (call, rows) in enumerate(calls):
            with one_row_matmuls(model, rows):
                t0 = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - t0)
        rounds += 1
    return best, rounds


# --- what a pass reads and computes ----------------------------------------------------------------------------

def layer_params(model, first_stage: int, last_stage: int) -> int:
    """Matmul weights of the layers of stages first..last-1."""
    b = model.config.boundaries
    start = b[first_stage - 1] + 1 if first_stage else 0
    return sum(m.weight.numel() for i in range(start, b[last_stage - 1] + 1)
               for m in model.blocks[i].modules() if isinstance(m, torch.nn.Linear))


def pass_shape(model, first: int, last: int, heads: int, rows: int, head_rows: int, keys: int) -> tuple[int, int]:
    """(weight bytes, FLOPs) of a pass through stages first..last-1 for `rows` token rows attending over
    ~`keys` keys, then `heads` summed head matrices on `head_rows` rows. Each weight is read once per pass
    (one matmul over all its rows); embedding rows are gathered, not read whole."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    head = heads * cfg.padded_vocab_size * cfg.n_embd
    layers = layer_params(model, first, last)
    b = cfg.boundaries
    n_layers = b[last - 1] - (b[first - 1] if first else -1)
    attn = 4 * cfg.n_head * cfg.head_dim * keys * n_layers
    return (layers + head) * elt, rows * (2 * layers + attn) + head_rows * 2 * head


# --- measuring the costs -------------------------------------------------------------------------------------

def measure_costs(model, batches, ks, fills, context, repeats, compiler, bw, stream, gflop_s, log,
                  min_seconds: float = 0.0) -> dict:
    """Every pass's best seconds per batch, with its bytes, FLOPs, achieved GB/s, its share of the read
    bandwidth `bw`, its work time (bytes at the streaming rate `stream` plus FLOPs at the GEMM rate
    `gflop_s`) as a share of its time, and its regime."""
    K = model.config.n_stages
    out = {}
    for B in batches:
        t0 = time.perf_counter()
        p = Passes(model, B, context, max(max(ks) + 1, max(fills)), compiler, tuple(ks))
        # (where the figure goes, the pass, its stages first..last-1, heads, token rows, head rows, new tokens)
        plan = [(("full",), p.full(), 0, K, K, B, B, 1)]
        plan += [(("draft", d), p.draft(d), 0, d + 1, d + 1, B, B, 1) for d in range(K - 1)]
        plan += [(("verify", d, k), p.verify(d, k), d + 1, K, K - d - 1, B * (k + 1), B * (k + 1), k + 1)
                 for d in range(K - 1) for k in ks]
        if B == 1:                                            # WAND decodes one row at a time
            plan += [(("wand_stage", j, T), p.wand_stage(j, T), j, j + 1, 1, T, 1, T) for j in range(K) for T in fills]
        seconds, rounds = best_seconds([(x[1], x[5]) for x in plan], repeats, model, min_seconds)
        c: dict = {"rounds": rounds}
        for (where, _, first, last, heads, rows, head_rows, T), s in zip(plan, seconds):
            wbytes, flops = pass_shape(model, first, last, heads, rows, head_rows, context + T)
            work = work_seconds(wbytes, flops, stream, gflop_s)
            node = c
            for key in where[:-1]:
                node = node.setdefault(key, {})
            node[where[-1]] = {"s": s, "weight_bytes": wbytes, "flops": flops, "gb_s": wbytes / s / 1e9,
                               "of_read_bw": wbytes / s / 1e9 / bw, "gflop_s": flops / s / 1e9,
                               "work_share": sum(work) / s, "regime": regime(wbytes, flops, s, stream, gflop_s)}
        out[B] = c
        log(f"  batch {B}: {len(plan)} passes, best of {rounds}, timed in {time.perf_counter() - t0:.0f} s")
    return out


# --- acceptance and exits on the demo model ------------------------------------------------------------------

@torch.no_grad()
def acceptance(model, tok, prompts, n: int, extra: int) -> dict:
    """Full-PoE greedy continuations (n + extra tokens per prompt, each alone), teacher-forced once; per
    generated position: the full-PoE argmax, each draft stage's argmax, the WAND exit stage."""
    K, alpha = model.config.n_stages, model.config.poe_alpha
    bounds = list(model.calibration.wand_p99_bounds or [])
    if len(bounds) != K - 1:
        raise SystemExit(f"the model has no calibrated WAND bounds ({bounds}); run `poegpt calibrate` first")
    per_row = []
    for prompt in prompts:
        ids = tok.encode(prompt)
        new = run_mode(model, [ids], ModeSpec("full"), n + extra).tokens[0]
        seq = torch.tensor([ids + new])
        P = len(ids)
        logps = [lp[0, P - 1:P - 1 + len(new)].float() for lp in model.stage_logprobs(seq)]    # K x (N, V)
        full_top = logop(logps, None, alpha).argmax(-1)
        agree = {d: (logop(logps[: d + 1]).argmax(-1) == full_top).tolist() for d in range(K - 1)}
        S = torch.cumsum(torch.stack(logps), 0)                                   # S_j, (K, N, V)
        top2 = torch.topk(S, 2, -1)
        margin = top2.values[..., 0] - top2.values[..., 1]                       # (K, N)
        exit_ = torch.full((len(new),), K - 1)
        for j in reversed(range(K - 1)):
            exit_ = torch.where(margin[j] >= bounds[j], torch.full_like(exit_, j), exit_)
        wand_tok = top2.indices[exit_, torch.arange(len(new)), 0]
        per_row.append({"prompt": prompt, "tokens": new, "consistent": (full_top == torch.tensor(new)).tolist(),
                        "agree": agree, "exits": exit_.tolist(), "wand_agree": (wand_tok == full_top).tolist()})
    pooled = lambda key: [x for r in per_row for x in r[key][:n]]        # the first n positions of every row
    exits = pooled("exits")
    return {"rows": per_row, "n": n, "bounds": bounds,
            "alpha": {d: sum(x for r in per_row for x in r["agree"][d][:n]) / (n * len(per_row)) for d in range(K - 1)},
            "teacher_forced_equals_generated": sum(pooled("consistent")) / len(exits),
            "wand_token_equals_full": sum(pooled("wand_agree")) / len(exits),
            "exit_histogram": [exits.count(j) for j in range(K)], "exits": exits}


def replays(acc: dict, ks, K: int) -> dict:
    """Speculative cycles replayed per (d, k) over every prompt's agreement sequence (tokens pooled)."""
    out = {}
    for d in range(K - 1):
        for k in ks:
            runs = [replay_speculative(r["agree"][d], k, acc["n"]) for r in acc["rows"]]
            cycles = sum(x["cycles"] for x in runs)
            out[(d, k)] = {"tau": acc["n"] * len(runs) / cycles,
                           "acceptance": sum(x["acceptance"] * x["cycles"] for x in runs) / cycles,
                           "row_cycles": [x["cycles"] for x in runs]}
    return out


def end_to_end(model, rows: list[list[int]], specs: dict, n: int, batches, repeats: int, log) -> dict:
    """Measured tokens/s of whole greedy generations (prefill included, eager) per mode and batch, to set
    beside the projection, repeats round-robin over the modes: label -> {batch: tok/s}."""
    runs = [(label, spec, B) for label, spec in specs.items() for B in batches
            if not (spec.mode == "wand" and B > 1)]           # WAND decodes rows one at a time
    for _, spec, B in runs:
        run_mode(model, rows[:B], spec, 4)                    # warm-up
    best = {}
    for _ in range(repeats):
        for label, spec, B in runs:
            t0 = time.perf_counter()
            for i in range(0, len(rows), B):
                run_mode(model, rows[i:i + B], spec, n)
            dt = time.perf_counter() - t0
            best[label, B] = min(best.get((label, B), dt), dt)
    out = {label: {B: len(rows) * n / best[label, B] for (lb, B) in best if lb == label} for label in specs}
    for label, v in out.items():
        log(f"  end to end {label}: " + ", ".join(f"b{B} {x:.1f} tok/s" for B, x in v.items()))
    return out


# --- projections ---------------------------------------------------------------------------------------------

def project_speculative(costs: dict, alpha: dict, ks, K: int, replay: dict) -> dict:
    out = {}
    for B, c in costs.items():
        rows = []
        c_full = c["full"]["s"]
        for d in range(K - 1):
            for k in ks:
                cd, cv = c["draft"][d]["s"], c["verify"][d][k]["s"]
                rows.append({"d": d, "k": k, "alpha": alpha[d], "tau": tau(alpha[d], k),
                             "cycle_s": cycle_cost(cd, cv, k), "speedup": speculative_speedup(alpha[d], k, cd, cv, c_full),
                             "speedup_replayed": replay[(d, k)]["tau"] * c_full / cycle_cost(cd, cv, k),
                             "break_even_alpha": break_even_alpha(k, cd, cv, c_full)})
        best = max(rows, key=lambda r: r["speedup"])
        best_replayed = max(rows, key=lambda r: r["speedup_replayed"])
        out[B] = {"rows": rows, "best": {"d": best["d"], "k": best["k"], "speedup": best["speedup"]},
                  "best_replayed": {"d": best_replayed["d"], "k": best_replayed["k"],
                                    "speedup": best_replayed["speedup_replayed"]}}
    return out


def project_wand(model, costs: dict, acc: dict) -> dict:
    """Batch-1 WAND: expected cost from reach probabilities, the lazy scheme replayed, bytes per token."""
    cfg = model.config
    K, n = cfg.n_stages, acc["n"]
    c = costs[1]
    c_full = c["full"]["s"]
    c_stage_T = [{T: e["s"] for T, e in c["wand_stage"][j].items()} for j in range(K)]
    reach = reach_probabilities(acc["exits"], K)
    expected = wand_expected_cost(reach, [c_stage_T[j][1] for j in range(K)])
    passes = [p for r in acc["rows"] for p in lazy_passes(r["exits"][:n], K)]
    tokens = n * len(acc["rows"])
    lazy = lazy_cost(passes, c_stage_T) / tokens
    elt = next(model.parameters()).element_size()
    stage_bytes = [layer_params(model, j, j + 1) * elt for j in range(K)]
    head_bytes = cfg.padded_vocab_size * cfg.n_embd * elt
    stage_passes = [sum(1 for j, _ in passes if j == s) / tokens for s in range(K)]
    layer_bytes = sum(p * b for p, b in zip(stage_passes, stage_bytes))
    b = cfg.boundaries
    depths = [x for r in acc["rows"] for x in suffix_depth(r["exits"][:n])]
    fill_tokens = [T for _, T in passes]
    return {
        "reach": reach, "c_full_s": c_full,
        "expected_s": expected, "expected_speedup": c_full / expected,
        "lazy_s": lazy, "lazy_speedup": c_full / lazy,
        "passes_per_token": stage_passes, "mean_fill_tokens": sum(fill_tokens) / len(fill_tokens),
        "max_fill_tokens": max(fill_tokens),
        "weight_bytes_per_token": {
            "full": sum(stage_bytes) + K * head_bytes, "wand": layer_bytes + sum(stage_passes) * head_bytes,
            "full_deep_layers": sum(stage_bytes[1:]), "wand_deep_layers": layer_bytes - stage_passes[0] * stage_bytes[0],
            "full_heads": K * head_bytes, "wand_heads": sum(stage_passes) * head_bytes},
        "head_flops_saved_per_token": (K - sum(stage_passes)) * 2 * cfg.padded_vocab_size * cfg.n_embd,
        "layers_per_position_no_flush": sum(b[x] + 1 for x in depths) / len(depths),
        "exit_layers_per_token": sum(b[e] + 1 for e in acc["exits"]) / len(acc["exits"]),
    }


# --- building and printing -----------------------------------------------------------------------------------

def build_preset(name: str, dtype: torch.dtype):
    """A preset with random weights, as bench/roofline.py builds the 1.5b (stage heads made nonzero)."""
    with torch.device("meta"):
        model = PoEGPT(PoEConfig.from_preset(name))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        for h in model.lm_head_stages:
            h.weight.normal_(std=0.02)
    return model.to(dtype).eval()


def ms(s: float) -> str:
    return f"{1e3 * s:.2f}"


def print_costs(name: str, costs: dict, K: int) -> None:
    rounds = ", ".join(f"b{B} best of {c['rounds']}" for B, c in costs.items())
    print(f"\n{name}: pass costs (ms; {rounds}); weight GB/s achieved and its share of the read bandwidth; "
          f"work time (bytes at the streaming rate + FLOPs at the GEMM rate) as a share of the pass; regime")
    print(f"{'pass':<22}" + "".join(f"{'b%d ms' % B:>10}{'GB/s':>6}{'of BW':>6}{'work':>6}{'regime':>10}" for B in costs))

    def line(label, get):
        cells = ""
        for B, c in costs.items():
            e = get(c)
            cells += (f"{'-':>10}{'':>6}{'':>6}{'':>6}{'':>10}" if e is None else
                      f"{ms(e['s']):>10}{e['gb_s']:>6.1f}{100 * e['of_read_bw']:>5.0f}%{100 * e['work_share']:>5.0f}%"
                      f"{e['regime']:>10}")
        print(f"{label:<22}{cells}")
    line("full (1 token)", lambda c: c["full"])
    for d in range(K - 1):
        line(f"draft d{d} (1 token)", lambda c, d=d: c["draft"][d])
    for d in range(K - 1):
        for k in next(iter(costs.values()))["verify"][d]:
            line(f"verify d{d} k{k}", lambda c, d=d, k=k: c["verify"][d][k])
    for j in range(K):
        for T in costs[1].get("wand_stage", {}).get(j, {}):
            line(f"wand stage {j} T={T}", lambda c, j=j, T=T: c.get("wand_stage", {}).get(j, {}).get(T))


def print_speculative(name: str, proj: dict) -> None:
    print(f"\n{name}: speculative projection (demo acceptance; speed-up = tau * c_full / cycle; replayed = tau from "
          f"the replayed cycles)")
    batches = list(proj)
    print(f"{'d':>2}{'k':>3}{'alpha':>7}{'tau':>6}" + "".join(f"{'b%d cycle ms' % B:>14}{'speed-up':>9}{'replayed':>9}"
                                                             f"{'even at':>8}" for B in batches))
    for i, r in enumerate(proj[batches[0]]["rows"]):
        cells = ""
        for B in batches:
            x = proj[B]["rows"][i]
            even = x["break_even_alpha"]
            cells += (f"{ms(x['cycle_s']):>14}{x['speedup']:>8.2f}x{x['speedup_replayed']:>8.2f}x"
                      f"{'never' if even is None else f'{even:.2f}':>8}")
        print(f"{r['d']:>2}{r['k']:>3}{r['alpha']:>7.3f}{r['tau']:>6.2f}{cells}")
    for key, what in (("best", "formula"), ("best_replayed", "replayed")):
        print(f"best ({what}): " + ", ".join(f"batch {B}: d{p[key]['d']} k{p[key]['k']} {p[key]['speedup']:.2f}x"
                                             for B, p in proj.items()))


def print_wand(name: str, w: dict, K: int) -> None:
    by = w["weight_bytes_per_token"]
    print(f"\n{name}: WAND at batch 1 (demo exits, safety 1)")
    print(f"  P(reach stage j): {' '.join(f'{p:.3f}' for p in w['reach'])}; passes per token per stage: "
          f"{' '.join(f'{p:.3f}' for p in w['passes_per_token'])}")
    print(f"  full step {ms(w['c_full_s'])} ms; expected cost per token sum_j P(reach j) c_stage(j) "
          f"{ms(w['expected_s'])} ms ({w['expected_speedup']:.2f}x); lazy scheme replayed (fills of mean "
          f"{w['mean_fill_tokens']:.2f}, max {w['max_fill_tokens']} tokens) {ms(w['lazy_s'])} ms ({w['lazy_speedup']:.2f}x)")
    print(f"  weight bytes per token: full {by['full'] / 1e6:.1f} MB, WAND lazy {by['wand'] / 1e6:.1f} MB "
          f"({by['wand'] / by['full']:.2f}x); deep layers (stages 1..{K - 1}) {by['full_deep_layers'] / 1e6:.1f} -> "
          f"{by['wand_deep_layers'] / 1e6:.1f} MB, heads {by['full_heads'] / 1e6:.1f} -> {by['wand_heads'] / 1e6:.1f} MB; "
          f"head FLOPs saved {w['head_flops_saved_per_token'] / 1e6:.1f} MFLOP per token; layer FLOPs saved: none "
          f"(every position's layers run once a later token goes deeper)")
    print(f"  layers run per position (lazy, no final flush) {w['layers_per_position_no_flush']:.2f}; "
          f"depth at which tokens were decided {w['exit_layers_per_token']:.2f} layers")


def compare_end_to_end(e2e: dict, costs: dict, spec: dict, wand: dict | None, replay: dict, n: int, n_rows: int) -> dict:
    """Per mode and batch: projected and measured speed-up over full, and the measured time per step
    (full: per token; speculative: per cycle of the batch, its rows in lockstep until the last is done;
    WAND: per token) minus the pass costs the projection counts: the host work between passes."""
    out = {}
    for label, tps in e2e.items():
        out[label] = {}
        for B, tok_s in tps.items():
            total = n_rows * n / tok_s
            if label == "full":
                proj, steps, passes = 1.0, n * -(-n_rows // B), costs[B]["full"]["s"]
            elif label.startswith("wand"):
                proj, steps, passes = wand["lazy_speedup"], n * n_rows, wand["lazy_s"]
            else:
                d, k = (int(x[1:]) for x in label.split()[1:])
                row = next(r for r in spec[B]["rows"] if (r["d"], r["k"]) == (d, k))
                cyc = replay[(d, k)]["row_cycles"]
                proj, passes = row["speedup_replayed"], row["cycle_s"]
                steps = sum(max(cyc[i:i + B]) for i in range(0, n_rows, B))
            out[label][B] = {"projected": proj, "measured": tok_s / e2e["full"][B], "tok_s": tok_s,
                             "outside_passes_s": total / steps - passes}
    return out


def print_end_to_end(name: str, cmp: dict, n: int) -> None:
    print(f"\n{name}: projected speed-up over full greedy vs measured end to end (eager, {n} tokens per prompt, "
          f"prefill included, rows of a batch together; WAND one row at a time); 'between' = measured time per "
          f"step (speculative: per cycle) minus the passes' cost")
    batches = list(cmp["full"])
    print(f"{'mode':<24}" + "".join(f"{'b%d projected' % B:>14}{'measured':>10}{'tok/s':>8}{'between ms':>11}"
                                    for B in batches))
    for label, by in cmp.items():
        cells = ""
        for B in batches:
            x = by.get(B)
            cells += (f"{'-':>14}{'-':>10}{'-':>8}{'-':>11}" if x is None else
                      f"{x['projected']:>13.2f}x{x['measured']:>9.2f}x{x['tok_s']:>8.1f}{ms(x['outside_passes_s']):>11}")
        print(f"{label:<24}{cells}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes of the pass costs")
    ap.add_argument("--context", type=int, default=64, help="tokens already in the KV cache")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per pass at least (the best is kept)")
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="more rounds of repeats while a batch's passes have been timed for less than this")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per demo prompt for the statistics")
    ap.add_argument("--fast", action="store_true",
                    help=f"k in {FAST_KS}, WAND fills T in {FAST_FILL_TOKENS}, 2 repeats, at most 2 s of extra rounds")
    ap.add_argument("--compile", action="store_true", help="each pass under torch.compile (dynamic=False, one graph "
                    "per shape, compile time excluded) and one-row passes on ATen's GEMV, as compile_decode does")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip timing whole demo generations per mode")
    ap.add_argument("--models", nargs="+", choices=["1.5b", "demo"], default=["1.5b", "demo"])
    return ap.parse_args()


@torch.no_grad()
def main():
    a = parse_args()
    from decode import PROMPTS                        # the prompts bench/decode.py times
    dtype = resolve_dtype(a.dtype)
    a.dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    ks, fills = (FAST_KS, FAST_FILL_TOKENS) if a.fast else (KS, FILL_TOKENS)
    repeats = 2 if a.fast else a.repeats
    if a.fast:
        a.min_seconds = min(a.min_seconds, 2.0)
    compiler = Compiler() if a.compile else None
    if a.compile:
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.cache_size_limit = 1024
    log = lambda s: print(s, file=sys.stderr, flush=True)
    machine = load()
    bw = bandwidth()
    gemm = matmul_flops(dtype) / 1e9
    stream = stream_rate(dtype)
    print(f"{describe({**machine, **bw, a.dtype + '_gflop_s': gemm})}; one-row {a.dtype} matmul streams "
          f"{stream:.1f} GB/s; {a.dtype}, "
          f"{'compiled' if a.compile else 'eager'} passes, KV cache holding {a.context} tokens, best of {repeats} or "
          f"more round-robin repeats")

    demo, tok = poegpt.load("demo", dtype=a.dtype)
    K = demo.config.n_stages
    acc = acceptance(demo, tok, PROMPTS, a.tokens, max(ks) - 1)
    replay = replays(acc, ks, K)
    hist = acc["exit_histogram"]
    print(f"\ndemo acceptance ({len(PROMPTS)} prompts x {a.tokens} full-PoE greedy tokens, teacher-forced; the "
          f"teacher-forced full-PoE argmax equals the generated token at {acc['teacher_forced_equals_generated']:.3f})")
    print(f"{'draft stage d':<15}{'alpha_d':>9}" + "".join(f"{'tau k%d' % k:>9}{'replayed':>9}{'accept':>8}" for k in ks))
    for d in range(K - 1):
        print(f"{d:<15}{acc['alpha'][d]:>9.3f}" + "".join(
            f"{tau(acc['alpha'][d], k):>9.2f}{replay[(d, k)]['tau']:>9.2f}{replay[(d, k)]['acceptance']:>8.2f}" for k in ks))
    print(f"WAND exits (bounds {', '.join(f'{x:.2f}' for x in acc['bounds'])}, safety 1): "
          + ", ".join(f"stage {j} {hist[j]} ({hist[j] / sum(hist):.1%})" for j in range(K))
          + f"; exit token equals the full-PoE argmax at {acc['wand_token_equals_full']:.3f}")

    results = {}
    for name in a.models:
        t0 = time.perf_counter()
        model = demo if name == "demo" else build_preset(name, dtype)
        log(f"{name}: built in {time.perf_counter() - t0:.0f} s")
        if a.compile:
            compile_decode(model, True, None)           # one-row passes take ATen's GEMV, as the compiled step does
        costs = measure_costs(model, a.batch, ks, fills, a.context, repeats, compiler, bw["read_gb_s"], stream, gemm,
                              log, a.min_seconds)
        compile_decode(model, False)
        spec = project_speculative(costs, acc["alpha"], ks, K, replay)
        wand = project_wand(model, costs, acc) if 1 in costs else None
        label = f"{name} ({model.num_params() / 1e6:,.1f}M parameters, {model.config.n_layer} layers as " \
                f"{list(model.config.stage_layout)})"
        print_costs(label, costs, K)
        print_speculative(label, spec)
        if wand:
            print_wand(label, wand, K)
        results[name] = {"params": model.num_params(), "stage_layout": list(model.config.stage_layout),
                         "costs": costs, "speculative": spec, "wand": wand}
        if name == "demo" and not a.no_end_to_end:
            configs = sorted({(d, 3) for d in range(K - 1)}
                             | {(p[key]["d"], p[key]["k"]) for p in spec.values() for key in ("best", "best_replayed")})
            specs = {"full": ModeSpec("full"), **{f"speculative d{d} k{k}": ModeSpec("speculative", draft_stage=d, k_draft=k,
                                                                                  fallback="never")
                                                  for d, k in configs}, "wand safety 1": ModeSpec("wand")}
            rows = [tok.encode(x) for x in PROMPTS]
            e2e = end_to_end(model, rows, specs, a.tokens, a.batch, repeats, log)
            cmp = compare_end_to_end(e2e, costs, spec, wand, replay, a.tokens, len(rows))
            results[name]["end_to_end"] = cmp
            print_end_to_end(label, cmp, a.tokens)
        if name != "demo":
            del model

    machine["load_1m_end"] = load()["load_1m"]
    print(json.dumps({"bench": "projection", "dtype": a.dtype, "step": "compiled" if a.compile else "eager",
                      "context": a.context, "repeats": repeats, "machine": machine, "bandwidth": bw,
                      "gemm_gflop_s": gemm, "stream_gb_s": stream,
                      "acceptance": {"tokens_per_prompt": a.tokens, "prompts": len(PROMPTS), "alpha": acc["alpha"],
                                     "teacher_forced_equals_generated": acc["teacher_forced_equals_generated"],
                                     "wand_bounds": acc["bounds"], "wand_exit_histogram": hist,
                                     "wand_token_equals_full": acc["wand_token_equals_full"],
                                     "replayed": {f"d{d}k{k}": v for (d, k), v in replay.items()}},
                      "models": results}))


if __name__ == "__main__":
    main()
