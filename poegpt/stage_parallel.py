"""Stage parallelism: rank k runs stage k (docs/design.md §6.5, §7.5), for local-learning training and for inference.

Training (`stage_grad="isolated"`, objectives residual_logop or independent): every rank embeds the
batch itself (the embedding is shared and must collect every stage's gradient through x0 and the
smear gate), receives from rank k−1 the detached residual stream (and x_mid), runs its own layers
and head, and sends forward the detached stream plus what the next stage's loss needs — for
residual_logop the running sum Σ_{j<=k} sg(log p_j). Each rank back-propagates only its own loss
term: no gradient crosses ranks. The parameters several stages use (token embedding, smear gate,
shared head, per-layer scalars, backout) are replicated and their gradients all-reduced — the only
collective of the backward pass; a rank's own layers, value embeddings and stage head are updated
on that rank alone.

Communication per token and stage boundary, forward only: d (stream) [+ d for x_mid past the middle
of the trunk] + V (log-prob sum, residual_logop only) floats. A pipeline-parallel backward instead
sends d floats of activation gradient back across every boundary, and its stages wait on each other
in both directions; here a rank can start its backward as soon as its own forward is done.

Inference: the same split runs a weighted Log-OP composition — rank k decodes its stage with its own
KV cache, the selected stages' weighted log-probs are summed onto rank 0 (a reduce), rank 0 picks
the token and broadcasts it. Tokens and log-probs equal single-process composition.

In this implementation every rank holds a full replica of the weights (simple, exact, testable on
CPU with gloo); only the owned and shared parameters are used and updated on a rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cache import new_cache
from .engine import Sampling, StageMix, check_prompts, pick, to_rows
from .errors import PoEError
from .model import PoEModel, TrunkState
from .objectives import IGNORE_INDEX


def shared_parameters(model: PoEModel) -> list[torch.nn.Parameter]:
    """Parameters used by more than one stage: replicated, gradients all-reduced."""
    return [model.wte.weight, model.lm_head.weight, model.smear_gate.weight, model.smear_lambda,
            model.backout_lambda, model.resid_lambdas, model.x0_lambdas]


def owned_parameters(model: PoEModel, stage: int) -> list[torch.nn.Parameter]:
    b = model.config.boundaries
    first = 0 if stage == 0 else b[stage - 1] + 1
    params = [p for i in range(first, b[stage] + 1) for p in model.blocks[i].parameters()]
    params += [p for i in range(first, b[stage] + 1) if str(i) in model.value_embeds
               for p in model.value_embeds[str(i)].parameters()]
    return params + [model.lm_head_stages[stage].weight]


def check_stage_parallel(model: PoEModel, world_size: int) -> None:
    cfg = model.config
    if world_size != cfg.n_stages:
        raise PoEError(f"stage-parallel training needs one rank per stage: {cfg.n_stages} ranks, got {world_size}")
    if cfg.stage_grad != "isolated" or cfg.objective not in ("residual_logop", "independent"):
        raise PoEError("stage-parallel training needs stage_grad='isolated' and objective residual_logop or "
                       "independent (joint_logop needs gradients across stages; final_only trains one stage)")


def _send_state(state: TrunkState, extra: torch.Tensor | None, dst: int) -> None:
    dist.send(state.x.detach().contiguous(), dst)
    if state.x_mid is not None:
        dist.send(state.x_mid.detach().contiguous(), dst)
    if extra is not None:
        dist.send(extra.contiguous(), dst)


def _recv(shape, dtype, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    dist.recv(t, src)
    return t


def stage_loss_step(model: PoEModel, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """This rank's forward and backward for one micro-batch; returns its (detached) loss term.
    The sum over ranks of the terms is the single-process isolated objective."""
    cfg = model.config
    rank, K = dist.get_rank(), cfg.n_stages
    b = cfg.boundaries
    B, T = x.shape
    dtype = model.wte.weight.dtype
    x0 = model.embed(x)
    if rank == 0:
        state = TrunkState(x0, x0)
    else:
        has_mid = b[rank - 1] >= cfg.backout_layer
        stream = _recv((B, T, cfg.n_embd), dtype, rank - 1)
        mid = _recv((B, T, cfg.n_embd), dtype, rank - 1) if has_mid else None
        state = TrunkState(stream, x0, mid)
    earlier = _recv((B * T, cfg.vocab_size), torch.promote_types(dtype, torch.float32), rank - 1) \
        if rank > 0 and cfg.objective == "residual_logop" else None
    state, (h,) = model.walk(x, state, rank, rank + 1, 0, None)
    logp = F.log_softmax(model.stage_logits(h.flatten(0, 1), rank), -1)
    targets = y.flatten()
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)

    def ce(lp):
        return F.cross_entropy(lp, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if cfg.objective == "independent" or rank == 0:
        term = ce(logp)
    else:
        term = ce(F.log_softmax((earlier + logp) / (rank + 1), -1))
        if cfg.local_weight:
            term = term + cfg.local_weight * ce(logp)
    if rank + 1 < K:
        passed = None
        if cfg.objective == "residual_logop":
            passed = logp.detach() if earlier is None else earlier + logp.detach()
        _send_state(state, passed, rank + 1)
    loss = term / count / K
    (loss * scale).backward()
    return loss.detach()


def all_reduce_shared_grads(model: PoEModel) -> None:
    for p in shared_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_owned(model: PoEModel) -> None:
    """Give every rank the owners' current values of every stage's parameters (for saving/evaluating)."""
    for k in range(model.config.n_stages):
        for p in owned_parameters(model, k):
            dist.broadcast(p.data, src=k)


@torch.no_grad()
def generate_composition(model: PoEModel, ids, stages, stage_weights=None, max_new_tokens: int = 32,
                         sampling: Sampling = Sampling()) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Stage-parallel weighted Log-OP decoding: rank k runs stage k; call on every rank.
    Returns (new tokens per row, the combined log-probs of each step) — meaningful on rank 0."""
    cfg = model.config
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.n_stages:
        raise PoEError(f"stage-parallel inference needs one rank per stage ({cfg.n_stages}), got {world}")
    mix = StageMix.composition(cfg.n_stages, list(stages), stage_weights)
    weights = mix.weights or tuple(1.0 / len(mix.stages) for _ in mix.stages)
    rows = to_rows(ids)
    check_prompts(model, rows, max_new_tokens)
    if len({len(r) for r in rows}) != 1:
        raise PoEError("stage-parallel inference takes prompts of one length")
    B, depth = len(rows), mix.depth
    dtype = model.wte.weight.dtype
    cache = new_cache(model, B, len(rows[0]) + max_new_tokens)
    generator = sampling.generator(model.rope_cos.device)
    tokens = torch.tensor(rows)
    pos = 0
    new, logps = [[] for _ in rows], []
    for _ in range(max_new_tokens):
        T = tokens.size(1)
        x0 = model.embed(tokens, cache, pos)   # every working rank embeds (cheap); only rank 0's cache slot matters
        score = torch.zeros(B, cfg.vocab_size, dtype=torch.promote_types(dtype, torch.float32))
        if rank < depth:
            if rank == 0:
                state = TrunkState(x0, x0)
            else:
                stream = _recv((B, T, cfg.n_embd), dtype, rank - 1)
                mid = _recv((B, T, cfg.n_embd), dtype, rank - 1) \
                    if cfg.boundaries[rank - 1] >= cfg.backout_layer else None
                state = TrunkState(stream, x0, mid)
            state, (h,) = model.walk(tokens, state, rank, rank + 1, pos, cache)
            if rank + 1 < depth:
                _send_state(state, None, rank + 1)
            if rank in mix.stages:
                w = weights[mix.stages.index(rank)]
                score = w * F.log_softmax(model.stage_logits(h[:, -1], rank), -1)
        dist.reduce(score, dst=0)                       # Σ_k w̄_k log p_k onto rank 0
        logp = F.log_softmax(score, -1)
        nxt = pick(logp, sampling, generator) if rank == 0 else torch.zeros(B, dtype=torch.long)
        dist.broadcast(nxt, src=0)
        logps.append(logp)
        for r in range(B):
            new[r].append(int(nxt[r]))
        pos += T
        tokens = nxt[:, None]
    return new, logps
