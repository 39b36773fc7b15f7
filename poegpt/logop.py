"""Log-OP: the weighted geometric mean of stage distributions (docs/design.md §4).

For stages S with weights w_k >= 0 (normalised to w̄_k = w_k / Σ w):

    score(x)   = Σ_k w̄_k · log p_k(x)
    log p_S(x) = score(x) − logsumexp_x' score(x')

`score` ranks (argmax); `log p_S` is what is sampled, scored and reported. When the weights do not
depend on x, log p_S = log_softmax(Σ w̄_k z_k) over the raw logits z_k (each log p_k differs from z_k
by a constant), so one softmax serves K stages: `logop_logits`. Entropy weighting (poe_alpha = α > 0)
sets w_k ∝ exp(−α·H_k) per position, which needs every p_k: `logop`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import PoEError


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Validate stage weights (length n, >= 0, not all zero) and scale them to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise PoEError(f"stage_weights has {len(weights)} entries but {n} stages are selected; give one weight per stage")
    if any(not (w >= 0) for w in weights):
        raise PoEError(f"stage_weights must be >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise PoEError("stage_weights are all zero; give at least one stage a positive weight")
    return [w / total for w in weights]


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distribution over the last dim, from its log-probs."""
    return -(logp.exp() * logp).sum(-1)


def logop_scores(logps: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                 alpha: float = 0.0) -> torch.Tensor:
    """Unnormalised Log-OP score Σ w̄_k log p_k (..., V): the ranking score."""
    if len(logps) == 0:
        raise PoEError("Log-OP needs at least one stage")
    if alpha > 0:
        if weights is not None:
            raise PoEError("give either stage weights or poe_alpha > 0 (entropy weighting), not both")
        ent = torch.stack([entropy(lp) for lp in logps])                # (K, ...)
        w = torch.softmax(-alpha * ent, dim=0).unsqueeze(-1)              # (K, ..., 1), sums to 1 over K
        return (w * torch.stack(list(logps))).sum(0)
    w = normalise_weights(weights, len(logps))
    score = w[0] * logps[0]
    for wk, lp in zip(w[1:], logps[1:]):
        score = score + wk * lp
    return score


def logop(logps: Sequence[torch.Tensor], weights: Sequence[float] | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Normalised Log-OP log-probs log p_S (..., V) from per-stage log-probs."""
    return F.log_softmax(logop_scores(logps, weights, alpha), dim=-1)


def logop_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Normalised Log-OP log-probs from raw stage logits with fixed weights: one softmax for K stages."""
    return F.log_softmax(logop_scores([z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits], weights), dim=-1)
