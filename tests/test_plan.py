"""`poegpt plan` arithmetic against an independent computation for the tiny preset."""

import subprocess
import sys

from poegpt import PoEConfig
from poegpt.plan import activation_bytes_per_token_layer, make_plan


def test_plan_arithmetic_for_tiny():
    cfg = PoEConfig.from_preset("tiny")       # V=512, L=8, d=64, H=4, G=2, D=16, T=64, layout 4-2-1-1
    p = make_plan(cfg, gpus=2, gpu_mem_gb=0.01, tokens_per_step=4096, steps=100, mfu=0.5, gpu_tflops=1.0,
                  loss_chunk=64)
    # parameters by hand: wte + shared head + 4 stage heads, 8 blocks, 4 value embeddings, gates, scalars
    blocks = 8 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 256)
    ve, ve_gates = 4 * 512 * 32, 4 * 12 * 2
    params = 6 * 512 * 64 + blocks + ve + ve_gates + 8 + 8 + 24 + 1 + 1
    assert p.params == params
    assert p.param_bytes == p.grad_bytes == 4 * params
    assert p.optimizer_bytes == 8 * (params - blocks) + 4 * blocks     # Adam: 2 moments; Muon: 1 momentum
    assert p.state_bytes_per_gpu == 16 * params / 2 - 4 * blocks / 2
    per_layer = 2 * (64 + 64 + (64 + 64) + (64 + 32) + 64 + 64 + 64 + 256 + 256) + 4 * 4
    assert activation_bytes_per_token_layer(cfg) == per_layer
    assert p.act_bytes_per_seq == 64 * 8 * per_layer + 64 * 64 * 2 * 2
    assert p.act_bytes_per_seq_ckpt == 64 * 8 * 64 * 2 + 64 * per_layer + 64 * 64 * 2 * 2
    free = 0.9 * 0.01e9 - p.state_bytes_per_gpu - 64 * 512 * 4 * 4 * 3
    fits = int(free // p.act_bytes_per_seq)
    mb = min(fits, 4096 // (64 * 2))
    while 4096 % (mb * 64 * 2):      # the largest micro-batch that fits and divides the step
        mb -= 1
    assert 0 < p.micro_batch == mb <= fits
    assert p.micro_batch * 64 * 2 * p.grad_accum == 4096
    assert p.micro_batch_ckpt * 64 * 2 * p.grad_accum_ckpt == 4096
    assert p.total_flops == p.train_flops_per_token * 4096 * 100
    assert abs(p.gpu_hours - p.total_flops / (0.5 * 1e12) / 3600) < 1e-12
    assert p.stage_flops_per_token == sorted(p.stage_flops_per_token)


def test_plan_cli_for_the_card_preset():
    r = subprocess.run([sys.executable, "-m", "poegpt.cli", "plan", "--preset", "1.5b", "--gpus", "8",
                        "--gpu-mem", "80"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1,507,591,082 parameters" in r.stdout and "GPU-hours" in r.stdout
    assert "micro-batch 16, accumulation 4" in r.stdout     # 16 x 2048 x 8 x 4 = 1,048,576 tokens
