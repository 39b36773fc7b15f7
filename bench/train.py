"""Training throughput of each objective vs final_only, side by side in one run.

For each model config and objective: tokens/s of a full training step (forward, chunked loss,
backward, Muon + AdamW), MFU against the measured matmul FLOP/s of this machine, and peak memory
(max RSS of a fresh process on CPU, max allocated on CUDA). Each measurement runs in its own
process so peaks do not mix. Prints a table, then one JSON line.

    python bench/train.py                      # tiny and a ~15M config, fp32, on this machine
    python bench/train.py --dtype bf16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

CONFIGS = {
    "tiny": dict(preset="tiny", batch_size=16),                                   # 0.6M params, T=64
    "d6": dict(depth=6, vocab_size=2048, sequence_len=256, batch_size=8),        # ~15M params, T=256
}
OBJECTIVES = ["residual_logop", "joint_logop", "independent", "final_only"]


def measure(name: str, objective: str, steps: int, dtype: str, device: str, queue) -> None:
    import torch
    from poegpt import PoEConfig, PoEGPT
    from poegpt.optim import build_optimizers
    from poegpt.train import autocast_for, measure_peak_flops, resolve_device

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

    def step():
        with amp:
            loss, _ = model(data[:, :-1], data[:, 1:])
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
    flops = model.train_flops_per_token()
    peak_mem = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put(dict(config=name, objective=objective, params=model.num_params(), tok_s=tok_s,
                   flops_per_token=flops, peak_flops=measure_peak_flops(dev, dtype),
                   peak_mem_mb=peak_mem / 2 ** 20))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--objectives", nargs="*", default=OBJECTIVES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for name in a.configs:
        for obj in a.objectives:
            q = ctx.Queue()
            p = ctx.Process(target=measure, args=(name, obj, a.steps, a.dtype, a.device, q))
            p.start()
            rows.append(q.get())
            p.join()
    print(f"{'config':<7}{'objective':<16}{'params':>11}{'tok/s':>10}{'vs final':>10}{'GFLOP/tok':>11}"
          f"{'FLOP ratio':>11}{'MFU':>7}{'peak MB':>9}{'mem ratio':>10}")
    for r in rows:
        base = next(b for b in rows if b["config"] == r["config"] and b["objective"] == "final_only") \
            if "final_only" in a.objectives else r
        r["speed_vs_final_only"] = r["tok_s"] / base["tok_s"]
        r["flops_vs_final_only"] = r["flops_per_token"] / base["flops_per_token"]
        r["mem_vs_final_only"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        r["mfu"] = r["tok_s"] * r["flops_per_token"] / r["peak_flops"]
        print(f"{r['config']:<7}{r['objective']:<16}{r['params']:>11,}{r['tok_s']:>10,.0f}"
              f"{r['speed_vs_final_only']:>10.2f}{r['flops_per_token'] / 1e9:>11.4f}{r['flops_vs_final_only']:>11.2f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_mem_mb']:>9.0f}{r['mem_vs_final_only']:>10.2f}")
    print(json.dumps({"bench": "train", "dtype": a.dtype, "steps": a.steps, "rows": rows}))


if __name__ == "__main__":
    main()
