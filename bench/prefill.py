"""Long-context prefill: the sliding-window pattern (SSSL) vs all-long attention, side by side.

For contexts of 512, 1024 and 2048 tokens: the time to prefill one full-PoE prompt into the KV cache
(batch 1, random weights, a depth-12 trunk with the card's stage proportions) and the peak memory of
the process doing it (max RSS of a fresh process on CPU), with window_pattern "SSSL" (the card's:
short windows of a quarter context, every fourth layer and the last long) and "L" (every layer sees
the whole context). Prints a table with the SSSL / L ratios, then one JSON line.

    python bench/prefill.py
    python bench/prefill.py --depth 8 --contexts 512 1024 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import sys
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, measure as measure_machine  # noqa: E402


def measure(depth: int, context: int, pattern: str, dtype: str, repeats: int, queue) -> None:
    import torch
    from poegpt import PoEConfig, PoEGPT
    from poegpt.cache import new_cache
    from poegpt.engine import StageMix, prefill

    cfg = PoEConfig.from_depth(depth, vocab_size=8192, sequence_len=context, window_pattern=pattern)
    torch.manual_seed(0)
    with torch.device("meta"):                                     # built in its dtype: no fp32 copy raises the peak
        model = PoEGPT(cfg).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    model = model.to_empty(device="cpu").eval()
    model.init_weights()
    rows = [list(range(1, context + 1))]
    best = float("inf")
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
    with torch.no_grad():
        for _ in range(repeats + 1):                               # the first run warms up
            cache = new_cache(model, 1, context)
            t0 = time.perf_counter()
            hs = prefill(model, cache, rows, cfg.n_stages)
            StageMix.full(cfg.n_stages).logprobs(model, hs)
            best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"seconds": best, "peak_mb": peak, "above_base_mb": peak - base,
               "windows": list(cfg.windows)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 1024, 2048])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for T in a.contexts:
        row = {"context": T}
        for pattern in ("SSSL", "L"):
            q = ctx.Queue()
            p = ctx.Process(target=measure, args=(a.depth, T, pattern, a.dtype, a.repeats, q))
            p.start()
            r = q.get()
            p.join()
            row[pattern] = r
        row["time_ratio"] = row["SSSL"]["seconds"] / row["L"]["seconds"]
        row["memory_ratio"] = row["SSSL"]["peak_mb"] / row["L"]["peak_mb"]
        row["above_base_ratio"] = row["SSSL"]["above_base_mb"] / max(row["L"]["above_base_mb"], 1e-9)
        results.append(row)
    print(f"prefill, depth {a.depth}, batch 1, {a.dtype}, full PoE; SSSL windows {results[0]['SSSL']['windows']}")
    machine = measure_machine(flops=False, bw=False)
    print(describe(machine))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs; peak MB is the process's max RSS, "
          f"'above base' its rise during the prefills (cache, activations, attention)")
    print(f"{'context':>8}{'SSSL s':>9}{'L s':>9}{'ratio':>7}{'SSSL MB':>9}{'L MB':>8}{'ratio':>7}"
          f"{'SSSL +MB':>10}{'L +MB':>8}{'ratio':>7}")
    for r in results:
        print(f"{r['context']:>8}{r['SSSL']['seconds']:>9.3f}{r['L']['seconds']:>9.3f}{r['time_ratio']:>7.2f}"
              f"{r['SSSL']['peak_mb']:>9.0f}{r['L']['peak_mb']:>8.0f}{r['memory_ratio']:>7.2f}"
              f"{r['SSSL']['above_base_mb']:>10.0f}{r['L']['above_base_mb']:>8.0f}{r['above_base_ratio']:>7.2f}")
    print(json.dumps({"bench": "prefill", "depth": a.depth, "dtype": a.dtype, "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
