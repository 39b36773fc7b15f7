"""Self-speculative decoding: the first stages draft, the rest of the trunk verifies.

The draft is the prefix PoE of stages 0..d. It runs layers 0..b_d one token at a time in the same
KV cache the verifier uses (one cache, no second model). The verifier then runs layers b_d+1..L-1
over the pending token and all drafted tokens in one pass, forms the full-PoE distribution at each
position, and accepts the longest agreeing prefix plus one token of its own (the correction, or the
bonus when every draft was accepted). Rows of a batch accept different numbers of drafts: each row
commits its own count and its rejected positions sit past its cache length, overwritten before
anything reads them. A cycle (k+1 draft passes, one verify pass, the acceptance) runs on the device
with fixed shapes; the host reads the emitted tokens once per cycle.

Greedy: a draft is accepted iff it is the full-PoE argmax, so the output equals full greedy.
Sampling: a draft d drawn from q is accepted with probability min(1, p(d)/q(d)); on rejection
the token is drawn from normalise(max(0, p − q)); p and q are the filtered (temperature / top-k /
top-p) full and draft distributions, so the output is distributed exactly as full-PoE sampling.

The verifier is full PoE (`verifier="poe"`) or the last stage alone (`verifier="dense"`: the dense
model a nanochat import is, kept exact by `poegpt adapt --train heads`); p above is then stage K-1's
distribution, so greedy output equals `generate_stage(ids, K-1)` and sampling follows stage K-1's.

Adaptive, never losing (`fallback="auto"`, the default): before every cycle a cost model compares
speculating k tokens, at τ(α, k) = (1 − α^{k+1}) / (1 − α) expected tokens per row for a cycle of
(k+1)·c_draft + c_verify(k), with a plain step of the verifier (one token per c_plain); it drafts
only when that promises 5 % more tokens per second, so a configuration that would lose decodes
plainly instead. Acceptance comes in bursts, not independently per token, so τ over-promises: once
cycles ran, τ is scaled by the tokens they emitted over what it promised, and a (d, k) that ran is
judged by its own recent yield. The c's are measured wall times (whole cycles and plain steps where timed, else
the passes; kept per model and batch size for the process, see `PassCosts`); α is this generation's
running acceptance, its prior the agreement of the draft stage with the verifier measured by every
earlier verify pass (or by `poegpt calibrate`). `k_draft="auto"` also picks k, and
`draft_stage="auto"` the draft stage, from the same model. The output is the same whichever plan
runs (greedy: identical tokens; sampling: exactly the verifier's distribution at every token); only
a seeded sampled generation keeps one fixed plan, so that its seed reproduces it.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import new_cache
from .engine import (Compiler, Generation, Sampling, StageMix, cached_step, check_prompts, compiled, fast_path,
                     one_row_matmuls, pick, prefill, sampling_logprobs, step_slots, to_rows)
from .errors import PoEError
from .logop import logop
from .model import TrunkState

AUTO_DRAFTS = (1, 2, 3, 4, 6, 8)   # the lengths k_draft="auto" picks from (the fast path compiles a verify per length)
FIRST_K = 3                        # auto's first cycle, before any cost is measured
VERIFIERS = ("poe", "dense")
FALLBACKS = ("auto", "never")
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.6, 12.0  # a draft stage's agreement before any verify measured it, worth 12 drafts
FORGET = 0.97                      # per cycle: the running acceptance follows the text, over ~30 cycles (not bursts)
FADE = 0.9                         # per plain step: what cycles showed of the text fades back to the prior
PROBE_EVERY = 32                   # plain steps before a probe cycle re-measures the acceptance (doubling after each)
RETIME = 16                        # cycles (over generations) before two plain steps re-time the yardstick
MARGIN = 0.05                      # drafting must promise 5 % more tokens/s than plain steps: never lose to noise
EXPLORE = 0.25                     # ... and 25 % for a (d, k) never timed on the fast path (its first call compiles)
REPLAN = 8                         # plain steps between two plans (a plan costs ~50 µs of Python per step)
WINDOW = 9                         # a pass's cost: the median of its last 9 times (machines drift and get preempted)
MEASURE = 10                       # on a GPU, where timing needs a sync, calls timed per pass shape (then it stops)


def verifier_mix(K: int, verifier: str, alpha: float = 0.0) -> StageMix:
    """The distribution the verifier accepts against: full PoE, or stage K-1 alone (dense)."""
    return StageMix.single(K, K - 1) if verifier == "dense" else StageMix.full(K, alpha)


def expected_tokens(alpha: float, k: int) -> float:
    """τ(α, k): tokens a row emits per cycle of k drafts accepted each with probability α (plus the verifier's own)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


class SpeculativeStep:
    """The passes of self-speculative decoding at fixed shapes over one cache, for `torch.compile`
    (as the engine's DecodeStep): a full-view cache (every row writes at its own device positions
    and attends over every slot under a position mask) and the summed head weights taken once.
    `draft(d)`: one token per row through stages 0..d; `verify(d)`: k+1 tokens per row through the
    rest, then the verifier's log-probs (full PoE, or stage K-1 alone) and, for a full-PoE verifier,
    how often each prefix of stages agrees with it; `plain`: one token through every stage (the
    fallback). Every draft stage shares the cache, so a generation may change stage between cycles.
    Passes compile on first use (a verify per k; a k outside `compiled_ks` runs the same code eagerly).
    Without `compile_decode` the same passes run eagerly on a cache sized to the generation."""

    def __init__(self, model, batch: int, max_len: int, compiler: Compiler | None, full_view: bool = True,
                 verifier: str = "poe", compiled_ks: tuple[int, ...] = ()):
        K = model.config.n_stages
        self.model, self.compiler, self.compiled_ks = model, compiler, set(compiled_ks)
        self.cache = new_cache(model, batch, max_len)    # the passes use whatever cache is set here
        self.cache.full_view = full_view
        self.verify_mix = verifier_mix(K, verifier, model.config.poe_alpha)
        self.agreement = verifier == "poe"
        self.heads = [model.head_weight(j) for j in range(K)]
        self._draft, self._verify = {}, {}
        self.plain = compiled(self._plain, compiler)

    def draft(self, d: int):
        if d not in self._draft:
            self._draft[d] = compiled(lambda tok, pos: self._draft_pass(d, tok, pos), self.compiler)
        return self._draft[d]

    def verify(self, d: int, k: int):
        key = (d, k in self.compiled_ks)
        if key not in self._verify:
            fn = lambda *args: self._verify_pass(d, *args)   # noqa: E731
            self._verify[key] = compiled(fn, self.compiler) if key[1] else fn
        return self._verify[key]

    def _draft_pass(self, d: int, tok: torch.Tensor, pos: torch.Tensor):
        """tok (B,) at pos (B,) through stages 0..d: (x, x0, x_mid, each stage's log-probs (d+1, B, V),
        the draft's Log-OP log-probs (B, V)). The verify pass takes the stages' log-probs as they are:
        the draft passes already ran stages 0..d's heads at every position it verifies."""
        state, hs = self.model.walk(tok[:, None], None, 0, d + 1, pos[:, None], self.cache)
        logps = [F.log_softmax(self.model.stage_logits(h[:, -1], j, self.heads[j]), -1) for j, h in enumerate(hs)]
        return state.x, state.x0, state.x_mid, torch.stack(logps), logop(logps)

    def _verify_pass(self, d: int, x, x0, x_mid, shallow: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor):
        """Stages d+1.. over idx (B, T) at pos (B, T), with stages 0..d's log-probs at those positions
        from the draft passes (`shallow`, (d+1, B, T, V)): the verifier's log-probs (B, T, V); per
        draft stage d' < K-1, how many of the B·T positions its prefix argmax equals the verifier's
        (K-1,), or None for a dense verifier; and greedy acceptance (`accept_greedy`), in the pass.
        Taking the shallow heads from the drafts saves d+1 head matmuls at T rows (at T = 4 each costs
        ~3x its one-row time on the demo in bf16: 345 vs 121 µs, AVX512_BF16 host)."""
        K = self.model.config.n_stages
        _, deep = self.model.walk(idx, TrunkState(x, x0, x_mid), d + 1, K, pos, self.cache)
        mix = self.verify_mix
        if not self.agreement:   # stage K-1 alone: the deepest head only
            p = mix.logprobs(self.model, {K - 1: deep[-1]}, [self.heads[K - 1]])
            return p, None, *accept_greedy(p.argmax(-1), idx)
        logps = list(shallow.unbind(0)) + [F.log_softmax(self.model.stage_logits(h, j, self.heads[j]), -1)
                                           for j, h in enumerate(deep, d + 1)]
        p = mix.combine(logps)
        top = p.argmax(-1)
        # per prefix 0..d': how often its Log-OP argmax (that of the summed log-probs) is the verifier's; the
        # running sum, not a cumsum over stacked log-probs (an unfused 42 µs of a 1.2 ms verify, demo bf16)
        running, agree = None, []
        for lp in logps[:-1]:
            running = lp if running is None else running + lp
            agree.append((running.argmax(-1) == top).sum())
        return p, torch.stack(agree), *accept_greedy(top, idx)

    def _plain(self, tok: torch.Tensor, pos) -> torch.Tensor:
        """tok (B,) at pos ((B,), or an int when the rows are aligned off the full view)."""
        pos = pos if isinstance(pos, int) else pos[:, None]
        _, hs = self.model.walk(tok[:, None], None, 0, self.model.config.n_stages, pos, self.cache)
        return self.logprobs([h[:, -1] for h in hs])

    def logprobs(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """The verifier's log-probs from every stage's boundary states at one position per row [(B, d)]."""
        mix = self.verify_mix
        return mix.logprobs(self.model, hs, [self.heads[j] for j in mix.stages])


@dataclass
class PassCosts:
    """What the cost model knows of one model at one batch size and verifier: the wall time of each
    pass ("plain"; ("draft", d); ("verify", d, k)) and of whole steps (("step",): a plain step with its
    pick and host work; ("cycle", d, k)), and each draft stage's agreement with the verifier counted
    by the verify passes. The first call of a shape is not counted (it compiles); the cost is the median
    of the last WINDOW times: a preempted call does not move it, it follows a machine that drifts, and it
    is as typical a time for a whole cycle (k+2 calls) as for a one-call plain step, where a best time
    favours whichever spreads wider (measured: the rows moved within the benches' spread, except fp32
    auto at batch 1, 1.35 -> 1.55x full; docs/benchmarks.md). On a CPU timing is free; on a GPU it needs a
    sync, so it stops after MEASURE calls."""
    seconds: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)       # key -> the last WINDOW times
    agree: dict = field(default_factory=dict)         # d -> [agreeing positions, positions]
    yields: dict = field(default_factory=dict)        # (d, k) -> [tokens per row per cycle, cycles], forgetting
    realism: list = field(default_factory=lambda: [0.0, 0.0])   # [tokens emitted, tokens τ(α, k) promised]
    since_step: int = 0                               # cycles planned since plain steps last re-timed the yardstick
    compiles: bool = True                             # the fast path: a shape's first call compiles

    def timing(self, key, device) -> bool:
        return device.type != "cuda" or self.calls.get(key, 0) <= MEASURE

    def note(self, key, seconds: float) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] == 1:
            return
        times = self.samples.setdefault(key, deque(maxlen=WINDOW))
        times.append(seconds)
        self.seconds[key] = statistics.median(times)

    def note_agreement(self, counts: list[int], positions: int) -> None:
        for d, n in enumerate(counts):
            a = self.agree.setdefault(d, [0.0, 0.0])
            a[0], a[1] = a[0] + n, a[1] + positions

    def note_yield(self, d: int, k: int, tokens: float, promised: float) -> None:
        """A cycle's tokens per row, and what τ(α, k) had promised for it."""
        y = self.yields.setdefault((d, k), [0.0, 0.0])
        y[0], y[1] = FORGET * y[0] + tokens, FORGET * y[1] + 1
        r = self.realism
        r[0], r[1] = FORGET * r[0] + tokens, FORGET * r[1] + promised

    def agreement(self, d: int, prior: float = PRIOR_ACCEPTANCE) -> float:
        a, n = self.agree.get(d, (0.0, 0.0))
        return (a + PRIOR_WEIGHT * prior) / (n + PRIOR_WEIGHT)


