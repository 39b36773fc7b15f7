"""Throughput of `vllm serve` (CPU, poegpt's plugin) against `poegpt serve` on the same model, at
concurrency 1 and 16, over loopback.

Both servers run side by side but are measured one at a time (an idle server of either kind uses no
CPU), and the measurements interleave: for each of --rounds rounds, each level runs on poegpt serve,
then on vllm serve, so that a change in the machine's load during the run hits both alike; the
table reports each server's median over the rounds. The workload is the same for both: streaming
/v1/completions, greedy, a fixed number of new tokens, prompts cycled from bench/serve.py's
multilingual list, clients sending requests back to back. Both compute the same full-PoE greedy
tokens (tests/test_vllm.py), so they do the same work. Per server and level: tokens/s over all
clients, requests/s, latency p50/p90, time to first token p50; then the ratio vLLM / poegpt per
level. Prints a table, then one JSON line.

    python bench/vllm_serve.py                                   # the shipped demo model, bf16
    python bench/vllm_serve.py --model runs/demo/run --dtype fp32 --max-tokens 64 --vllm-overrides '{"poe_attention": "vllm"}'

Needs the vLLM environment (`make vllm-venv`, or --vllm-venv PATH). Threads: vLLM's CPU worker binds
one OpenMP thread per core it keeps for compute and leaves one core to its API server and engine
loop (1 of 2 cores here); poegpt serve gets the same number of compute threads by default
(--poegpt-threads, via OMP_NUM_THREADS), since torch's default of one thread per core collapses when
the cores are shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from machine import describe, measure  # noqa: E402
from serve import PROMPTS, drive  # noqa: E402  (bench/serve.py)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"{' '.join(cmd[:2])} did not start in {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)      # the session this script started
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    def body_for(i: int) -> dict:
        return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    return drive(url, concurrency, n_requests, body_for)


def median_level(runs: list[dict]) -> dict:
    """The run with the median tokens/s among the rounds of one level, with every round's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tok_s"])
    return {**ranked[len(ranked) // 2], "tok_s_rounds": [r["tok_s"] for r in runs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="poegpt checkpoint (default: the shipped demo model)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--poegpt-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="OMP_NUM_THREADS of poegpt serve (default: the compute threads vLLM's CPU worker uses)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    ap.add_argument("--vllm-overrides", default="{}", help="--hf-overrides for vllm serve, e.g. '{\"poe_attention\": \"vllm\"}'")
    a = ap.parse_args()

    from poegpt.checkpoint import resolve_checkpoint
    from poegpt.integrations.hf.export import export_hf
    ckpt = resolve_checkpoint(a.model)
    work = Path(tempfile.mkdtemp(prefix="poegpt-vllm-bench-"))
    folder = export_hf(ckpt, work / "model")
    vllm_bin = Path(a.vllm_venv) / "bin" / "vllm"
    if not vllm_bin.exists():
        raise SystemExit(f"no vLLM environment at {a.vllm_venv}: run `make vllm-venv`")

    servers, procs = {}, []
    try:
        port = free_port()
        ENV["OMP_NUM_THREADS"] = str(a.poegpt_threads)
        cmd = [sys.executable, "-m", "poegpt.cli", "serve", "--model", str(ckpt), "--port", str(port), "--dtype", a.dtype,
               "--max-batch", str(max(a.concurrency)), "--max-queue", "256", "--served-name", "poegpt",
               "--log-level", "warning"]
        print(f"starting poegpt serve: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        procs.append(start(cmd, port, work / "poegpt.log"))
        servers["poegpt serve"] = (f"http://127.0.0.1:{port}", time.monotonic() - t0)
        del ENV["OMP_NUM_THREADS"]
        port = free_port()
        cmd = [str(vllm_bin), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", {"bf16": "bfloat16", "fp32": "float32"}[a.dtype], "--enforce-eager",
               "--served-model-name", "poegpt", "--hf-overrides", a.vllm_overrides,
               "--max-num-seqs", str(max(a.concurrency))]
        print(f"starting vllm serve: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        procs.append(start(cmd, port, work / "vllm.log"))
        servers["vllm serve"] = (f"http://127.0.0.1:{port}", time.monotonic() - t0)
        for url, _ in servers.values():
            run_level(url, "poegpt", 1, 2, a.max_tokens)                 # warm-up
        runs = {name: {k: [] for k in a.concurrency} for name in servers}
        for rnd in range(a.rounds):
            for k in a.concurrency:
                for name, (url, _) in servers.items():
                    r = run_level(url, "poegpt", k, a.requests or max(8, 2 * k), a.max_tokens)
                    runs[name][k].append(r)
                    print(f"round {rnd + 1}: {name} concurrency {k}: {r['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            stop(proc)
    results = {name: [{**median_level(runs[name][k]), "startup_s": servers[name][1]} for k in a.concurrency]
               for name in servers}
    poegpt_levels, vllm_levels = results["poegpt serve"], results["vllm serve"]

    print(f"model: {ckpt} ({a.dtype}), {a.max_tokens} new tokens per request, greedy, loopback; "
          f"vllm overrides {a.vllm_overrides}; {os.cpu_count()} CPU cores, poegpt serve threads {a.poegpt_threads}; median of {a.rounds} interleaved rounds; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    machine = measure(flops=False, bw=False)
    print(describe(machine))
    print(f"{'server':>13}{'conc':>5}{'reqs':>6}{'err':>5}{'tokens':>8}{'sec':>8}{'tok/s':>9}{'req/s':>7}"
          f"{'lat p50':>9}{'p90':>7}{'ttft p50':>10}{'start s':>9}")
    for name, levels in (("poegpt serve", poegpt_levels), ("vllm serve", vllm_levels)):
        for r in levels:
            print(f"{name:>13}{r['concurrency']:>5}{r['requests']:>6}{r['errors']:>5}{r['tokens']:>8}"
                  f"{r['seconds']:>8.2f}{r['tok_s']:>9.1f}{r['req_s']:>7.2f}{r['latency_p50']:>9.3f}"
                  f"{r['latency_p90']:>7.3f}{r['ttft_p50']:>10.3f}{r['startup_s']:>9.1f}")
            if r["first_error"]:
                print(f"  first error: {r['first_error']}")
    ratios = {str(p["concurrency"]): v["tok_s"] / p["tok_s"] if p["tok_s"] else None
              for p, v in zip(poegpt_levels, vllm_levels)}
    print("throughput ratio vllm / poegpt: " + ", ".join(f"concurrency {k}: {r:.2f}x" for k, r in ratios.items()))
    print(json.dumps({"bench": "vllm_serve", "model": str(ckpt), "dtype": a.dtype, "max_tokens": a.max_tokens,
                      "rounds": a.rounds, "load_average": os.getloadavg()[0], "machine": machine,
                      "poegpt_threads": a.poegpt_threads,
                      "vllm_overrides": json.loads(a.vllm_overrides), "poegpt": poegpt_levels, "vllm": vllm_levels,
                      "ratio_vllm_over_poegpt": ratios}))


if __name__ == "__main__":
    main()
