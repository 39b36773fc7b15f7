"""This machine's measured ceilings, shared by the benchmarks: memory bandwidth and matmul FLOP/s.

Measured, not looked up: a large copy (bytes read + written per second) and a large reduction (bytes
read per second) for bandwidth, square GEMMs in fp32 and bf16 for FLOP/s (the best of a few runs).
Also which CPU it is (model, the flags that decide the fast dtype, torch's CPU capability: the same
machine kind has been an AVX2-only Zen 3 and an AVX512_BF16 Zen 4) and the load average when called,
since other work on the machine skews every figure.

    python bench/machine.py          # prints the figures as one JSON line
"""

from __future__ import annotations

import json
import os
import time

import torch


def load() -> dict:
    from poegpt.hardware import cpu, native_on_cpu
    info = cpu()
    one, five, _ = os.getloadavg()
    return {"cpu": info["model"], "cpu_flags": info["flags"], "capability": info["capability"],
            "native_bf16": native_on_cpu("bf16", info), "load_1m": round(one, 2), "load_5m": round(five, 2),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def bandwidth(gb: float = 1.0, repeats: int = 5) -> dict:
    """GB/s of a copy (read + write bytes) and of a sum (read bytes) over `gb` GB of fp32."""
    n = int(gb * 1e9) // 4
    a, b = torch.randn(n), torch.empty(n)
    copy = read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        copy = min(copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        read = min(read, time.perf_counter() - t0)
    return {"copy_gb_s": 2 * 4 * n / copy / 1e9, "read_gb_s": 4 * n / read / 1e9}


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n×n GEMM."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def measure(flops: bool = True, bw: bool = True) -> dict:
    out = load()
    if bw:
        out.update(bandwidth())
    if flops:
        out["fp32_gflop_s"] = matmul_flops(torch.float32) / 1e9
        out["bf16_gflop_s"] = matmul_flops(torch.bfloat16) / 1e9
    return out


def describe(m: dict) -> str:
    parts = [f"{m['cpu']} ({' '.join(m['cpu_flags'])}; torch capability {m['capability']})",
             f"{m['threads']} threads, load {m['load_1m']:.2f} (1 min) on {m['cpus']} CPUs"]
    if "copy_gb_s" in m:
        parts.append(f"copy {m['copy_gb_s']:.1f} GB/s, read {m['read_gb_s']:.1f} GB/s")
    gemm = [f"{t} {m[t + '_gflop_s']:.0f}" for t in ("fp32", "bf16") if t + "_gflop_s" in m]
    if gemm:
        parts.append(f"GEMM {', '.join(gemm)} GFLOP/s")
    return "machine: " + "; ".join(parts)


if __name__ == "__main__":
    m = measure()
    print(describe(m))
    print(json.dumps({"bench": "machine", **m}))
