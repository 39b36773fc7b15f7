"""Optimisers and schedule, as nanochat: Muon for the block matrices, AdamW for everything else.

Muon (momentum 0.95 with Nesterov, 5 Newton–Schulz steps, lr 0.02, scaled by sqrt(max(1, rows/cols)))
orthogonalises each matrix update. AdamW groups: heads (shared + stage heads) 0.004, token embedding
0.2, value embeddings 0.1 — these three scaled by (d/768)^-0.5 — then resid_lambdas 0.005,
x0_lambdas 0.5, smear/backout 0.2. The schedule is a linear warmup, a constant phase and a linear
warmdown over the last `warmdown_ratio` of the run; Muon's momentum ramps 0.85 -> 0.95 over 300 steps.

`trainable` picks which parameters train (`freeze` turns the rest's requires_grad off, and the
optimisers hold only the trainable ones): "all"; "heads", the additive stage heads W_0..W_{K-2}
(the shared head W_s, the last stage's W_{K-1} and the trunk stay, so stage K-1 alone is unchanged);
"heads+last-layers", those plus the last layer of every stage (its block, gate and value embedding).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from .errors import PoEError
from .model import PoEModel

TRAINABLE = ("all", "heads", "heads+last-layers")


def check_trainable(which) -> None:
    if which not in TRAINABLE:
        raise PoEError(f"--train must be one of {', '.join(TRAINABLE)}, got {which!r}")


def trainable_names(model: PoEModel, which: str = "all") -> set[str]:
    """Names of the parameters that train under `which` (one of TRAINABLE)."""
    check_trainable(which)
    names = {n for n, _ in model.named_parameters()}
    if which == "all":
        return names
    K = model.config.n_stages
    chosen = {f"lm_head_stages.{k}.weight" for k in range(K - 1)}
    if which == "heads+last-layers":
        for b in model.config.boundaries:
            chosen |= {n for n in names if n.startswith((f"blocks.{b}.", f"value_embeds.{b}."))}
    return chosen


def freeze(model: PoEModel, which: str = "all") -> None:
    """requires_grad on the parameters `which` trains, off on the rest."""
    chosen = trainable_names(model, which)
    if not chosen:
        raise PoEError(f"--train {which} leaves nothing to train in a model of one stage; re-cut it (--stages)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (the U·Vᵀ of its SVD) with a quintic Newton–Schulz iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.to(torch.promote_types(G.dtype, torch.float32))  # bf16 on GPUs
    transpose = X.size(-2) > X.size(-1)
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transpose:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if isinstance(g, DTensor):   # FSDP2 shard: orthogonalise the whole matrix, keep our shard
                    update = zeropower_newton_schulz(g.full_tensor(), group["ns_steps"])
                    update = distribute_tensor(update, g.device_mesh, g.placements)
                else:
                    update = zeropower_newton_schulz(g, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


def build_optimizers(model: PoEModel, matrix_lr: float = 0.02, unembedding_lr: float = 0.004,
                     embedding_lr: float = 0.2, value_embedding_lr: float = 0.1, scalar_lr_scale: float = 1.0,
                     weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over every trainable parameter of the model (requires_grad; see `freeze`), each in
    exactly one group; an optimiser with nothing to train is left out."""
    scale = (model.config.n_embd / 768) ** -0.5
    matrices = [p for b in model.blocks for n, p in b.named_parameters() if "ve_gate" not in n]
    ve_gates = [b.attn.ve_gate.weight for b in model.blocks if b.attn.ve_gate is not None]
    heads = [model.lm_head.weight, *[h.weight for h in model.lm_head_stages]]

    def group(params, lr, betas, wd):
        return dict(params=[p for p in params if p.requires_grad], lr=lr, initial_lr=lr, betas=betas, weight_decay=wd)
    adam_groups = [
        group(heads, unembedding_lr * scale, (0.8, 0.96), 0.01),
        group([model.wte.weight], embedding_lr * scale, (0.8, 0.995), 0.001),
        group(list(model.value_embeds.parameters()), value_embedding_lr * scale, (0.8, 0.995), 0.01),
        group([model.resid_lambdas], 0.005 * scalar_lr_scale, (0.8, 0.95), 0.05),
        group([model.x0_lambdas], 0.5 * scalar_lr_scale, (0.96, 0.95), 0.0),
        group([model.smear_gate.weight, model.smear_lambda, model.backout_lambda, *ve_gates],
              0.2 * scalar_lr_scale, (0.8, 0.95), 0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    matrices = [p for p in matrices if p.requires_grad]
    optimizers = []
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, eps=1e-10, foreach=False))
    if matrices:
        optimizers.append(Muon([dict(params=matrices, lr=matrix_lr, initial_lr=matrix_lr)], weight_decay=weight_decay))
    covered = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters() if p.requires_grad), \
        "every trainable parameter must be in exactly one optimiser group"
    return optimizers


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown = round(warmdown_ratio * total_steps)
    if step <= total_steps - warmdown or warmdown == 0:
        return 1.0
    progress = (total_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedule(optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, warmup_steps: int,
                 warmdown_ratio: float) -> float:
    mult = lr_multiplier(step, total_steps, warmup_steps, warmdown_ratio)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
            if isinstance(opt, Muon):
                g["momentum"] = muon_momentum(step)
    return mult
