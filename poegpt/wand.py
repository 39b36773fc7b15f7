"""WAND adaptive depth: evaluate stages one by one and stop when the rest cannot change the answer.

The rule (docs/design.md §7.3): after stage j, with S_j = Σ_{i<=j} log p_i, a = argmax S_j and margin
m_j = S_j(a) − max_{b≠a} S_j(b), a row emits a once m_j >= safety · bound_j; the last stage always emits.
bound_j is the calibrated p99 of R_j = max_b Σ_{i>j} (log p_i(b) − log p_i(a)), the most the remaining
stages can move the margin: if m_j > R_j the full-PoE argmax is a. Infinite bounds never exit early
(= full greedy). `exit_step` applies the rule with one more stage to every row at once, on the device;
`exit_tokens` applies it over all K stages (for a caller that ran its rows to full depth).

A batch decodes in steps of one token per row, by one of two paths with the same tokens:
- lazy (`LazyDepth`): the rows go stage by stage together and the batch stops at the first stage where
  every row has exited; each row keeps its own token and stage (the first where it passed), so a row's
  tokens equal what it produces alone. Layers the batch skipped stay pending, for every row alike (the
  batch moves as one, so the lag is uniform), and the next step that goes deeper runs them together with
  its token, every row at its own positions: every layer sees every position once and attends to a
  complete cache, so the hidden states equal the full model's.
- deep (`WandStep`): one token per row through every stage in one pass, then the rule: the engine's
  fixed-shape `DecodeStep`, compiled under `compile_decode`.
Per step the cheaper is taken (`Costs`): the pass costs are measured once per shape, the stage the batch
stops at is tracked as it decodes. A batch of 8 rarely stops early (one row that needs depth keeps the
whole batch going), so the deep step wins there; at batch 1 with eager passes lazy can.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from .engine import (MAX_STEPS, Compiler, DecodeStep, Generation, StageMix, cached_step, check_prompts, fast_path,
                     one_row_matmuls, prefill, step_slots)
from .errors import PoEError
from .model import TrunkState

PATHS = ("lazy", "deep")
FORCE_PATH: str | None = None     # "lazy" or "deep": every step takes that path (tests); None: the cost model picks


def check_bounds(K: int, safety, p99_bounds) -> list[float]:
    """The K-1 bounds WAND compares margins with (checked), from the given or calibrated ones."""
    if not (isinstance(safety, (int, float)) and not isinstance(safety, bool) and safety >= 0):
        raise PoEError(f"safety must be a number >= 0, got {safety!r}")
    if p99_bounds is None:
            raise PoEError("WAND needs p99 bounds: run `poegpt calibrate --model PATH --data DATA` to store them in "
                           "the checkpoint, or pass p99_bounds=[...] (one per stage but the last)")
    bounds = [float(b) for b in p99_bounds]
    if len(bounds) == K:           # a bound for the last stage is meaningless (it always emits); accept and drop it
        bounds = bounds[:-1]
    if len(bounds) != K - 1 or any(not (b >= 0) for b in bounds):
        raise PoEError(f"p99_bounds must be {K - 1} numbers >= 0 (one per stage but the last), got {p99_bounds!r}")
    return bounds


# --- the exit rule -----------------------------------------------------------------------------------------

@dataclass
class Exits:
    """The rule after stages 0..j, per row: the running sum S_j (B, V), and each row's token and exit
    stage (B,), fixed at the first stage where the row passed (`done`; the others hold argmax S_j, j)."""
    score: torch.Tensor
    token: torch.Tensor
    stage: torch.Tensor
    done: torch.Tensor


def exit_step(prev: Exits | None, logp: torch.Tensor, j: int, threshold) -> Exits:
    """The rule with stage j added: `prev` after stages 0..j-1 (None for j = 0), logp = log p_j (B, V),
    threshold = safety · bound_j (a float or a 0-d tensor), None for the last stage (which always exits)."""
    score = logp if prev is None else prev.score + logp
    token, margin = top_margin(score)
    passed = torch.ones_like(token, dtype=torch.bool) if threshold is None else margin >= threshold
    if prev is None:
        return Exits(score, token, torch.zeros_like(token), passed)
    new = passed & ~prev.done
    return Exits(score, torch.where(new, token, prev.token), torch.where(new, j, prev.stage), prev.done | passed)


def top_margin(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax (the first maximum) and the gap to the runner-up (0 on a tie) over the last dim.
    Two forms with the same results (the runner-up counts a tied maximum, so both give margin 0 on a
    tie): eager, argmax and topk(2), three kernels; under torch.compile, max/min reductions and masks,
    which inductor compiles faster on CPU (the demo model's deep step at batch 8, bf16: its head
    0.2-0.3 ms a token less than max-with-index then a scattered mask, ~0.4 ms less than topk(2), of a
    ~9 ms step), while eager those are ~10 kernels: (8, 4096) fp32 took 160-220 µs against 100-140 µs
    for argmax and topk(2) (batch 1: 45 against 19 µs)."""
    if not torch.compiler.is_compiling():
        top = torch.topk(score, 2, dim=-1).values
        return score.argmax(-1), top[..., 0] - top[..., 1]
    best = score.amax(-1, keepdim=True)
    is_best = score == best
    V = score.size(-1)
    token = torch.where(is_best, torch.arange(V, device=score.device), V).amin(-1)
    second = torch.where(is_best, -math.inf, score).amax(-1)
    margin = torch.where(is_best.sum(-1) > 1, 0.0, best.squeeze(-1) - second)
    return token, margin


