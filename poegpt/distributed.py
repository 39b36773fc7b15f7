"""Data parallelism applied from outside the model (torchtitan style): DDP or FSDP2 under torchrun.

The model knows nothing of parallelism. `init_distributed()` reads torchrun's environment and starts
the process group (NCCL on GPUs, gloo on CPU, so every path runs and is tested on a CPU);
`parallelize(model, strategy)` wraps the model in DDP or shards every block and then the root with
FSDP2's `fully_shard`. Each rank reads its own rows of the global batch (`TokenLoader(rank=...)`),
so N ranks with micro-batch B see exactly the rows one process with N·B would.

Checkpoints hold full (unsharded) model and optimiser state keyed by parameter name, gathered with
`torch.distributed.checkpoint.state_dict`, so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PoEError

STRATEGIES = ("ddp", "fsdp")   # stage parallelism: see stage_parallel.py


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device_type: str) -> DistInfo:
    """Join torchrun's process group (if launched by torchrun with more than one process)."""
    info = dist_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def parallelize(step: torch.nn.Module, strategy: str, info: DistInfo) -> torch.nn.Module:
    """The module to call in the training step (`objectives.PoELoss` over the model): DDP-wrapped, or
    sharded by FSDP2 (each block, then the whole)."""
    if not info.enabled:
        return step
    if strategy not in STRATEGIES:
        raise PoEError(f"--parallel must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [info.local_rank] if next(step.parameters()).is_cuda else None
        unused = step.config.objective == "final_only"   # it leaves the early stage heads without gradients
        return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=unused)
    from torch.distributed.fsdp import fully_shard
    for block in step.model.blocks:
        fully_shard(block)
    fully_shard(step)
    return step


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)                    # SUM: the one reduction every backend (gloo too) has
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def full_state(model: torch.nn.Module, optimizers=None) -> tuple[dict, dict | None]:
    """Full model state and flattened full optimiser state, keyed by parameter name
    ('state.<param>.<key>', 'param_groups.<param>.<key>'). Gathers FSDP shards (a collective:
    every rank calls it)."""
    model = unwrap(model)
    model_state = {k: _full(v) for k, v in model.state_dict().items()}
    if optimizers is None:
        return model_state, None
    names = {id(p): n for n, p in model.named_parameters()}
    flat = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                for key, value in opt.state.get(p, {}).items():
                    flat[f"state.{name}.{key}"] = _full(value) if isinstance(value, torch.Tensor) else value
                for key, value in group.items():
                    if key != "params":
                        flat[f"param_groups.{name}.{key}"] = value
    return model_state, flat


def load_optimizer_state(model: torch.nn.Module, optimizers, flat: dict) -> None:
    """Inverse of full_state's optimiser half; shards tensors the way each parameter is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                for key in list(group):
                    if key != "params" and f"param_groups.{name}.{key}" in flat:
                        group[key] = flat[f"param_groups.{name}.{key}"]
                prefix = f"state.{name}."
                state = {}
                for key, value in flat.items():
                    if key.startswith(prefix):
                        if isinstance(value, torch.Tensor) and isinstance(p, DTensor) and value.shape == p.shape:
                            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
                        elif isinstance(value, torch.Tensor):
                            value = value.to(p.device) if value.dim() else value
                        state[key[len(prefix):]] = value
                if state:
                    opt.state[p] = state
