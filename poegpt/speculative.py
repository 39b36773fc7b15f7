"""Self-speculative decoding: the first stages draft, the rest of the trunk verifies.

The draft is the prefix PoE of stages 0..d. It runs layers 0..b_d one token at a time in the same
KV cache the verifier uses (one cache, no second model). The verifier then runs layers b_d+1..L-1
over the pending token and all drafted tokens in one pass, forms the full-PoE distribution at each
position, and accepts the longest agreeing prefix plus one token of its own (the correction, or the
bonus when every draft was accepted). Rejected positions are rolled back by shortening the row's
cache length: their entries sit past the end and are overwritten before anything reads them.

Greedy: a draft is accepted iff it is the full-PoE argmax, so the output equals full greedy.
Sampling: a draft d drawn from q is accepted with probability min(1, p(d)/q(d)); on rejection
the token is drawn from normalise(max(0, p − q)); p and q are the filtered (temperature / top-k /
top-p) full and draft distributions, so the output is distributed exactly as full-PoE sampling.

The verifier is full PoE (`verifier="poe"`) or the last stage alone (`verifier="dense"`: the dense
model a nanochat import is, kept exact by `poegpt adapt --train heads`); p above is then stage K-1's
distribution, so greedy output equals `generate_stage(ids, K-1)` and sampling follows stage K-1's.

`k_draft="auto"` drafts until the draft's own top-1 probability falls below a confidence threshold
(calibrated by `poegpt calibrate`; EAGLE-2 / Draft&Verify style), at most `AUTO_MAX_DRAFT` tokens.
"""

from __future__ import annotations

import torch

from .cache import new_cache
from .engine import (Generation, Sampling, StageMix, cached_step, check_prompts, compiled, fast_path, one_row_matmuls,
                     sampling_logprobs, step_slots, to_rows)
from .errors import PoEError
from .model import TrunkState

AUTO_MAX_DRAFT = 8
DEFAULT_AUTO_THRESHOLD = 0.5
VERIFIERS = ("poe", "dense")


def verifier_mix(K: int, verifier: str, alpha: float = 0.0) -> StageMix:
    """The distribution the verifier accepts against: full PoE, or stage K-1 alone (dense)."""
    return StageMix.single(K, K - 1) if verifier == "dense" else StageMix.full(K, alpha)


def _positions(lengths: list[int], offset: int, T: int, device) -> torch.Tensor:
    return torch.tensor(lengths, device=device)[:, None] + offset + torch.arange(T, device=device)


class SpeculativeStep:
    """The draft and verify passes at fixed shapes, for `torch.compile` (as the engine's DecodeStep):
    a full-view cache (every row writes at its own device positions and attends over every slot
    under a position mask) and the summed head weights taken once. The draft pass is one token per
    row through stages 0..d; the verify pass is k+1 tokens per row through the rest, then the
    verifier's log-probs (full PoE, or stage K-1 alone). A pass of another length (the last one of a
    generation near the cache end, or an early-stopped `k_draft="auto"` draft) runs the same code
    eagerly on the same cache.
    Without `compile_decode` the same passes run eagerly on a cache sized to the generation."""

    def __init__(self, model, draft_stage: int, batch: int, max_len: int, backend: str | None,
                 full_view: bool = True, verifier: str = "poe"):
        K = model.config.n_stages
        self.model, self.d = model, draft_stage
        self.cache = new_cache(model, batch, max_len)
        self.cache.full_view = full_view
        self.draft_mix = StageMix(tuple(range(draft_stage + 1)))
        self.verify_mix = verifier_mix(K, verifier, model.config.poe_alpha)
        self.heads = [model.head_weight(j) for j in range(K)]
        self.fast_draft, self.fast_verify = compiled(self.draft, backend), compiled(self.verify, backend)

    def draft(self, tok: torch.Tensor, pos: torch.Tensor):
        """tok (B,) at pos (B,) through the draft stages: (x, x0, x_mid, boundary outputs, draft log-probs (B, V))."""
        idx, p = tok[:, None], pos[:, None]
        state, hs = self.model.walk(idx, None, 0, self.d + 1, p, self.cache)
        q = self.draft_mix.logprobs(self.model, [h[:, -1] for h in hs], self.heads[: self.d + 1])
        return state.x, state.x0, state.x_mid, hs, q

    def verify(self, x, x0, x_mid, shallow: list[torch.Tensor], idx: torch.Tensor, pos: torch.Tensor):
        """The remaining stages over idx (B, T) at pos (B, T): the verifier's log-probs (B, T, V)."""
        _, deep = self.model.walk(idx, TrunkState(x, x0, x_mid), self.d + 1, self.model.config.n_stages, pos,
                                  self.cache)
        mix = self.verify_mix
        return mix.logprobs(self.model, shallow + deep, [self.heads[k] for k in mix.stages])


