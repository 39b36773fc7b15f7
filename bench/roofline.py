"""Decode roofline of the 1.5B preset on this machine: how close batch-1 decoding gets to memory bandwidth.

A batch-1 decode step reads every weight it multiplies by once, so tokens/s is bounded by
(memory bandwidth) / (weight bytes per token). This measures, in one run:
  - the machine's memory bandwidth: a large copy (read + write bytes / s) and a large reduction (read);
  - full-PoE greedy decode tokens/s of the `1.5b` preset with random weights, and of the prefix modes
    (1, 2, 3 stages), timed over decode steps only (prefill excluded);
  - weight bytes per token from the model's own accounting (`decode_weight_bytes`), the achieved
    weight bytes/s and its fraction of the read bandwidth; each prefix mode's speed over full, next to
    the layer ratio (24/12, 24/17, 24/21) and the weight-byte ratio it should approach.
Prints a table, then one JSON line.

    python bench/roofline.py                   # dtype auto: bf16 where the CPU has it natively, else fp32
    python bench/roofline.py --dtype fp32 --tokens 8 --step eager
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import bandwidth, describe, load  # noqa: E402

from poegpt import PoEConfig, PoEGPT  # noqa: E402
from poegpt.engine import Sampling  # noqa: E402
from poegpt.modes import ModeSpec, mode_steps  # noqa: E402


def build(dtype: torch.dtype) -> PoEGPT:
    with torch.device("meta"):
        model = PoEGPT(PoEConfig.from_preset("1.5b"))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():                      # zero-initialised stage heads would make every row alike
        for h in model.lm_head_stages:
            h.weight.normal_(std=0.02)
    return model.to(dtype).eval()


def decode_seconds(model, spec: ModeSpec, prompt: list[int], n: int) -> float:
    """Seconds for n decode steps after the prefill (the first token comes from the prefill)."""
    steps, _ = mode_steps(model, [prompt], spec, n + 1, Sampling())
    it = iter(steps)
    next(it)                                   # prefill + first token
    t0 = time.perf_counter()
    for _ in it:
        pass
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per mode")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--step", choices=["eager", "fast", "compiled"], default="fast",
                    help="eager: the default decode loop; fast: compile_decode's fixed-shape step (one-row GEMV "
                         "kernels) run uncompiled; compiled: that step under torch.compile")
    a = ap.parse_args()
    from poegpt.hardware import resolve_dtype
    dtype = resolve_dtype(a.dtype)
    a.dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    machine = load()
    bw = bandwidth()
    model = build(dtype)
    if a.step != "eager":
        from poegpt.engine import compile_decode
        compile_decode(model, True, "inductor" if a.step == "compiled" else None)
    K, b = model.config.n_stages, model.config.boundaries
    prompt = list(range(1, 17))
    modes = [("full", ModeSpec("full"), K)] + [(f"prefix {m}", ModeSpec("prefix", max_stages=m), m)
                                               for m in range(K - 1, 0, -1)]
    rows = []
    for label, spec, m in modes:
        decode_seconds(model, spec, prompt, 2)                  # warm-up
        dt = min(decode_seconds(model, spec, prompt, a.tokens) for _ in range(a.repeats))
        tok_s = a.tokens / dt
        wbytes = model.decode_weight_bytes(m, dtype)
        rows.append(dict(mode=label, stages=m, layers=b[m - 1] + 1, tok_s=tok_s, weight_gb_per_token=wbytes / 1e9,
                         achieved_gb_s=wbytes * tok_s / 1e9, fraction_of_read_bw=wbytes * tok_s / 1e9 / bw["read_gb_s"]))
    full = rows[0]
    for r in rows:
        r["speed_vs_full"] = r["tok_s"] / full["tok_s"]
        r["layer_ratio"] = full["layers"] / r["layers"]
        r["weight_byte_ratio"] = full["weight_gb_per_token"] / r["weight_gb_per_token"]
    print(f"{describe({**machine, **bw})}; 1.5b preset, {a.dtype} weights, batch 1, greedy, decode steps only, "
          f"{a.step} step")
    print(f"{'mode':<10}{'layers':>7}{'tok/s':>8}{'GB/token':>10}{'GB/s':>7}{'of BW':>7}{'vs full':>9}"
          f"{'layer ratio':>13}{'byte ratio':>12}")
    for r in rows:
        print(f"{r['mode']:<10}{r['layers']:>7}{r['tok_s']:>8.2f}{r['weight_gb_per_token']:>10.3f}"
              f"{r['achieved_gb_s']:>7.1f}{100 * r['fraction_of_read_bw']:>6.0f}%{r['speed_vs_full']:>8.2f}x"
              f"{r['layer_ratio']:>12.2f}x{r['weight_byte_ratio']:>11.2f}x")
    machine["load_1m_end"] = load()["load_1m"]
    print(json.dumps({"bench": "roofline", "dtype": a.dtype, "step": a.step, "machine": machine, "bandwidth": bw, "modes": rows}))


if __name__ == "__main__":
    main()
