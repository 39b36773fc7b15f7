"""Training throughput of each objective vs final_only (the dense baseline), side by side in one run,
and the chunked loss's memory vs materialised logits at V = 48,000.

For each model config and objective: tokens/s of a full training step (forward, chunked loss,
backward, Muon + AdamW), the FLOP ratio to final_only from the model's own accounting
(`train_flops_per_token`; 1 / that ratio is the speed ratio the FLOPs predict), MFU against this
machine's measured GEMM FLOP/s in the training dtype (bench/machine.py), and peak memory: max RSS
of a fresh process on CPU (max allocated on CUDA), in total and above the process's RSS once the
model, optimiser and batch exist ("above base": activations, gradients, optimiser state, loss).
Each measurement runs in its own process so peaks do not mix.

Loss memory: K = 4 stage states (N, d) and head weights (V, d) at V = 48,000, residual_logop,
forward + backward of the loss alone, chunked (`poegpt.objectives.poe_loss`) vs every stage's
logits materialised (the formula of docs/design.md §5.1 written plainly), peak RSS above base in a fresh process.
Prints tables, then one JSON line.

    python bench/train.py                      # tiny and d6, fp32, on this machine
    python bench/train.py --dtype bf16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, load, matmul_flops  # noqa: E402

CONFIGS = {
    "tiny": dict(preset="tiny", batch_size=16),                                   # 0.6M params, T=64
    "d6": dict(depth=6, vocab_size=2048, sequence_len=256, batch_size=8),        # ~15M params, T=256
}
OBJECTIVES = ["residual_logop", "joint_logop", "independent", "final_only"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, objective: str, steps: int, dtype: str, device: str, compile_loss: bool, queue) -> None:
    import torch
    from poegpt import PoEConfig, PoEGPT
    from poegpt.objectives import model_loss
    from poegpt.optim import build_optimizers
    from poegpt.train import autocast_for, resolve_device

    spec = dict(CONFIGS[name])
    batch_size = spec.pop("batch_size")
    if "preset" in spec:
        cfg = PoEConfig.from_preset(spec["preset"], objective=objective)
    else:
        cfg = PoEConfig.from_depth(spec["depth"], vocab_size=spec["vocab_size"], sequence_len=spec["sequence_len"],
                                   objective=objective)
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = PoEGPT(cfg).to(dev)
    opts = build_optimizers(model)
    amp = autocast_for(dev, dtype)
    T = cfg.sequence_len
    data = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), device=dev)
    base = rss_mb()

    def step():
        with amp:
            loss, _ = model_loss(model, data[:, :-1], data[:, 1:], compile_loss=compile_loss)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    dt = time.perf_counter() - t0
    tok_s = steps * batch_size * T / dt
    if dev.type == "cuda":
        peak, above = torch.cuda.max_memory_allocated() / 2 ** 20, float("nan")
    else:
        peak = peak_mb()
        above = peak - base
    queue.put(dict(config=name, objective=objective, params=model.num_params(), tok_s=tok_s,
                   flops_per_token=model.train_flops_per_token(), peak_mem_mb=peak, mem_above_base_mb=above,
                   load_1m=load()["load_1m"]))


def loss_memory(mode: str, V: int, N: int, d: int, K: int, chunk: int, queue) -> None:
    """Peak RSS above base of forward + backward of residual_logop over K stages, chunked or materialised."""
    import torch
    import torch.nn.functional as F
    from poegpt import PoEConfig
    from poegpt.objectives import poe_loss
    torch.manual_seed(0)
    hs = [torch.randn(N, d, requires_grad=True) for _ in range(K)]
    ws = [(0.02 * torch.randn(V, d)).requires_grad_() for _ in range(K)]
    y = torch.randint(0, V, (N,))
    cfg = PoEConfig.from_preset("tiny", objective="residual_logop")
    base = rss_mb()
    t0 = time.perf_counter()
    if mode == "chunked":
        loss, _ = poe_loss(hs, ws, y, cfg, vocab_size=V, softcap=15.0, chunk=chunk)
    else:
        lps = [F.log_softmax(15.0 * torch.tanh(F.linear(h, w) / 15.0), -1) for h, w in zip(hs, ws)]
        loss = F.nll_loss(lps[0], y)
        for k in range(1, K):
            mixed = (sum(lp.detach() for lp in lps[:k]) + lps[k]) / (k + 1)
            loss = loss + F.nll_loss(F.log_softmax(mixed, -1), y)
        loss = loss / K
    loss.backward()
    queue.put(dict(mode=mode, seconds=time.perf_counter() - t0, peak_above_base_mb=peak_mb() - base, loss=loss.item()))


def in_process(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    r = q.get()
    p.join()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--objectives", nargs="*", default=OBJECTIVES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile-loss", action="store_true")
    ap.add_argument("--loss-tokens", type=int, default=2048, help="positions N of the V=48,000 loss-memory test")
    a = ap.parse_args()
    import torch
    machine = load()
    peak_flops = matmul_flops({"bf16": torch.bfloat16}.get(a.dtype, torch.float32))
    rows, loss_rows = [], []
    for name in a.configs:
        for obj in a.objectives:
            rows.append(in_process(measure, name, obj, a.steps, a.dtype, a.device, a.compile_loss))
            print("#", json.dumps(rows[-1]), flush=True)                     # progress, in case of a cut-off
    for mode in ("chunked", "materialised") if a.loss_tokens else ():
        loss_rows.append(in_process(loss_memory, mode, 48_000, a.loss_tokens, 256, 4, 4096))
        print("#", json.dumps(loss_rows[-1]), flush=True)
    print(f"{describe({**machine, 'fp32_gflop_s' if a.dtype != 'bf16' else 'bf16_gflop_s': peak_flops / 1e9})}; "
          f"{a.dtype}, {a.steps} steps{', compiled loss' if a.compile_loss else ''}")
    print(f"{'config':<7}{'objective':<16}{'params':>11}{'tok/s':>9}{'vs final':>9}{'FLOP ratio':>11}"
          f"{'predicted':>10}{'MFU':>7}{'peak MB':>9}{'ratio':>7}{'above base':>11}{'ratio':>7}")
    for r in rows:
        base = next((b for b in rows if b["config"] == r["config"] and b["objective"] == "final_only"), r)
        r["speed_vs_final_only"] = r["tok_s"] / base["tok_s"]
        r["flops_vs_final_only"] = r["flops_per_token"] / base["flops_per_token"]
        r["predicted_speed_vs_final_only"] = 1 / r["flops_vs_final_only"]
        r["mem_vs_final_only"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        r["mem_above_base_vs_final_only"] = r["mem_above_base_mb"] / base["mem_above_base_mb"]
        r["mfu"] = r["tok_s"] * r["flops_per_token"] / peak_flops
        print(f"{r['config']:<7}{r['objective']:<16}{r['params']:>11,}{r['tok_s']:>9,.0f}"
              f"{r['speed_vs_final_only']:>9.2f}{r['flops_vs_final_only']:>11.2f}{r['predicted_speed_vs_final_only']:>10.2f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_mem_mb']:>9.0f}{r['mem_vs_final_only']:>7.2f}"
              f"{r['mem_above_base_mb']:>11.0f}{r['mem_above_base_vs_final_only']:>7.2f}")
    if loss_rows:
        chunked, full = loss_rows
        print(f"loss memory, residual_logop, K=4, V=48,000, N={a.loss_tokens}, d=256 (forward + backward of the loss "
              f"alone): chunked {chunked['peak_above_base_mb']:.0f} MB in {chunked['seconds']:.2f} s, materialised "
              f"{full['peak_above_base_mb']:.0f} MB in {full['seconds']:.2f} s "
              f"({full['peak_above_base_mb'] / max(chunked['peak_above_base_mb'], 1e-9):.1f}x); "
              f"loss {chunked['loss']:.6f} vs {full['loss']:.6f}")
    print(json.dumps({"bench": "train", "dtype": a.dtype, "steps": a.steps, "compile_loss": a.compile_loss,
                      "machine": {**machine, "peak_flops": peak_flops, "load_1m_end": load()["load_1m"]},
                      "rows": rows, "loss_memory": loss_rows}))


if __name__ == "__main__":
    main()
