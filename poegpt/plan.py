"""A training run plan from a config: memory per GPU, micro-batch and accumulation, FLOPs, GPU-hours.

    poegpt plan --preset 1.5b --gpus 8 --gpu-mem 80

Memory per GPU under FSDP (everything sharded over the GPUs): fp32 master weights (4 B/param),
fp32 gradients (4 B), AdamW moments (8 B) for embeddings/heads/scalars and a Muon momentum (4 B)
for block matrices. Activations are bf16 and counted per token and layer from what the block's
backward keeps (itemised in `activation_bytes_per_token_layer`); with activation checkpointing a
layer keeps only its input, plus one layer's full activations while it is recomputed. The chunked
stage-head loss keeps `loss_chunk` positions of K fp32 logit rows. The micro-batch is the largest
number of sequences that fits in `headroom` of the GPU after the sharded states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PoEConfig
from .model import PoEModel

BF16 = 2


def activation_bytes_per_token_layer(cfg: PoEConfig) -> int:
    """bf16 bytes one token keeps per layer for backward (SDPA keeps fp32 logsumexp, not scores)."""
    d, hq, hkv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    kept = (d            # block input (residual stream)
            + d          # norm(x) into the attention projections
            + hq + 2 * hkv   # q, k, v
            + hq + hkv   # q, k after rotary + QK-norm (inputs of SDPA)
            + hq         # attention output (input of c_proj)
            + d          # stream after attention
            + d          # norm(x) into the MLP
            + 4 * d      # c_fc output (relu input)
            + 4 * d)     # relu² output (c_proj input)
    return kept * BF16 + cfg.n_head * 4   # + SDPA's logsumexp per head


@dataclass
class Plan:
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    state_bytes_per_gpu: float
    act_bytes_per_seq: float
    act_bytes_per_seq_ckpt: float
    micro_batch: int
    micro_batch_ckpt: int
    grad_accum: int
    grad_accum_ckpt: int
    train_flops_per_token: int
    stage_flops_per_token: list[int]
    total_flops: float
    gpu_hours: float


def make_plan(cfg: PoEConfig, gpus: int, gpu_mem_gb: float, tokens_per_step: int = 1_048_576,
              steps: int = 60_000, mfu: float = 0.4, gpu_tflops: float = 989.0, headroom: float = 0.9,
              loss_chunk: int = 4096) -> Plan:
    with torch.device("meta"):
        model = PoEModel(cfg)
    params = model.num_params()
    muon = sum(p.numel() for b in model.blocks for n, p in b.named_parameters() if "ve_gate" not in n)
    param_bytes, grad_bytes = 4 * params, 4 * params
    optimizer_bytes = 8 * (params - muon) + 4 * muon
    state_per_gpu = (param_bytes + grad_bytes + optimizer_bytes) / gpus
    T, L, K = cfg.sequence_len, cfg.n_layer, cfg.n_stages
    per_layer = activation_bytes_per_token_layer(cfg)
    embed = T * cfg.n_embd * BF16 * 2                              # x0 and the smeared embedding
    loss = loss_chunk * cfg.padded_vocab_size * K * 4 * 3          # logits, log-softmax, its grad: one chunk
    act = T * L * per_layer + embed
    act_ckpt = T * L * cfg.n_embd * BF16 + T * per_layer + embed   # layer inputs + one layer recomputed
    free = headroom * gpu_mem_gb * 1e9 - state_per_gpu - loss
    micro = max(0, int(free // act))
    micro_ckpt = max(0, int(free // act_ckpt))

    def fit(mb) -> tuple[int, int]:
        """(micro-batch, accumulation): the largest micro-batch that fits and divides the step."""
        if mb == 0:
            return 0, 0
        per_step = T * gpus
        mb = min(mb, tokens_per_step // per_step)
        while tokens_per_step % (mb * per_step):
            mb -= 1
        return mb, tokens_per_step // (mb * per_step)
    (micro, accum), (micro_ckpt, accum_ckpt) = fit(micro), fit(micro_ckpt)
    train_flops = model.train_flops_per_token()
    total = float(train_flops) * tokens_per_step * steps
    return Plan(params, param_bytes, grad_bytes, optimizer_bytes, state_per_gpu, act, act_ckpt,
                micro, micro_ckpt, accum, accum_ckpt, train_flops,
                [model.flops_per_token(m) for m in range(1, K + 1)], total,
                total / (mfu * gpu_tflops * 1e12) / 3600)


def format_plan(cfg: PoEConfig, p: Plan, gpus: int, gpu_mem_gb: float, tokens_per_step: int, steps: int,
                mfu: float, gpu_tflops: float) -> str:
    gb = 1e9
    T = cfg.sequence_len
    lines = [f"model: {p.params:,} parameters, {cfg.n_layer} layers as {list(cfg.stage_layout)}, context {T}",
             f"cluster: {gpus} GPUs x {gpu_mem_gb:g} GB, FSDP over all GPUs",
             "",
             f"{'memory':<44}{'total GB':>10}{'per GPU GB':>12}",
             f"{'  weights (fp32 master)':<44}{p.param_bytes / gb:>10.2f}{p.param_bytes / gb / gpus:>12.2f}",
             f"{'  gradients (fp32)':<44}{p.grad_bytes / gb:>10.2f}{p.grad_bytes / gb / gpus:>12.2f}",
             f"{'  optimiser (AdamW 2 moments, Muon momentum)':<44}{p.optimizer_bytes / gb:>10.2f}"
             f"{p.optimizer_bytes / gb / gpus:>12.2f}",
             f"{'  activations per sequence, no checkpointing':<44}{'':>10}{p.act_bytes_per_seq / gb:>12.2f}",
             f"{'  activations per sequence, checkpointing':<44}{'':>10}{p.act_bytes_per_seq_ckpt / gb:>12.2f}",
             "",
             f"tokens per step {tokens_per_step:,} = micro-batch x {T} tokens x {gpus} GPUs x accumulation:",
             f"  without activation checkpointing: micro-batch {p.micro_batch}, accumulation {p.grad_accum}"
             if p.micro_batch else "  without activation checkpointing: one sequence does not fit",
             f"  with activation checkpointing:    micro-batch {p.micro_batch_ckpt}, accumulation {p.grad_accum_ckpt}"
             if p.micro_batch_ckpt else "  with activation checkpointing: one sequence does not fit",
             "",
             f"training FLOPs per token ({cfg.objective}): {p.train_flops_per_token / 1e9:.3f} GFLOP",
             "inference FLOPs per token, prefix PoE of the first m stages: "
             + ", ".join(f"m={m + 1}: {f / 1e9:.3f}" for m, f in enumerate(p.stage_flops_per_token)) + " GFLOP",
             f"total for {steps:,} steps: {p.total_flops:.3e} FLOPs",
             f"GPU-hours at {100 * mfu:g}% MFU of {gpu_tflops:g} TFLOP/s: {p.gpu_hours:,.0f} "
             f"({p.gpu_hours / gpus:,.1f} hours on {gpus} GPUs)"]
    return "\n".join(lines)