def exit_rule(logps: list[torch.Tensor], thresholds) -> Exits:
    """The rule over the stages given, thresholds[j] for each but the last (floats or a tensor)."""
    ex = None
    for j, logp in enumerate(logps):
        ex = exit_step(ex, logp, j, thresholds[j] if j < len(logps) - 1 else None)
    return ex


def exit_tokens(logps: list[torch.Tensor], bounds: list[float], safety: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's WAND token (B,) and the stage it exits at (B,), from the K stages' log-probs [(B, V)]:
    the first stage j whose margin of S_j reaches safety · bounds[j] (the last stage always exits), and
    argmax S_j there. On the device, vectorised over rows, no host sync."""
    if len(bounds) < len(logps) - 1:
        raise PoEError(f"exit_tokens needs a bound for each stage but the last: {len(logps) - 1}, got {len(bounds)}")
    ex = exit_rule(logps, [safety * float(b) for b in bounds])
    return ex.token, ex.stage


def stage_logprobs(model, h: torch.Tensor, k: int, head: torch.Tensor | None = None) -> torch.Tensor:
    """log p_k (B, V) from stage k's normed boundary state (B, d)."""
    return F.log_softmax(model.stage_logits(h, k, head), -1)


# --- the lazy path -----------------------------------------------------------------------------------------

class LazyDepth:
    """A batch's cache walked stage by stage, every row together.

    After the prefill each row holds its whole prompt at every layer; row b's decode positions start at
    its prompt length. The batch then moves as one (a token per row per step), so every row has the same
    number of decode positions through stage k (`filled[k]`) and the same ones waiting for stage k+1
    (`pending[k]`: their boundary-k stream and tokens, (B, n)), whatever its prompt length."""

    def __init__(self, model, cache, prompt_lens: list[int]):
        K = model.config.n_stages
        self.model, self.cache = model, cache
        self.starts = list(prompt_lens)
        self.aligned = all(n == self.starts[0] for n in self.starts)
        self.start_pos = torch.tensor(self.starts, device=model.rope_cos.device)
        self.filled = [0] * K
        self.pending: list[tuple[TrunkState, torch.Tensor] | None] = [None] * K
        self.layer_positions = 0        # layers × decode positions run per row, lazy fills included

    def positions(self, offset: int, T: int):
        """Positions of T tokens per row from decode offset `offset`: an int when the rows are aligned."""
        if self.aligned:
            return self.starts[0] + offset
        return self.start_pos[:, None] + offset + torch.arange(T, device=self.start_pos.device)

    def lowest_pending(self) -> int | None:
        """The shallowest stage with positions waiting to go deeper (None: the cache is complete)."""
        return next((k for k, p in enumerate(self.pending) if p is not None), None)

    def run_stage(self, k: int, tok: torch.Tensor | None = None) -> torch.Tensor:
        """Run stage k, every row together, on every position waiting for it: for k = 0 the new tokens
        tok (B,), else pending[k-1] (which ends with the newest token). Returns the normed boundary output
        of the last position (B, d)."""
        b = self.model.config.boundaries
        if k == 0:
            state, idx = None, tok[:, None]
        else:
            state, idx = self.pending[k - 1]
            self.pending[k - 1] = None
        T = idx.size(1)
        with one_row_matmuls(self.model, idx.numel()):
            state, (h,) = self.model.walk(idx, state, k, k + 1, self.positions(self.filled[k], T), self.cache)
        self.filled[k] += T
        self.layer_positions += T * (b[k] - (b[k - 1] if k else -1))
        if k + 1 < len(self.filled):
            prev = self.pending[k]
            self.pending[k] = (state, idx) if prev is None else (TrunkState.cat([prev[0], state]),
                                                                 torch.cat([prev[1], idx], 1))
        return h[:, -1]

    def stage(self, k: int, tok: torch.Tensor, prev: Exits | None, heads: list[torch.Tensor],
              thresholds: torch.Tensor, finished: torch.Tensor) -> tuple[Exits, bool]:
        """Stage k of a lazy step and the rule after it: (exits, whether the batch stops here: every row
        exited or finished, or the last stage)."""
        h = self.run_stage(k, tok if k == 0 else None)
        K = len(self.filled)
        with one_row_matmuls(self.model, h.size(0)):
            logp = stage_logprobs(self.model, h, k, heads[k])
        ex = exit_step(prev, logp, k, thresholds[k] if k < K - 1 else None)
        return ex, k == K - 1 or bool((ex.done | finished).all())

    def step(self, tok, heads, thresholds, finished) -> Exits:
        """One lazy step: tokens tok (B,) stage by stage until the batch stops."""
        ex = None
        for k in range(len(self.filled)):
            ex, stop = self.stage(k, tok, ex, heads, thresholds, finished)
            if stop:
                return ex

    def advanced(self) -> None:
        """A deep step ran one position per row through every layer (nothing was pending)."""
        self.filled = [n + 1 for n in self.filled]
        self.layer_positions += self.model.config.n_layer

    def flush(self) -> None:
        """Run every pending position through the remaining stages: the cache then holds every layer of
        every position fed so far, as a full prefill of the same tokens would."""
        for k in range(1, len(self.filled)):
            if self.pending[k - 1] is not None:
                self.run_stage(k)


# --- the deep path -----------------------------------------------------------------------------------------

class WandStep:
    """The deep step: one token per row through every stage in one pass, then the exit rule; (2, B) out:
    each row's token and exit stage. It is the engine's `DecodeStep` (fixed shapes, full-view cache,
    compiled on the fast path) with the rule as its head, the thresholds a tensor argument so one graph
    serves every safety and bound. Holds its cache, which the lazy path shares, and the pass costs
    measured for its shape."""

    def __init__(self, model, batch: int, max_len: int, compiler: Compiler | None, full_view: bool = True):
        self.model = model
        self.step = DecodeStep(model, StageMix.full(model.config.n_stages), batch, max_len, compiler,
                               head=self.exits, full_view=full_view)
        self.cache, self.heads = self.step.cache, self.step.heads
        self.costs: Costs | None = None

    def exits(self, hs: list[torch.Tensor], heads: list[torch.Tensor], thresholds) -> torch.Tensor:
        ex = exit_rule([stage_logprobs(self.model, h, k, w) for k, (h, w) in enumerate(zip(hs, heads))], thresholds)
        return torch.stack([ex.token, ex.stage])

    def __call__(self, tok: torch.Tensor, pos, thresholds: torch.Tensor) -> torch.Tensor:
        with one_row_matmuls(self.model, tok.size(0)):
            return self.step(tok, pos, thresholds)


def wand_step(model, batch: int, need: int) -> WandStep:
    """The model's cached deep step on the fast path, else an eager one with a cache sized to `need`."""
    if fast_path(model) is not None:
        max_len = step_slots(model, need)
        return cached_step(model, ("wand", batch, max_len), lambda compiler: WandStep(model, batch, max_len, compiler))
    return WandStep(model, batch, need, None, full_view=False)


# --- choosing the path -------------------------------------------------------------------------------------

DECAY = 0.97   # the exit-stage distribution forgets with a half-life of ~23 steps: it follows the text


@dataclass
class Costs:
    """Seconds of a lazy stage pass (stage k for one token per row: its layers, head and exit check) and of
    a deep step, measured for one shape; and the running distribution of the stage the batch stops at
    (decayed counts, starting uniform)."""
    stage: list[float]
    deep: float
    counts: list[float]

    def expected_lazy(self) -> float:
        """Expected seconds of a lazy step: stages 0..e for the stop stage e, over its distribution."""
        return sum(c * s for c, s in zip(self.counts, accumulate(self.stage))) / sum(self.counts)

    def choose(self, lowest_pending: int | None) -> str:
        """The cheaper path for the next step. A deep step first runs what is pending (the stages after the
        shallowest pending one, once each); a lazy step runs it with its token as it goes deeper."""
        flush = 0.0 if lowest_pending is None else sum(self.stage[lowest_pending + 1:])
        return "deep" if self.deep + flush < self.expected_lazy() else "lazy"

    def observe(self, stage: int) -> None:
        self.counts = [c * DECAY for c in self.counts]
        self.counts[stage] += 1.0


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_costs(model, step: WandStep, starts: list[int], thresholds: torch.Tensor, repeats: int = 3) -> Costs:
    """Time each lazy stage pass and the deep step (the best of `repeats`, after a warm-up that also
    compiles), running the real passes on the step's cache at the rows' first decode positions. Called
    before the prefill: every slot they write is written again before anything reads it."""
    K, B = model.config.n_stages, len(starts)
    device = model.rope_cos.device
    tok = torch.zeros(B, dtype=torch.long, device=device)
    never = torch.full_like(thresholds, math.inf)            # no row exits: every stage runs and checks
    none = torch.zeros(B, dtype=torch.bool, device=device)
    stage, deep = [math.inf] * K, math.inf
    for rep in range(repeats + 1):
        scratch, ex = LazyDepth(model, step.cache, starts), None
        for k in range(K):
            t0 = _clock(device)
            ex, _ = scratch.stage(k, tok, ex, step.heads, never, none)
            if rep:
                stage[k] = min(stage[k], _clock(device) - t0)
        t0 = _clock(device)
        step(tok, deep_positions(scratch, step.cache), thresholds).tolist()
        if rep:
            deep = min(deep, _clock(device) - t0)
    return Costs(stage, deep, [1.0] * K)


_EAGER_COSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def step_costs(model, step: WandStep, starts: list[int], thresholds: torch.Tensor) -> Costs:
    """The costs for this step's shape, measured on first use: kept with the cached step on the fast path,
    per (batch, cache slots) for the model's eager steps (whose caches are made per generation)."""
    if fast_path(model) is not None:
        if step.costs is None:
            step.costs = measure_costs(model, step, starts, thresholds)
        return step.costs
    p = model.lm_head.weight
    key = (len(starts), step_slots(model, step.cache.max_len), p.dtype, p.device)
    known = _EAGER_COSTS.setdefault(model, {})
    if key not in known:
        known[key] = measure_costs(model, step, starts, thresholds)
        while len(known) > MAX_STEPS:
            known.pop(next(iter(known)))
    return known[key]


def deep_positions(lazy: LazyDepth, cache):
    """Each row's next position for the deep step: a (B,) tensor (an int for aligned rows on an eager cache)."""
    if lazy.aligned and not cache.full_view:
        return lazy.starts[0] + lazy.filled[0]
    return lazy.start_pos + lazy.filled[0]


# --- generation --------------------------------------------------------------------------------------------

@torch.no_grad()
def wand_steps(model, rows: list[list[int]], max_new_tokens: int, safety: float, p99_bounds,
               eos_token_id: int | None, gen: Generation, path: str | None = None):
    """Yield each row's new token per step, every row of the batch at once; `gen` collects tokens, exit
    stages and layer counts. `path` ("lazy" / "deep") forces every step's path (default: `FORCE_PATH`,
    else the cost model). Returns the LazyDepth walker, whose `flush` completes the cache."""
    cfg = model.config
    K, b = cfg.n_stages, cfg.boundaries
    bounds = check_bounds(K, safety, p99_bounds)
    check_prompts(model, rows, max_new_tokens)
    path = FORCE_PATH if path is None else path
    if path is not None and path not in PATHS:
        raise PoEError(f"WAND path must be one of {', '.join(PATHS)} or None, got {path!r}")
    B = len(rows)
    gen.tokens, gen.stages_used = [[] for _ in rows], [[] for _ in rows]
    gen.extra = {"layers_per_token": 0.0, "exit_layers_per_token": 0.0, "deep_fraction": 0.0}
    if max_new_tokens == 0:
        return None
    device = model.rope_cos.device
    starts = [len(r) for r in rows]
    step = wand_step(model, B, max(starts) + max_new_tokens)
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)     # the log-probs' dtype
    thresholds = torch.tensor([safety * x for x in bounds], dtype=dtype, device=device)
    costs = step_costs(model, step, starts, thresholds)
    out = step.exits(prefill(model, step.cache, rows, K), step.heads, thresholds)   # every prompt ran every stage
    lazy = LazyDepth(model, step.cache, starts)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    done = [False] * B
    layers = positions = steps = deep = exit_layers = emitted = 0
    for n in range(max_new_tokens):
        if n:                                   # feed every row its last token (a finished row: EOS again)
            active = done.count(False)
            tok = torch.where(finished, eos_token_id, out[0]) if any(done) else out[0]
            choice = path or costs.choose(lazy.lowest_pending())
            before = lazy.layer_positions
            if choice == "deep":
                lazy.flush()
                out = step(tok, deep_positions(lazy, step.cache), thresholds)
                lazy.advanced()
                deep += 1
            else:
                ex = lazy.step(tok, step.heads, thresholds, finished)
                out = torch.stack([ex.token, ex.stage])
            layers += (lazy.layer_positions - before) * active
            positions += active
            steps += 1
        tokens, stages = out.tolist()
        new, stop = [], 0
        for r in range(B):
            if done[r]:
                new.append([])
                continue
            gen.tokens[r].append(tokens[r])
            gen.stages_used[r].append(stages[r])
            new.append([tokens[r]])
            stop = max(stop, stages[r])
            exit_layers += b[stages[r]] + 1
            emitted += 1
            if tokens[r] == eos_token_id:
                done[r] = True
                finished[r] = True
        costs.observe(stop)
        gen.extra = {  # layers run per decode position (lazy fills included), the depth tokens exited at, deep steps
            "layers_per_token": layers / max(positions, 1), "exit_layers_per_token": exit_layers / max(emitted, 1),
            "deep_fraction": deep / max(steps, 1)}
        yield new
        if all(done):
            break
    step.cache.reset([s + lazy.filled[0] for s in starts])     # tokens embedded; `flush` completes their layers
    return lazy


@torch.no_grad()
def measure_bounds(model, batches, quantile: float = 0.99, max_positions: int = 200_000) -> dict:
    """p99 of R_j per stage j < K-1 over a validation stream, plus the margins' own statistics."""
    K = model.config.n_stages
    Rs = [[] for _ in range(K - 1)]
    n = 0
    for x, _ in batches:
        logps = [lp.flatten(0, 1) for lp in model.stage_logprobs(x)]          # K × (N, V)
        S = torch.zeros_like(logps[0])
        suffix = torch.stack(logps).flip(0).cumsum(0).flip(0)                    # suffix[j] = Σ_{i>=j} log p_i
        for j in range(K - 1):
            S = S + logps[j]
            a = S.argmax(-1, keepdim=True)
            rest = suffix[j + 1]
            Rs[j].append((rest - rest.gather(-1, a)).max(-1).values)
        n += x.numel()
        if n >= max_positions:
            break
    bounds = []
    for j in range(K - 1):
        r = torch.cat(Rs[j]).double()
        bounds.append(float(torch.quantile(r, quantile)) if r.numel() else math.inf)
    return {"wand_p99_bounds": bounds, "quantile": quantile, "positions": n}