def accept(p: torch.Tensor, idx: torch.Tensor, draft_logps: list[torch.Tensor], draft_len: torch.Tensor,
           sampling: Sampling, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many drafts are accepted (m), and the verifier's own next token.

    p: (B, k+1, V) verifier log-probs at the pending position and each draft; idx: (B, k+1) the pending
    token then the drafts; draft_logps[j]: (B, V) the distribution draft j+1 was drawn from."""
    B, k = idx.size(0), idx.size(1) - 1
    rows = torch.arange(B, device=idx.device)
    drafts = idx[:, 1:]                                                         # (B, k)
    within = torch.arange(k, device=idx.device)[None] < draft_len[:, None]
    if sampling.greedy:
        ok = drafts == p[:, :k].argmax(-1)
    elif k:
        q = torch.stack(draft_logps, 1)                                         # (B, k, V)
        ratio = (p[:, :k].gather(-1, drafts[..., None]) - q.gather(-1, drafts[..., None])).squeeze(-1).exp()
        ok = torch.rand(B, k, generator=generator, device=idx.device) < ratio  # accept with min(1, p/q)
    else:
        ok = within
    m = (ok & within).long().cumprod(1).sum(1)                                 # (B,)
    p_m = p[rows, m]                                                            # (B, V)
    if sampling.greedy:
        return m, p_m.argmax(-1)
    probs = p_m.exp()
    rejected = m < draft_len
    if bool(rejected.any()):                   # a rejected row draws from the residual max(0, p − q)
        q_m = torch.stack(draft_logps, 1)[rows, m.clamp(max=k - 1)].exp()
        resid = (probs - q_m).clamp(min=0)
        resid = resid / resid.sum(-1, keepdim=True).clamp(min=1e-30)
        probs = torch.where(rejected[:, None], resid, probs)
    return m, torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_speculative_args(K: int, draft_stage, k_draft, verifier: str = "poe") -> None:
    if isinstance(draft_stage, bool) or not isinstance(draft_stage, int) or not 0 <= draft_stage <= K - 2:
        raise PoEError(f"draft_stage must be an integer in 0..{K - 2} (below the last stage), got {draft_stage!r}")
    if k_draft != "auto" and (isinstance(k_draft, bool) or not isinstance(k_draft, int) or k_draft < 1):
        raise PoEError(f"k_draft must be an integer >= 1 or 'auto', got {k_draft!r}")
    if verifier not in VERIFIERS:
        raise PoEError(f"verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")


@torch.no_grad()
def generate_speculative(model, ids, draft_stage: int = 0, k_draft: int | str = 3, max_new_tokens: int = 32,
                         sampling: Sampling = Sampling(), eos_token_id: int | None = None,
                         auto_threshold: float | None = None, verifier: str = "poe") -> Generation:
    gen = Generation([])
    for _ in speculative_steps(model, to_rows(ids), draft_stage, k_draft, max_new_tokens, sampling, eos_token_id,
                               auto_threshold, gen, verifier):
        pass
    return gen


@torch.no_grad()
def speculative_steps(model, rows: list[list[int]], draft_stage: int, k_draft, max_new_tokens: int,
                      sampling: Sampling, eos_token_id: int | None, auto_threshold: float | None, gen: Generation,
                      verifier: str = "poe"):
    """Yield, per verification pass, each row's newly emitted tokens; `gen` collects tokens and counts."""
    cfg = model.config
    K = cfg.n_stages
    check_speculative_args(K, draft_stage, k_draft, verifier)
    check_prompts(model, rows, max_new_tokens)
    device = model.rope_cos.device
    B = len(rows)
    auto = k_draft == "auto"
    k_max = AUTO_MAX_DRAFT if auto else k_draft
    threshold = DEFAULT_AUTO_THRESHOLD if auto_threshold is None else auto_threshold
    capacity = min(cfg.sequence_len, max(len(r) for r in rows) + max_new_tokens + k_max)
    if fast_path(model) is not None:
        max_len = step_slots(model, capacity)
        step = cached_step(model, ("speculative", draft_stage, k_max, B, max_len, verifier),
                           lambda backend: SpeculativeStep(model, draft_stage, B, max_len, backend, verifier=verifier))
    else:
        step = SpeculativeStep(model, draft_stage, B, capacity, None, full_view=False, verifier=verifier)
    cache = step.cache
    cache.reset()                               # from the start, also when the cache is reused
    generator = sampling.generator(device)
    gen.tokens = [[] for _ in rows]
    if max_new_tokens == 0:
        return

    # prefill everything but each prompt's last token; that token is the first pending input
    if max(len(r) for r in rows) > 1:
        T = max(len(r) for r in rows) - 1
        model.walk(torch.tensor([r[:-1] + [0] * (T - len(r) + 1) for r in rows], device=device), None, 0, K, 0, cache)
    cache.reset([len(r) - 1 for r in rows])
    pending = torch.tensor([r[-1] for r in rows], device=device)
    active = [True] * B

    while any(active):
        room = min(capacity - 1 - n for n, a in zip(cache.lengths, active) if a)
        k = min(k_max, room)
        # --- draft: stages 0..d, one token at a time, writing the shared cache ---------------------
        tokens, states, shallow, draft_logps = [pending], [], [], []
        confident = torch.ones(B, dtype=torch.bool, device=device)
        draft_len = torch.zeros(B, dtype=torch.long, device=device)
        i = 0
        while True:                             # pass k only readies the last draft for verification
            pos = _positions(cache.lengths, i, 1, device)[:, 0]
            with one_row_matmuls(model, B):
                x, x0, x_mid, hs, q = step.fast_draft(tokens[-1], pos)
            states.append(TrunkState(x, x0, x_mid))
            shallow.append(hs)
            if i == k:
                break
            q = q if sampling.greedy else sampling_logprobs(q, sampling)
            draft_logps.append(q)
            tokens.append(q.argmax(-1) if sampling.greedy
                          else torch.multinomial(q.exp(), 1, generator=generator).squeeze(-1))
            i += 1
            if auto:   # a row's draft ends at its first unconfident token; the batch drafts while any row is sure
                confident &= q.max(-1).values.exp() >= threshold
                draft_len += confident | (draft_len == 0)
                if not bool(confident.any()):
                    k = i
        if not auto:
            draft_len = torch.full((B,), k, dtype=torch.long, device=device)
        # --- verify: the remaining stages over the pending token and the k drafts, in one pass ------
        idx = torch.stack(tokens, 1)                                            # (B, k+1)
        pos = _positions(cache.lengths, 0, k + 1, device)
        state = TrunkState.cat(states)
        p = (step.fast_verify if k == k_max else step.verify)(                  # (B, k+1, V)
            state.x, state.x0, state.x_mid, [torch.cat([s[j] for s in shallow], 1) for j in range(draft_stage + 1)],
            idx, pos)
        if not sampling.greedy:
            p = sampling_logprobs(p, sampling)
        # --- accept: the longest prefix of drafts the verifier agrees with, then one token of its own ---
        m, last = accept(p, idx, draft_logps, draft_len, sampling, generator)
        emitted, commit = [[] for _ in range(B)], [0] * B
        for r, (m_r, last_r) in enumerate(zip(m.tolist(), last.tolist())):
            if not active[r]:
                continue
            new = idx[r, 1:m_r + 1].tolist() + [last_r]
            new = new[: max_new_tokens - len(gen.tokens[r])]
            if eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            emitted[r] = new
            gen.drafted += int(draft_len[r])
            gen.accepted += m_r
            gen.passes += 1
            gen.tokens[r].extend(new)
            commit[r] = m_r + 1
            pending[r] = last_r
            if len(gen.tokens[r]) >= max_new_tokens or (eos_token_id is not None and eos_token_id in new):
                active[r] = False
        cache.advance(commit)   # the accepted drafts and the verifier's token; rejected slots are overwritten later
        for r in range(B):   # a finished row idles in lockstep at the cache start, where its writes fit
            if not active[r]:
                cache.rollback(r, 0)
        yield emitted


@torch.no_grad()
def measure_draft_thresholds(model, batches, target: float = 0.5, n_bins: int = 20,
                             max_positions: int = 200_000) -> dict[str, float]:
    """Per draft stage d, the draft top-1 probability above which drafts agree with the full-PoE
    argmax at least `target` of the time (equal-count bins; every bin above must meet the target)."""
    from .logop import logop
    K = model.config.n_stages
    conf = [[] for _ in range(K - 1)]
    agree = [[] for _ in range(K - 1)]
    n = 0
    for x, _ in batches:
        logps = [lp.flatten(0, 1) for lp in model.stage_logprobs(x)]
        full_top = logop(logps).argmax(-1)
        for d in range(K - 1):
            q = logop(logps[: d + 1])
            top = q.max(-1)
            conf[d].append(top.values.exp())
            agree[d].append((top.indices == full_top).float())
        n += x.numel()
        if n >= max_positions:
            break
    thresholds = {}
    for d in range(K - 1):
        c, a = torch.cat(conf[d]), torch.cat(agree[d])
        order = torch.argsort(c, descending=True)
        c, a = c[order], a[order]
        threshold = 1.0
        for chunk_c, chunk_a in zip(torch.tensor_split(c, n_bins), torch.tensor_split(a, n_bins)):
            if chunk_a.numel() == 0 or chunk_a.mean() < target:
                break
            threshold = float(chunk_c[-1])
        thresholds[str(d)] = threshold
    return thresholds