_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def pass_costs(model, key: tuple) -> PassCosts:
    """The model's cost record for `key` (fast path or eager, batch size, verifier, dtype)."""
    costs = _COSTS.setdefault(model, {})
    if key not in costs:
        costs[key] = PassCosts(compiles=key[0])
    return costs[key]


_SHARES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weight_shares(model) -> dict:
    """The share of a plain step's matmul weights each pass reads: ("draft", d) stages 0..d and their
    heads, ("verify", d) the rest and every head. The cost model's guess for a pass not yet timed
    (scaled by what the timed ones showed); counted once per model (it walks every module)."""
    if model not in _SHARES:
        cfg = model.config
        b, head = cfg.boundaries, cfg.padded_vocab_size * cfg.n_embd
        layers = [model._layer_matmul_params(i) for i in range(cfg.n_layer)]
        total = sum(layers) + cfg.n_stages * head
        _SHARES[model] = {**{("draft", d): (sum(layers[: b[d] + 1]) + (d + 1) * head) / total
                             for d in range(cfg.n_stages - 1)},
                          **{("verify", d): (sum(layers[b[d] + 1:]) + cfg.n_stages * head) / total
                             for d in range(cfg.n_stages - 1)}}
    return _SHARES[model]


class Planner:
    """Each cycle's plan: which draft stage, how many drafts, or 0 for a plain step of the verifier."""

    def __init__(self, model, costs: PassCosts, draft_stage, k_draft, adapt: bool):
        self.model, self.costs, self.adapt = model, costs, adapt
        self.stages = list(range(model.config.n_stages - 1)) if draft_stage == "auto" else [draft_stage]
        self.ks = AUTO_DRAFTS if k_draft == "auto" else (k_draft,)
        self.shares = weight_shares(model)
        self.accepted, self.drafted = 0.0, 0.0          # this generation's running counts (forgetting)
        self.plain_run, self.probe_every = 0, PROBE_EVERY
        self.priors = [model.calibration.draft_agreement(d, PRIOR_ACCEPTANCE) for d in range(model.config.n_stages - 1)]
        self.held = 0                                   # plain steps left before the next plan

    def alpha(self, d: int) -> float:
        prior = self.costs.agreement(d, self.priors[d])
        return (self.accepted + PRIOR_WEIGHT * prior) / (self.drafted + PRIOR_WEIGHT)

    def tokens(self, d: int, k: int, alpha: float) -> float:
        """Tokens a row emits per cycle of (d, k): τ(α, k) times how the cycles so far kept τ's promise
        (acceptance is bursty, not independent per token: τ over-promises), and for a (d, k) that ran,
        its own recent yield, τ's estimate counting as one cycle."""
        r = self.costs.realism
        guess = expected_tokens(alpha, k) * (min(1.0, r[0] / r[1]) if r[1] else 1.0)
        y = self.costs.yields.get((d, k))
        return guess if y is None else (y[0] + guess) / (y[1] + 1)

    def cost(self, key, scale: float) -> float | None:
        """Measured seconds of a pass, else its weight share of a plain step, times `scale`."""
        c = self.costs.seconds
        if key in c:
            return c[key]
        plain = c.get(("plain",))
        return None if plain is None else scale * plain * self.shares[key[:2]]

    def scale(self) -> float:
        """How the timed passes compare with their weight share of a plain step (1.0 before any is timed):
        the median ratio, as one odd pass must not move every guess (demo bf16, batch 8: a verify of
        k = 2 that ran eagerly once, near a generation's end, was timed at 297 ms, 60x its share)."""
        c = self.costs.seconds
        plain = c.get(("plain",))
        ratios = [t / (plain * self.shares[k[:2]]) for k, t in c.items() if k[0] in ("draft", "verify")] if plain else []
        return statistics.median(ratios) if ratios else 1.0

    def overhead(self) -> float:
        """How whole timed cycles compare with the sum of their passes (acceptance, host work; 1.0 before any)."""
        c = self.costs.seconds
        r = [t / ((k[2] + 1) * c[("draft", k[1])] + c[("verify", k[1], k[2])]) for k, t in c.items()
             if k[0] == "cycle" and ("draft", k[1]) in c and ("verify", k[1], k[2]) in c]
        return sum(r) / len(r) if r else 1.0

    def cycle_cost(self, d: int, k: int, scale: float, overhead: float) -> float:
        """A whole cycle's seconds: measured, else its passes' (measured or guessed) times the overhead."""
        c = self.costs.seconds
        if ("cycle", d, k) in c:
            return c[("cycle", d, k)]
        return overhead * ((k + 1) * self.cost(("draft", d), scale) + self.cost(("verify", d, k), scale))

    def choose(self, room: int) -> tuple[int, int]:
        """(draft stage, k); k = 0 is a plain step."""
        d0 = self.stages[0]
        ks = [k for k in self.ks if k <= room] or ([min(self.ks[0], room)] if room > 0 and len(self.ks) == 1 else [])
        if not ks:
            return d0, 0
        first = (d0, FIRST_K if FIRST_K in ks else ks[0])
        if not self.adapt:
            return first
        c = self.costs.seconds
        plain = c.get(("step",))                      # a whole plain step: its pass, the pick, the host work
        if plain is None or ("plain",) not in c:      # the yardstick: time it first
            return d0, 0
        if self.held > 0:
            self.held -= 1
            return d0, 0
        best, plan, scale, overhead = 1.0 / plain, (d0, 0), self.scale(), self.overhead()
        for d in self.stages:
            alpha = self.alpha(d)
            for k in ks:
                # an untried shape must promise more only where trying it compiles: eager, the guess
                # held a fresh demo process plain (bf16 b1: a d0 k2 cycle guessed 1.06x, measured 1.17x)
                margin = 1 + (MARGIN if ("cycle", d, k) in c or not self.costs.compiles else EXPLORE)
                rate = self.tokens(d, k, alpha) / self.cycle_cost(d, k, scale, overhead)
                if rate > best * margin:
                    best, plan = rate / margin, (d, k)
        if plan[1] == 0:
            self.costs.since_step = 0
            self.held = REPLAN - 1                   # the next REPLAN - 1 steps are plain without planning
            self.fade(REPLAN)
            self.plain_run += REPLAN
            # now and then a cycle, so that the acceptance can recover; at once while no verify has
            # measured any (the prior alone kept a fresh demo process plain)
            if self.plain_run >= (self.probe_every if self.costs.agree else REPLAN):
                self.plain_run, self.probe_every = 0, 2 * self.probe_every
                # of the shapes whose passes are timed (a new one compiles its passes: a stall of 0.1-1 s),
                # one that would pay at the acceptance a probe can hope for (`hopeful`), the best at the
                # running acceptance. Not the shortest: a k = 1 probe could never pay (demo bf16 b1: 2
                # tokens in 2.3 steps' time) and, once run, was the only shape probed, so the prior stood.
                ready = [(d, k) for d in self.stages for k in ks if ("draft", d) in c and ("verify", d, k) in c]
                pays = [(d, k) for d, k in ready if expected_tokens(self.hopeful(d), k)
                        / self.cycle_cost(d, k, scale, overhead) > (1 + MARGIN) / plain]
                if pays:
                    return max(pays, key=lambda dk: self.tokens(*dk, self.alpha(dk[0])) / self.cycle_cost(*dk, scale, overhead))
                if not ready:
                    return (min(self.stages, key=lambda d: self.cost(("draft", d), scale)),
                            FIRST_K if FIRST_K in ks else max(ks))
        else:
            self.plain_run, self.probe_every = 0, PROBE_EVERY
            self.costs.since_step += 1
            if self.costs.since_step >= RETIME:      # now and then two plain steps (the second is timed), so
                self.costs.since_step = 0            # that the yardstick is as recent as the cycles it is
                self.held = 1                        # compared with, over however many generations they span
                return d0, 0
            # τ takes acceptances as independent; on bursty text longer drafts yield more than it says, so
            # a paying plan tries the next longer k once per RETIME cycles until that k's cycles are timed
            # and its own yield judges it (without: fp32 b1 auto kept k = 3, 1.34x full; k = 6 cycles had
            # emitted 6.3 tokens where tau(0.85, 6) = 4.6, 1.49-1.55x)
            d, k = plan
            longer = [j for j in ks if j > k and ("verify", d, j) in c]
            if longer and ("cycle", d, longer[0]) not in c and self.costs.since_step == RETIME // 2:
                return d, longer[0]
        return plan

    def hopeful(self, d: int) -> float:
        """The acceptance a probe of stage d can hope to find: every draft accepted while no verify has
        measured the stage, narrowing with the positions measured to half of today's rejections
        accepted (the text turned easier). Not every draft once measured: demo bf16 b1, a d2 k8 cycle
        pays only then, and probing it at every generation's 32nd plain step cost d2 rows 2-3 %."""
        n = self.costs.agree.get(d, (0.0, 0.0))[1]
        return 1 - (1 - self.alpha(d)) * n / (2 * (n + PRIOR_WEIGHT))

    def fade(self, steps: int) -> None:
        """Plain steps show nothing of how drafts would fare: the acceptance and yields measured before
        them fade (FADE per step) towards the prior, so that a burst of rejections does not keep a
        generation plain for the rest of a short generation when drafting pays on the text at large
        (demo, fp32, b1, d0 k3: two rejecting cycles at a prompt's start kept it plain for 24+ steps)."""
        f = FADE ** steps
        self.accepted, self.drafted = f * self.accepted, f * self.drafted
        for y in self.costs.yields.values():
            y[0], y[1] = f * y[0], f * y[1]

    def update(self, d: int, k: int, accepted: int, rows: int, tokens: float | None = None) -> None:
        """After a cycle of (d, k): `accepted` drafts over `rows` rows; `tokens`, what the cycle
        advanced the generation by, where that is not the rows' mean (1 + accepted / rows)."""
        self.costs.note_yield(d, k, 1 + accepted / rows if tokens is None else tokens, expected_tokens(self.alpha(d), k))
        self.accepted = FORGET * self.accepted + accepted
        self.drafted = FORGET * self.drafted + k * rows


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(costs: PassCosts, key, device, fn, *args):
    """fn(*args), its wall time noted while the pass is still being measured (then, on a GPU, a sync)."""
    if not costs.timing(key, device):
        return fn(*args)
    t0 = _clock(device)
    out = fn(*args)
    costs.note(key, _clock(device) - t0)
    return out


