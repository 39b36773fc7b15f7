"""WAND adaptive depth: evaluate stages one by one and stop when the rest cannot change the answer.

After stage j, with S_j = Σ_{i<=j} log p_i, a = argmax S_j and margin m_j = S_j(a) − max_{b≠a} S_j(b),
the token a is emitted if m_j >= safety · bound_j (docs/design.md §7.3). bound_j is the calibrated p99 of
R_j = max_b Σ_{i>j} (log p_i(b) − log p_i(a)), the most the remaining stages can move the margin:
if m_j > R_j the full-PoE argmax is a. Infinite bounds never exit early (= full greedy).

Skipped layers are filled lazily and exactly: a token that exits after stage j leaves its boundary
state pending; when a later token needs stage j+1, the pending positions run through it together
with that token, so every layer sees every position once and the cache ends up equal to a full
prefill. Rows of a batch are decoded one at a time (each row exits at its own stages).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cache import new_cache
from .engine import Generation, check_prompts, one_row_matmuls
from .errors import PoEError
from .model import TrunkState


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


def margin_and_argmax(score: torch.Tensor) -> tuple[int, float]:
    top2 = torch.topk(score, 2)
    return int(top2.indices[0]), float(top2.values[0] - top2.values[1])


class LazyDepth:
    """One row's cache walked stage by stage: pending[k] holds boundary-k states not yet run deeper."""

    def __init__(self, model, cache, prompt_len: int):
        self.model, self.cache, self.prompt_len = model, cache, prompt_len
        K = model.config.n_stages
        self.filled = [0] * K                            # positions whose stage k has run
        self.pending: list[list[tuple[TrunkState, torch.Tensor]]] = [[] for _ in range(K)]
        self.decode_layer_evals = 0                      # layer evaluations at positions past the prompt

    def run_stage(self, k: int, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Run stage k on every position waiting for it (for k = 0: the given new tokens, embedded
        here); return the normed boundary output of the last position."""
        b = self.model.config.boundaries
        state = None
        if k > 0:
            waiting = self.pending[k - 1]
            state, idx = TrunkState.cat([s for s, _ in waiting]), torch.cat([t for _, t in waiting], 1)
            self.pending[k - 1] = []
        pos = self.filled[k]
        state, (h,) = self.model.walk(idx, state, k, k + 1, pos, self.cache)
        T = idx.size(1)
        decode_positions = pos + T - max(pos, self.prompt_len)
        self.decode_layer_evals += max(decode_positions, 0) * (b[k] - (b[k - 1] if k > 0 else -1))
        self.filled[k] = pos + T
        if k + 1 < len(self.filled):
            self.pending[k].extend((state.positions(t, t + 1), idx[:, t:t + 1]) for t in range(T))
        return h[:, -1]

    def flush(self) -> None:
        """Run every pending position through the remaining stages (the cache then equals a full prefill)."""
        for k in range(1, len(self.filled)):
            if self.pending[k - 1]:
                self.run_stage(k)


@torch.no_grad()
def wand_row_steps(model, prompt: list[int], max_new_tokens: int, safety: float, bounds: list[float],
                   eos_token_id: int | None = None):
    """Generate for one prompt, yielding (token, stage that emitted it); returns the LazyDepth walker."""
    K = model.config.n_stages
    device = model.rope_cos.device
    cache = new_cache(model, 1, len(prompt) + max_new_tokens)
    walker = LazyDepth(model, cache, len(prompt))
    idx = torch.tensor([prompt], device=device)
    for n in range(1, max_new_tokens + 1):
        score = None
        for j in range(K):
            rows = idx.size(1) if j == 0 else len(walker.pending[j - 1])
            with one_row_matmuls(model, rows):
                h = walker.run_stage(j, idx)
                logp = F.log_softmax(model.stage_logits(h[0], j), -1)
            score = logp if score is None else score + logp
            a, margin = margin_and_argmax(score)
            if j == K - 1 or margin >= safety * bounds[j]:
                break
        yield a, j
        if n == max_new_tokens or a == eos_token_id:
            break
        idx = torch.tensor([[a]], device=device)
    cache.reset([walker.filled[0]])
    return walker


@torch.no_grad()
def wand_steps(model, rows: list[list[int]], max_new_tokens: int, safety: float, p99_bounds,
               eos_token_id: int | None, gen: Generation):
    """Yield per-row new tokens (rows one after another); `gen` collects tokens, stages and layer counts."""
    bounds = check_bounds(model.config.n_stages, safety, p99_bounds)
    check_prompts(model, rows, max_new_tokens)
    gen.tokens, gen.stages_used = [[] for _ in rows], [[] for _ in rows]
    b = model.config.boundaries
    evals = positions = 0
    for r, prompt in enumerate(rows):
        if max_new_tokens == 0:
            continue
        steps = wand_row_steps(model, prompt, max_new_tokens, safety, bounds, eos_token_id)
        while True:
            try:
                token, stage = next(steps)
            except StopIteration as stop:
                evals += stop.value.decode_layer_evals
                break
            gen.tokens[r].append(token)
            gen.stages_used[r].append(stage)
            yield [[token] if i == r else [] for i in range(len(rows))]
        positions += len(gen.tokens[r]) - 1      # tokens after the first are decided at decode positions
    n = sum(len(t) for t in gen.tokens)
    gen.extra = {  # layers run per decode position, lazy fills included; and the depth each token exited at
        "layers_per_token": evals / max(positions, 1),
        "exit_layers_per_token": sum(b[s] + 1 for st in gen.stages_used for s in st) / max(n, 1)}


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