def accept_greedy(top: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance per row from the verifier's argmax `top` (B, k+1) at the pending position and
    each draft: how many drafts equal it in a row (m, (B,)) and the verifier's next token (B,)."""
    k = idx.size(1) - 1
    m = (idx[:, 1:] == top[:, :k]).long().cumprod(1).sum(1)
    return m, top.gather(1, m[:, None]).squeeze(1)


def accept_sampled(p: torch.Tensor, idx: torch.Tensor, draft_logps: list[torch.Tensor],
                   generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled acceptance per row: how many drafts are accepted (m) and the verifier's own next token.

    p: (B, k+1, V) filtered verifier log-probs at the pending position and each draft; idx: (B, k+1)
    the pending token then the drafts; draft_logps[j]: (B, V) the distribution draft j+1 was drawn from.
    Draft t is accepted with probability min(1, p(t)/q(t)); a rejected row draws from max(0, p − q)."""
    B, k = idx.size(0), idx.size(1) - 1
    rows = torch.arange(B, device=idx.device)
    drafts = idx[:, 1:]                                                         # (B, k)
    q = torch.stack(draft_logps, 1)                                             # (B, k, V)
    ratio = (p[:, :k].gather(-1, drafts[..., None]) - q.gather(-1, drafts[..., None])).squeeze(-1).exp()
    ok = torch.rand(B, k, generator=generator, device=idx.device) < ratio
    m = ok.long().cumprod(1).sum(1)                                             # (B,)
    probs = p[rows, m].exp()
    resid = (probs - q[rows, m.clamp(max=k - 1)].exp()).clamp(min=0)
    resid = resid / resid.sum(-1, keepdim=True).clamp(min=1e-30)
    probs = torch.where((m < k)[:, None], resid, probs)
    return m, torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_speculative_args(K: int, draft_stage, k_draft, verifier: str = "poe", fallback: str = "auto") -> None:
    if draft_stage != "auto" and (isinstance(draft_stage, bool) or not isinstance(draft_stage, int)
                                  or not 0 <= draft_stage <= K - 2):
        raise PoEError(f"draft_stage must be an integer in 0..{K - 2} (below the last stage) or 'auto', "
                       f"got {draft_stage!r}")
    if k_draft != "auto" and (isinstance(k_draft, bool) or not isinstance(k_draft, int) or k_draft < 1):
        raise PoEError(f"k_draft must be an integer >= 1 or 'auto', got {k_draft!r}")
    if verifier not in VERIFIERS:
        raise PoEError(f"verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
    if fallback not in FALLBACKS:
        raise PoEError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")


@torch.no_grad()
def generate_speculative(model, ids, draft_stage: int | str = 0, k_draft: int | str = 3, max_new_tokens: int = 32,
                         sampling: Sampling = Sampling(), eos_token_id: int | None = None, verifier: str = "poe",
                         fallback: str = "auto") -> Generation:
    gen = Generation([])
    for _ in speculative_steps(model, to_rows(ids), draft_stage, k_draft, max_new_tokens, sampling, eos_token_id,
                               gen, verifier, fallback):
        pass
    return gen


def _step(model, B: int, capacity: int, k_draft, verifier: str) -> SpeculativeStep:
    """The model's cached fast-path step for this batch and cache size, or an eager one for this generation."""
    if fast_path(model) is None:
        return SpeculativeStep(model, B, capacity, None, full_view=False, verifier=verifier)
    max_len = step_slots(model, capacity)
    ks = AUTO_DRAFTS if k_draft == "auto" else (k_draft,)
    return cached_step(model, ("speculative", B, max_len, verifier, ks),
                       lambda compiler: SpeculativeStep(model, B, max_len, compiler, verifier=verifier, compiled_ks=ks))


class Speculator:
    """One generation's plan-draft-verify-accept cycles over a cache it is given (the step's own, or a
    row of the server's batch): `cycle(cache, pending)` runs one cycle, or one plain step of the
    verifier when the planner says drafting would not pay, and returns (idx, m, last, k): the pending
    token and k drafts (B, k+1), how many drafts each row accepts (B,) and its next token (B,)."""

    def __init__(self, model, step: SpeculativeStep, batch: int, draft_stage, k_draft, sampling: Sampling,
                 verifier: str, fallback: str, generator):
        self.model, self.step, self.sampling, self.generator = model, step, sampling, generator
        self.device = model.rope_cos.device
        fast = fast_path(model) is not None and step.compiler is not None
        self.costs = pass_costs(model, (fast, batch, verifier, next(model.parameters()).dtype))
        # a seeded sampled generation keeps one plan: measured costs vary from run to run, its seed must not
        adapt = fallback == "auto" and (sampling.greedy or sampling.seed is None)
        self.planner = Planner(model, self.costs, draft_stage, k_draft, adapt)
        self.draft_stages = [0] * (model.config.n_stages - 1)
        self.after_plain = False      # whether this generation's last step was a plain one

    @torch.no_grad()
    def cycle(self, cache, pending: torch.Tensor, room: int):
        d, k = self.last = self.planner.choose(room)
        # The yardstick is a plain step that follows a plain step, as plain decoding runs them. One right
        # after a cycle costs ~4 % more (demo bf16, batch 1 and 8), and measured only there (at the
        # generations' ends, between cycles), it stood 12 % above the steady step and made d2 k3 cycles
        # look worth it at batch 8, run at 0.86x full.
        key = ("cycle", d, k) if k else ("step",) if self.after_plain else None
        self.after_plain = k == 0
        if key is None:
            return self._run(d, k, cache, pending)
        return timed(self.costs, key, self.device, self._run, d, k, cache, pending)

    def _plain(self, tok: torch.Tensor, pos) -> torch.Tensor:
        """One plain step of the verifier: tok (B,) at pos (`positions`), into the step's cache; the next tokens (B,)."""
        with one_row_matmuls(self.model, tok.size(0)):
            p = timed(self.costs, ("plain",), self.device, self.step.plain, tok, pos)
        return pick(p, self.sampling, self.generator)

    def positions(self, cache):
        """Each row's next position for a plain step, (B,): in full view always a tensor (the compiled
        step's fixed shape); else as the cache places a token (`KVCache.positions`), an int where the
        rows are aligned, so that the step runs the eager engine's attention as full PoE's eager decode
        does (with a position tensor, a demo bf16 eager step ran ~12 % slower than full's)."""
        if cache.full_view:
            return torch.tensor(cache.lengths, device=self.device)
        pos = cache.positions(1, self.device)
        return pos if isinstance(pos, int) else pos[:, 0]

    def held(self, room: int) -> int:
        """After a plain step: how many more the plan holds (at most `room`), taken from the planner."""
        n = min(self.planner.held, room)
        self.planner.held -= n
        return n

    @torch.no_grad()
    def plain_steps(self, cache, pending: torch.Tensor, n: int):
        """n plain steps of the verifier as a tight loop (the plan's held steps, as full PoE decodes):
        positions advance on the device, nothing per row in Python; yields each step's tokens (B,),
        the cache advanced by one. Each whole step is timed as the planner's yardstick."""
        self.step.cache = cache
        pos, tok = self.positions(cache), pending
        for _ in range(n):
            tok = timed(self.costs, ("step",), self.device, self._plain, tok, pos)
            cache.advance(1)
            pos = pos + 1
            yield tok

    def _run(self, d: int, k: int, cache, pending: torch.Tensor):
        step, costs, sampling, device = self.step, self.costs, self.sampling, self.device
        step.cache = cache
        B = pending.size(0)
        if k == 0:   # --- a plain step of the verifier ----------------------------------------------------
            last = self._plain(pending, self.positions(cache))
            return pending[:, None], torch.zeros(B, dtype=torch.long, device=device), last, 0
        # --- draft: stages 0..d, one token at a time, writing the shared cache ------------------------------
        base = torch.tensor(cache.lengths, device=device)                  # (B,): each row's pending position
        tokens, states, shallow, draft_logps = [pending], [], [], []
        for i in range(k + 1):              # pass k readies the last draft for verification (and its heads)
            with one_row_matmuls(self.model, B):
                x, x0, x_mid, logps, q = timed(costs, ("draft", d), device, step.draft(d), tokens[-1], base + i)
            states.append(TrunkState(x, x0, x_mid))
            shallow.append(logps)
            if i < k:
                q = q if sampling.greedy else sampling_logprobs(q, sampling)
                draft_logps.append(q)
                tokens.append(q.argmax(-1) if sampling.greedy
                              else torch.multinomial(q.exp(), 1, generator=self.generator).squeeze(-1))
        # --- verify: the remaining stages over the pending token and the k drafts, in one pass --------------
        idx = torch.stack(tokens, 1)                                        # (B, k+1)
        state = TrunkState.cat(states)
        cache.stepwise = not cache.full_view   # each position as its plain step computes it (cache.py)
        try:
            p, agree, m, last = timed(costs, ("verify", d, k), device, step.verify(d, k), state.x, state.x0,
                                      state.x_mid, torch.stack(shallow, 2), idx,
                                      base[:, None] + torch.arange(k + 1, device=device))
        finally:
            cache.stepwise = False
        # --- accept: the longest prefix the verifier agrees with, then one token of its own ------------------
        if not sampling.greedy:             # greedy acceptance ran in the verify pass
            m, last = accept_sampled(sampling_logprobs(p, sampling), idx, draft_logps, self.generator)
        if agree is not None:
            costs.note_agreement(agree.tolist(), B * (k + 1))
        self.draft_stages[d] += 1
        return idx, m, last, k

    def update(self, accepted: int, rows: int, tokens: float | None = None) -> None:
        """After a cycle (not a plain step): how many drafts the `rows` rows that ran it accepted (and
        what the cycle advanced the generation by, see `Planner.update`)."""
        self.planner.update(*self.last, accepted, rows, tokens)


_ROW_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def speculator(model, draft_stage, k_draft, sampling: Sampling, verifier: str = "poe", fallback: str = "auto"):
    """Cycles for one row of a cache owned elsewhere (the server's batch, eager), or None for a seeded
    sampled row: its tokens must not depend on whether it ran alone, so it always decodes plainly."""
    check_speculative_args(model.config.n_stages, draft_stage, k_draft, verifier, fallback)
    if not sampling.greedy and sampling.seed is not None:
        return None
    key = (verifier, tuple(w._version for w in model.parameters()))
    steps = _ROW_STEPS.setdefault(model, {})
    if key not in steps:                       # the summed heads are taken once per model and weights
        steps.clear()
        steps[key] = SpeculativeStep(model, 1, 1, None, full_view=False, verifier=verifier)
    device = model.rope_cos.device
    return Speculator(model, steps[key], 1, draft_stage, k_draft, sampling, verifier, fallback,
                      sampling.generator(device))


def _generation_step(model, rows: list[list[int]], draft_stage, k_draft, max_new_tokens: int, verifier: str,
                     fallback: str = "auto") -> tuple[SpeculativeStep, int]:
    """The checked arguments' step and cache size for a generation of `rows`. The cache has no slack for
    drafts past the last token (near the end a cycle drafts what fits, or steps plainly), so it is the
    size full PoE's would be (a 64-slot-larger cache cost 1.4x per step at batch 8)."""
    check_speculative_args(model.config.n_stages, draft_stage, k_draft, verifier, fallback)
    check_prompts(model, rows, max_new_tokens)
    capacity = min(model.config.sequence_len, max(len(r) for r in rows) + max_new_tokens)
    return _step(model, len(rows), capacity, k_draft, verifier), capacity


@torch.no_grad()
def warm_speculative(model, rows, draft_stage, k_draft, max_new_tokens: int, verifier: str = "poe") -> None:
    """On the fast path, compile now every pass a generation of these prompts may plan: the plain step,
    and a draft and a verify pass for each draft stage and length in the plan's space (`draft_stage` /
    `k_draft`, "auto" spanning all). Compiling is otherwise lazy: a plan that tries a (d, k) for the first
    time stalls on its compile mid-generation (demo, fp32, batch 1: one timed run of 8 prompts x 48
    tokens went from 0.89 to 2.47 s when auto first tried k = 6 and 8). What a bench calls before
    timing, or a server before serving; off the fast path it does nothing."""
    if fast_path(model) is None:
        return
    rows = to_rows(rows)
    step, _ = _generation_step(model, rows, draft_stage, k_draft, max_new_tokens, verifier)
    B = len(rows)
    spec = Speculator(model, step, B, draft_stage, k_draft, Sampling(), verifier, "never", None)
    cache, pending = step.cache, torch.zeros(B, dtype=torch.long, device=spec.device)
    for d in spec.planner.stages:
        for k in ((0,) if d == spec.planner.stages[0] else ()) + tuple(k for k in spec.planner.ks if k < cache.max_len):
            cache.reset([0] * B)
            spec._run(d, k, cache, pending)       # a pass's first call compiles and is not counted as a cost
    cache.reset()


@torch.no_grad()
def speculative_steps(model, rows: list[list[int]], draft_stage, k_draft, max_new_tokens: int, sampling: Sampling,
                      eos_token_id: int | None, gen: Generation, verifier: str = "poe", fallback: str = "auto"):
    """Yield, per cycle (or plain step), each row's newly emitted tokens; `gen` collects tokens and counts."""
    K = model.config.n_stages
    step, capacity = _generation_step(model, rows, draft_stage, k_draft, max_new_tokens, verifier, fallback)
    device = model.rope_cos.device
    B = len(rows)
    cache = step.cache
    spec = Speculator(model, step, B, draft_stage, k_draft, sampling, verifier, fallback, sampling.generator(device))
    gen.tokens = [[] for _ in rows]
    gen.extra = {"plain_steps": 0, "draft_stages": spec.draft_stages}
    if max_new_tokens == 0:
        return

    active = [True] * B

    def take(r: int, new: list[int]) -> list[int]:
        """Row r's new tokens as emitted: up to its budget and its EOS; the row ends there."""
        new = new[: max_new_tokens - len(gen.tokens[r])]
        if eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        gen.tokens[r].extend(new)
        gen.passes += 1
        if len(gen.tokens[r]) >= max_new_tokens or (eos_token_id is not None and eos_token_id in new):
            active[r] = False
        return new

    def idle_finished() -> None:
        for r in range(B):   # a finished row idles in lockstep at the cache start, where its writes fit
            if not active[r]:
                cache.rollback(r, 0)

    # the prompts are prefilled as full PoE's generation (and the server) prefill them, and the first
    # token is picked from the same log-probs: in bf16 a prompt's last token run as a step instead
    # rounds differently (its keys feed every later position)
    pending = pick(step.logprobs(prefill(model, cache, rows, K)), sampling, spec.generator)
    yield [take(r, [t]) for r, t in enumerate(pending.tolist())]
    idle_finished()
    while any(active):
        room = min(capacity - 1 - n for n, a in zip(cache.lengths, active) if a)
        idx, m, last, k = spec.cycle(cache, pending, room)
        before = [len(t) for t in gen.tokens]
        emitted, commit, acc = [[] for _ in range(B)], [0] * B, 0
        drafts = idx[:, 1:].tolist() if k else [[]] * B
        for r, (m_r, last_r) in enumerate(zip(m.tolist(), last.tolist())):
            if active[r]:
                emitted[r] = take(r, drafts[r][:m_r] + [last_r])
                gen.drafted += k
                gen.extra["plain_steps"] += k == 0
                gen.accepted += m_r
                acc += m_r
                commit[r] = m_r + 1
        if k:
            # a batch is done when its last row is: a cycle advances it by what it added to the shortest
            # of the rows still running, not by the rows' mean (demo bf16, batch 8, d1 k3, 48 tokens: the
            # mean promised 5 % over plain steps and the slowest row's pace ran at 0.96x)
            still = [r for r in range(B) if active[r]]
            gated = min(len(gen.tokens[r]) for r in still) - min(before[r] for r in still) if still else None
            spec.update(acc, sum(1 for c in commit if c), gated)
        pending = last          # a finished row's pending token is never read back
        cache.advance(commit)   # the accepted drafts and the verifier's token; rejected slots are overwritten later
        idle_finished()
        yield emitted
        if k == 0 and any(active):   # the plain steps the plan holds, as one tight loop
            running = active.count(True)   # each step writes one slot past the last: `room` more fit
            for nxt in spec.plain_steps(cache, pending, spec.held(room)):
                pending, emitted = nxt, [[] for _ in range(B)]
                for r, t in enumerate(nxt.tolist()):
                    if active[r]:
                        emitted[r] = take(r, [t])
                        gen.extra["plain_steps"] += 1
                yield emitted
                if active.count(True) < running:   # a row ended: back to the loop above, which idles it
                    break
            idle_finished()


@torch.no_grad()
def measure_draft_agreement(model, batches, max_positions: int = 200_000) -> dict[str, float]:
    """Per draft stage d, how often the prefix PoE of stages 0..d has the full-PoE argmax, over the
    positions of `batches`: the planner's prior for the acceptance of drafts from stage d."""
    from .logop import logop
    K = model.config.n_stages
    agree, n = [0.0] * (K - 1), 0
    for x, _ in batches:
        logps = [lp.flatten(0, 1) for lp in model.stage_logprobs(x)]
        full_top = logop(logps).argmax(-1)
        for d in range(K - 1):
            agree[d] += float((logop(logps[: d + 1]).argmax(-1) == full_top).sum())
        n += x.numel()
        if n >= max_positions:
            break
    return {str(d): agree[d] / max(n, 1) for d in range(K - 1)}
